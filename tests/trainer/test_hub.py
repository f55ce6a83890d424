"""Models by name: Hub ids resolved through huggingface_hub's cache, `kubetune download` against a
local endpoint, HF_HUB_OFFLINE honoured, and adapters that record a base PEFT can load.

The endpoint (HubEmulator below) serves one small repo, the builtin tiny model's files, over real
HTTP with the parts of the Hub's API that huggingface_hub's `snapshot_download` (2.x) uses for a
public model repo: `GET /api/models/{repo}/revision/{rev}` (commit sha + file list), `GET
/api/models/{repo}/tree/{rev}?recursive=true` (paths, sizes, git blob ids) and `HEAD`/`GET
/{repo}/resolve/{rev}/{file}` (ETag, X-Repo-Commit, Content-Length, the bytes), with files stored
as plain git blobs. It does not cover authentication and gated repos, LFS/Xet storage, redirects
to a CDN, pagination, or ranges/resumed downloads.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kubetune.trainer.hub import HubError, base_model_reference, is_hub_id, parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (what the Hub reports as `oid` and ETag of non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubEmulator:
    """Serves the files of `folder` as the model repo `repo_id` at revision main (= COMMIT)."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.folder = repo_id, folder
        self.files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self.requests: list[tuple[str, str]] = []
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                emulator.requests.append(("HEAD", self.path))
                self._serve(body=False)

            def do_GET(self):
                emulator.requests.append(("GET", self.path))
                self._serve(body=True)

            def _serve(self, body: bool):
                path = self.path.split("?")[0]
                info_prefix = f"/api/models/{emulator.repo_id}/revision/"
                tree_prefix = f"/api/models/{emulator.repo_id}/tree/"
                resolve_prefix = f"/{emulator.repo_id}/resolve/"
                if path.startswith(tree_prefix) and path[len(tree_prefix):] in ("main", COMMIT):
                    entries = [{"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                               for name, data in ((n, (emulator.folder / n).read_bytes()) for n in emulator.files)]
                    return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
                if path.startswith(info_prefix) and path[len(info_prefix):] in ("main", COMMIT):
                    payload = json.dumps({
                        "id": emulator.repo_id, "modelId": emulator.repo_id, "sha": COMMIT, "private": False,
                        "siblings": [{"rfilename": name} for name in emulator.files],
                    }).encode()
                    return self._send(200, payload, {"Content-Type": "application/json"}, body)
                if path.startswith(resolve_prefix):
                    revision, _, name = path[len(resolve_prefix):].partition("/")
                    if revision in ("main", COMMIT) and name in emulator.files:
                        data = (emulator.folder / name).read_bytes()
                        return self._send(200, data, {"ETag": f'"{git_blob_id(data)}"', "X-Repo-Commit": COMMIT}, body)
                self._send(404, b'{"error": "Repository not found"}',
                           {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}, body)

            def _send(self, status, payload, headers, body):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def kubetune(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture
def hub_env(tmp_path, kubetune_cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", KUBETUNE_CACHE_DIR=str(kubetune_cache_dir))
    return env


def test_hub_ids_are_recognised_and_local_paths_win(tmp_path, monkeypatch):
    assert parse_hub_id("hf://meta-llama/Llama-3.2-1B@v1.0") == ("meta-llama/Llama-3.2-1B", "v1.0")
    assert parse_hub_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    assert is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("hf://org/name")
    assert not any(is_hub_id(p) for p in ("/models/x", "./org/name", "builtin://tiny", "s3://b/k", "a/b/c"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # an existing local folder is a folder


def test_download_then_offline_resolution_from_the_cache(tmp_path, tiny_model_dir, hub_env):
    with HubEmulator("acme/tiny", tiny_model_dir) as hub:
        env = {**hub_env, "HF_ENDPOINT": hub.url}
        done = kubetune("download", "acme/tiny", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        snapshot = Path(done.stdout.strip().splitlines()[-1])
        assert snapshot.is_relative_to(tmp_path / "hf-home") and snapshot.name == COMMIT
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (snapshot / name).read_bytes() == (tiny_model_dir / name).read_bytes()
        assert ("GET", f"/api/models/acme/tiny/revision/main") in hub.requests

        copy = kubetune("download", "acme/tiny", "--output-dir", str(tmp_path / "local"), env=env, cwd=tmp_path)
        assert copy.returncode == 0, copy.stderr
        assert (tmp_path / "local" / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()

        missing = kubetune("download", "acme/nope", env=env, cwd=tmp_path)
        assert missing.returncode == 2 and "acme/nope: no such repository" in missing.stderr

    # The endpoint is gone: with HF_HUB_OFFLINE=1 the model id resolves from the cache alone.
    offline = {**hub_env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"}
    generated = kubetune("run", "generate", "--config", "tiny_generate", "model.path=acme/tiny", "max_new_tokens=4",
                         "device=cpu", env=offline, cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    reference = kubetune("run", "generate", "--config", "tiny_generate", "max_new_tokens=4", "device=cpu",
                         env=offline, cwd=tmp_path)
    assert generated.stdout == reference.stdout  # the same model as builtin://tiny
    absent = kubetune("run", "generate", "--config", "tiny_generate", "model.path=hf://acme/other", env=offline, cwd=tmp_path)
    assert absent.returncode == 2
    assert "model hf://acme/other: not a local folder, and HF_HUB_OFFLINE is set" in absent.stderr
    assert "kubetune download acme/other" in absent.stderr


def test_resolve_hub_model_error_is_a_kubetune_error(monkeypatch, tmp_path):
    from kubetune.trainer.checkpoint import resolve_local_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubError, match="model org/absent: not a local folder"):
        resolve_local_dir("org/absent")


def test_adapter_records_a_base_peft_loads(tmp_path, tiny_model_dir, monkeypatch):
    """AutoPeftModelForCausalLM reads base_model_name_or_path: builtin://tiny and relative folders are
    recorded as absolute folders, so the adapter loads from anywhere."""
    import shutil

    import torch
    peft = pytest.importorskip("peft")
    from lora_fixtures import LoRA, randomize_adapters

    from kubetune.trainer.checkpoint import load_pretrained
    from kubetune.trainer.peft import apply_lora, save_adapter

    assert base_model_reference("builtin://tiny") == str(tiny_model_dir)
    assert base_model_reference("hf://acme/tiny@main") == "acme/tiny"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    model = apply_lora(load_pretrained("base"), LoRA(target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")  # relative, as a user writes it
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    monkeypatch.chdir(tmp_path / "adapter")  # somewhere else: the relative name would not resolve here
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        expected = model.eval()(ids)
        got = theirs(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
