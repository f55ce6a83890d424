"""Users' files and manifests must not be weapons (issue 29): YAML alias bombs are refused by every
loader of user files (findings 9), and env names that redirect credentials or endpoints are refused
in all three kinds unless the platform allows them (finding 10)."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.operator.api import ManifestError, parse_object
from kubetune.safe_yaml import MAX_YAML_VALUES, YamlLimitError, safe_load, safe_load_all

REPO = Path(__file__).resolve().parents[2]

# ~540 bytes: 9 levels of 9 aliases each expand to 9**9 (387 million) strings.
BOMB = "\n".join(
    ["a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]"]
    + [f"{b}: &{b} [*{a},*{a},*{a},*{a},*{a},*{a},*{a},*{a},*{a}]" for a, b in zip("abcdefgh", "bcdefghi")]
) + "\n"


def test_an_alias_bomb_is_refused_fast_and_ordinary_anchors_still_load():
    assert len(BOMB) < 600
    with pytest.raises(YamlLimitError, match="anchors and aliases"):
        safe_load(BOMB, "bomb.yaml")
    with pytest.raises(YamlLimitError):
        safe_load_all("x: 1\n---\n" + BOMB, "bomb.yaml")
    with pytest.raises(YamlLimitError, match="limit"):
        safe_load("x: " + "y" * (4 * 2**20 + 1))
    merged = safe_load("base: &base {lr: 0.1, steps: 5}\nrun: {<<: *base, steps: 9}\n")
    assert merged["run"] == {"lr": 0.1, "steps": 9}
    assert len(safe_load("[" + ",".join(["1"] * (MAX_YAML_VALUES - 10)) + "]")) == MAX_YAML_VALUES - 10


@pytest.mark.parametrize("command", [["validate"], ["apply", "--no-progress", "-f"], ["run", "generate", "--config"]])
def test_the_cli_refuses_an_alias_bomb_in_seconds(tmp_path, command):
    """kubetune validate / apply / run read the file through the bounded loader: a clear error, exit 2."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    done = subprocess.run(
        [sys.executable, "-m", "kubetune", *command, str(bomb)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and "aliases" in done.stderr


def finetune() -> dict:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {
            "recipe": "lora_finetune",
            "model": {"source": "builtin://tiny"},
            "dataset": {"source": "builtin://tiny_instruct", "format": "alpaca"},
            "secrets": {"hfToken": {"name": "hf", "key": "token"}},
        },
    }


def others() -> list[dict]:
    return [doc for doc in yaml.safe_load_all((REPO / "examples" / "eval-and-serve.yaml").read_text())]


@pytest.mark.parametrize("name", ["HF_ENDPOINT", "HTTPS_PROXY", "http_proxy", "ALL_PROXY", "AWS_ENDPOINT_URL",
                                  "AWS_ENDPOINT_URL_S3", "REQUESTS_CA_BUNDLE", "WANDB_BASE_URL"])
def test_env_names_that_redirect_credentials_are_refused_in_every_kind(name, monkeypatch):
    monkeypatch.delenv("KUBETUNE_ALLOWED_ENV", raising=False)
    for doc in [finetune(), *others()]:
        doc = copy.deepcopy(doc)
        doc["spec"]["env"] = [{"name": "HF_HUB_CACHE", "value": "/tmp/hub"}, {"name": name, "value": "https://attacker.example"}]
        with pytest.raises(ManifestError) as err:
            parse_object(doc, f"{doc['kind']} demo")
        message = str(err.value)
        assert "spec.env" in message and name in message and "KUBETUNE_ALLOWED_ENV" in message, message


def test_the_platform_can_allow_a_redirecting_name(monkeypatch):
    doc = finetune()
    doc["spec"]["env"] = [{"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"}, {"name": "HF_ENDPOINT", "value": "https://hf.corp"}]
    monkeypatch.setenv("KUBETUNE_ALLOWED_ENV", "*_PROXY, HF_ENDPOINT")
    job = parse_object(doc)
    assert [e.name for e in job.spec.env] == ["HTTPS_PROXY", "HF_ENDPOINT"]
    monkeypatch.setenv("KUBETUNE_ALLOWED_ENV", "HTTPS_PROXY")
    with pytest.raises(ManifestError, match="HF_ENDPOINT"):
        parse_object(doc)


def test_admission_refuses_a_redirecting_env_name(monkeypatch):
    from kubetune.operator.handlers import admission_error

    monkeypatch.delenv("KUBETUNE_ALLOWED_ENV", raising=False)
    doc = finetune()
    doc["spec"]["env"] = [{"name": "HF_ENDPOINT", "value": "https://attacker.example"}]
    assert "HF_ENDPOINT" in (admission_error(doc) or "")
    doc["spec"]["env"] = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    assert admission_error(doc) is None
