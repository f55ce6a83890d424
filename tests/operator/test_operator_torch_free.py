"""The operator image has no torch: nothing the operator, `kubetune apply/get/crds/operator`
import may pull it in."""
import subprocess
import sys

from ophelpers import REPO


def test_operator_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import kubetune.operator.main, kubetune.operator.handlers, kubetune.operator.local\n"
        "import kubetune.operator.crdgen, kubetune.operator.planner, kubetune.operator.status\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
