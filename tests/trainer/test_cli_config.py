"""`kubetune ls`, `kubetune cp`, `kubetune validate` and `kubetune run` config errors, as users see them."""
import subprocess
import sys

import yaml

from kubetune.cli import main


def test_ls_lists_recipes_and_their_builtin_configs(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert {"full_finetune", "lora_finetune", "generate", "eval"} <= set(rows)
    assert "tiny_full" in rows["full_finetune"] and "llama3_1_8b_full" in rows["full_finetune"]


def test_cp_copies_a_builtin_config_and_refuses_to_overwrite(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    assert main(["cp", "tiny_full", str(dest)]) == 0
    assert yaml.safe_load(dest.read_text())["recipe"] == "full_finetune"
    dest.write_text("edited")
    assert main(["cp", "tiny_full", str(dest)]) == 2
    assert "pass --force" in capsys.readouterr().err and dest.read_text() == "edited"
    assert main(["cp", "tiny_full", str(dest), "--force"]) == 0 and dest.read_text() != "edited"
    assert main(["cp", "tiny_full", str(tmp_path)]) == 0 and (tmp_path / "tiny_full.yaml").is_file()
    assert main(["cp", "no_such_config", str(tmp_path / "x.yaml")]) == 2
    assert "no built-in config named 'no_such_config'" in capsys.readouterr().err


def test_validate_accepts_a_good_config_and_names_the_bad_field(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    assert main(["cp", "tiny_full", str(good)]) == 0
    assert main(["validate", str(good)]) == 0
    assert "valid config for full_finetune" in capsys.readouterr().out

    data = yaml.safe_load(good.read_text())
    data["optimizer"]["lrr"] = 1.0
    data["batch_size"] = "big"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lrr: unknown key; did you mean 'optimizer.lr'?" in err
    assert "batch_size: expected an integer, got 'big' (str)" in err

    del data["recipe"], data["optimizer"]["lrr"]
    data["batch_size"] = 4
    norecipe = tmp_path / "norecipe.yaml"
    norecipe.write_text(yaml.safe_dump(data))
    assert main(["validate", str(norecipe)]) == 2
    assert "no `recipe:` key; pass --recipe NAME" in capsys.readouterr().err
    assert main(["validate", str(norecipe), "--recipe", "full_finetune"]) == 0


def test_run_with_a_bad_override_prints_one_error_line_and_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", "full_finetune", "--config", "tiny_full", "optimizer.lrr=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "optimizer.lrr: unknown key; did you mean 'optimizer.lr'?" in result.stderr
    assert "Traceback" not in result.stderr
