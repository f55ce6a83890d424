"""The import layout: kubetune.{trainer,operator} map to trainer/ and operator/, the folder
operator/ never shadows the standard library, and the CLI and config models stay torch-free."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_stdlib_operator_wins_with_repo_root_first_on_sys_path():
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import operator; print(operator.itemgetter(1)([5, 7]))"
    for flags in ((), ("-S",)):  # -S: no site, so nothing has imported operator beforehand
        result = run_python(code, *flags)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "7"


def test_operator_package_imports_as_kubetune_operator():
    result = run_python("import kubetune.operator as o; print(o.__file__)")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == REPO / "operator" / "__init__.py"


def test_cli_help_and_config_models_do_not_import_torch():
    code = (
        "import sys\n"
        "from kubetune.cli import build_parser\n"
        "import kubetune.trainer.config.finetune, kubetune.trainer.config.lora\n"
        "import kubetune.trainer.config.eval, kubetune.trainer.config.generate, kubetune.trainer.registry\n"
        "build_parser().format_help()\n"
        "print('torch' in sys.modules)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    help_run = subprocess.run([sys.executable, "-m", "kubetune", "--help"], capture_output=True, text=True, cwd=REPO)
    assert help_run.returncode == 0 and "apply" in help_run.stdout
