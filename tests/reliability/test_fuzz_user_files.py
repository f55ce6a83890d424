"""Fuzzed user files through the code the CLI runs on them: dataset files (jsonl, json, parquet,
txt, csv; alpaca, chat, prompt_completion, text, preference), config files and `key=value`
overrides (`kubetune validate`, `kubetune run --config`), eval task files, and manifests
(`kubetune plan -f`, the loader `kubetune apply` uses). Property: each input is accepted, or
refused with a KubetuneError (the CLI prints `error: ...`, exit 2) whose message names the file
(and the line and field where there is one) -- never another exception, which the CLI would show
as a traceback.

Hypothesis draws the inputs (structured records with wrong types and missing fields, and raw
byte damage: truncation, invalid UTF-8, stray characters). Example counts are small in CI; set
KUBETUNE_FUZZ_EXAMPLES (e.g. 2000) for a long run. A failure prints the smallest input found."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.errors import KubetuneError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("KUBETUNE_FUZZ_RANDOM") is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)


def damaged(data: bytes, draw) -> bytes:
    """Raw damage a file meets: cut short, invalid UTF-8, a stray character, a lost line."""
    how = draw(st.sampled_from(["truncate", "bad utf-8", "insert", "drop line", "as is"]))
    if not data or how == "as is":
        return data
    at = draw(st.integers(0, len(data)))
    if how == "truncate":
        return data[:at]
    if how == "bad utf-8":
        return data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + data[at:]
    if how == "insert":
        return data[:at] + draw(st.sampled_from([b"{", b"}", b'"', b",", b"\n", b":", b"[", b"\t", b"- "])) + data[at:]
    lines = data.split(b"\n")
    del lines[draw(st.integers(0, len(lines) - 1))]
    return b"\n".join(lines)


def refused_or_fine(call, path: Path) -> str | None:
    """Run `call`; None when it accepts, the message when it refuses with a KubetuneError naming the
    file. Any other exception propagates (hypothesis reports it with the input)."""
    try:
        call()
    except KubetuneError as err:
        message = str(err)
        assert str(path) in message or path.name in message, f"the message does not name the file: {message}"
        return message
    return None


# -------------------------------------------------------------------------------------- datasets

FIELDS = {
    "alpaca": ["instruction", "input", "output"],
    "chat": ["messages"],
    "prompt_completion": ["prompt", "completion"],
    "text": ["text"],
    "preference": ["prompt", "chosen", "rejected"],
}


@st.composite
def records(draw, fmt):
    def value(key):
        if key in ("messages", "chosen", "rejected", "prompt") and draw(st.booleans()):
            turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | json_values,
                                          "content": st.text(max_size=10) | json_values})
            return draw(st.lists(turn | json_values, max_size=3))
        return draw(st.text(max_size=20) | json_values)

    keys = draw(st.lists(st.sampled_from(FIELDS[fmt] + ["extra"]), max_size=4, unique=True))
    return {k: value(k) for k in keys} if draw(st.integers(0, 9)) else draw(json_values)


@pytest.fixture(scope="module")
def data_context():
    """fmt -> (config, tokenizer) of the recipe that trains on that format (tiny_full / tiny_dpo)."""
    from kubetune.trainer.config import resolve_config
    from kubetune.trainer.tokenizers import load_tokenizer

    full = resolve_config("full_finetune", "tiny_full", [])
    tokenizer = load_tokenizer(full.tokenizer_path, full.tokenizer.chat_template)
    return {"dpo": resolve_config("dpo", "tiny_dpo", []), "full": full, "tokenizer": tokenizer}


def write_dataset(folder: Path, suffix: str, rows: list, draw) -> Path:
    path = folder / f"train{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:  # the rows as columns where Arrow can store them, else as JSON text
            pq.write_table(pa.Table.from_pylist([r if isinstance(r, dict) else {"value": r} for r in rows]), path)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pq.write_table(pa.table({"text": [json.dumps(r) for r in rows]}), path)
        data = path.read_bytes()
        path.write_bytes(damaged(data, draw) if draw(st.booleans()) else data)
        return path
    if suffix == ".json":
        text = json.dumps(rows)
    elif suffix == ".csv":
        text = "\n".join(",".join(map(str, r.values())) if isinstance(r, dict) else str(r) for r in rows)
    elif suffix == ".txt":
        text = "\n\n".join(str(r) for r in rows)
    else:
        text = "\n".join(json.dumps(r) for r in rows)
    path.write_bytes(damaged(text.encode(), draw))
    return path


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(list(FIELDS)), suffix=st.sampled_from([".jsonl", ".json", ".parquet", ".txt", ".csv"]))
def test_fuzzed_dataset_files_are_loaded_or_refused_naming_the_file(data_context, data, fmt, suffix):
    from kubetune.trainer.data.dataset import build_datasets

    cfg = data_context["dpo" if fmt == "preference" else "full"]
    rows = data.draw(st.lists(records(fmt), min_size=0, max_size=4))
    with tempfile.TemporaryDirectory() as folder:
        path = write_dataset(Path(folder), suffix, rows, data.draw)
        extra = {"txt_documents": data.draw(st.sampled_from(["file", "blank_line"]))} if suffix == ".txt" else {}
        dataset_cfg = cfg.dataset.model_copy(update={"source": str(path), "format": fmt, "eval_fraction": 0.0, **extra})
        message = refused_or_fine(lambda: build_datasets(dataset_cfg, data_context["tokenizer"], 160, 0), path)
        if message and suffix == ".jsonl" and " record " in message:
            assert "(line " in message, message  # jsonl errors say the line


# --------------------------------------------------------------------------- configs and overrides

TINY_FULL = yaml.safe_load((REPO / "trainer" / "configs" / "tiny_full.yaml").read_text())


def dotted_keys(data, prefix=""):
    for key, value in data.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from dotted_keys(value, f"{prefix}{key}.")


KEYS = sorted(dotted_keys(TINY_FULL))


def cli(*argv: str) -> tuple[int, str]:
    """`kubetune ARGV` in this process: (exit status, stderr). A traceback would be an exception here."""
    from kubetune.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


@st.composite
def config_files(draw):
    config = json.loads(json.dumps(TINY_FULL))
    for _ in range(draw(st.integers(1, 3))):
        keys = draw(st.sampled_from(KEYS) | st.text(min_size=1, max_size=8)).split(".")
        node = config
        for part in keys[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if draw(st.integers(0, 4)) == 0:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = draw(json_values)
    text = yaml.safe_dump(config, allow_unicode=True).encode()
    return damaged(text, draw) if draw(st.booleans()) else text


@FUZZ
@given(content=config_files())
def test_fuzzed_config_files_validate_or_fail_with_error_and_exit_2(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(content)
        code, err = cli("validate", str(path))
        assert code in (0, 2), err
        if code == 2:
            assert err.startswith("error: ") and "Traceback" not in err, err
            assert str(path) in err or any(k.split(".")[0] in err for k in KEYS) or "--recipe" in err, err


@FUZZ
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS) | st.text(max_size=10), st.text(max_size=12)),
    st.text(max_size=16),
), min_size=1, max_size=3))
def test_fuzzed_overrides_are_applied_or_refused_naming_the_key(overrides):
    from kubetune.trainer.config import resolve_config

    try:
        resolve_config("full_finetune", "tiny_full", overrides)
    except KubetuneError as err:
        assert any(o.partition("=")[0].split(".")[0] in str(err) for o in overrides) or "override" in str(err), str(err)


# ------------------------------------------------------------------------------- eval task files

TASK_FIELDS = {"multiple_choice": ["question", "choices", "answer"], "generate": ["prompt", "answer"], "perplexity": ["text"]}


@FUZZ
@given(data=st.data(), task_type=st.sampled_from(list(TASK_FIELDS)))
def test_fuzzed_eval_task_files_load_or_fail_naming_file_and_line(data, task_type):
    from kubetune.trainer.eval.tasks import load_task

    keys = st.lists(st.sampled_from(TASK_FIELDS[task_type] + ["x"]), max_size=4, unique=True)
    rows = data.draw(st.lists(keys.flatmap(lambda ks: st.fixed_dictionaries({k: json_values | st.lists(st.text(max_size=5), max_size=4) for k in ks}))
                              | json_values, max_size=4))
    options = {"context_field": "question"} if task_type == "multiple_choice" else {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "task.jsonl"
        path.write_bytes(damaged("\n".join(json.dumps(r) for r in rows).encode(), data.draw))
        message = refused_or_fine(lambda: load_task("t", task_type, str(path), options), path)
        if message and "field" in message:
            assert f"{path}:" in message, message  # file:line


# ------------------------------------------------------------------------------------- manifests

MANIFEST = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())


def manifest_keys(data, prefix=""):
    for key, value in data.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from manifest_keys(value, f"{prefix}{key}.")


MANIFEST_KEYS = sorted(manifest_keys(MANIFEST))


@st.composite
def manifests(draw):
    doc = json.loads(json.dumps(MANIFEST))
    for _ in range(draw(st.integers(1, 3))):
        keys = draw(st.sampled_from(MANIFEST_KEYS)).split(".")
        node = doc
        for part in keys[:-1]:
            node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {}) if False else node.get(part)
            if not isinstance(node, dict):
                break
        else:
            if draw(st.integers(0, 4)) == 0:
                node.pop(keys[-1], None)
            else:
                node[keys[-1]] = draw(json_values)
    text = yaml.safe_dump(doc, allow_unicode=True).encode()
    return damaged(text, draw) if draw(st.booleans()) else text


@FUZZ
@given(content=manifests())
def test_fuzzed_manifests_plan_or_fail_with_error_and_exit_2(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_bytes(content)
        code, err = cli("plan", "-f", str(path))
        assert code in (0, 2), err
        if code == 2:
            assert err.startswith("error: ") and "Traceback" not in err, err


# ------------------------------------------------------------- the same, through the real CLI

def kubetune(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune", *argv], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_cli_refuses_damaged_files_with_exit_2_naming_file_line_and_field(tmp_path):
    """One damaged file of each kind, through `kubetune run`, `validate` and `apply` as a user types them."""
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n')
    run = kubetune("run", "full_finetune", "--config", "tiny_full", f"dataset.source={data}", "max_steps=1",
                   f"output_dir={tmp_path / 'out'}", "device=cpu", "progress_bar=false")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"error: {data} record 2 (line 2): field 'output' must be a string" in run.stderr

    config = tmp_path / "config.yaml"
    config.write_bytes(b"recipe: full_finetune\nmax_steps: 3\noutput_dir: caf\xe9\n")  # Latin-1, not UTF-8
    validate = kubetune("validate", str(config))
    assert validate.returncode == 2 and "Traceback" not in validate.stderr, validate.stderr
    assert validate.stderr.startswith(f"error: {config} line 3: not UTF-8 text")

    manifest = tmp_path / "job.yaml"
    manifest.write_text((REPO / "examples" / "finetune-tiny.yaml").read_text().replace("kind: FineTuneJob", "kind: [FineTuneJob]"))
    apply = kubetune("apply", "-f", str(manifest), "--runs-dir", str(tmp_path / "runs"))
    assert apply.returncode == 2 and "Traceback" not in apply.stderr, apply.stderr
    assert apply.stderr.startswith(f"error: {manifest}: kind must be one of FineTuneJob")
