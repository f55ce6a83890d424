"""The initializer (kubetune.operator.fetch): s3:// against a real S3 API on loopback (moto's
server, boto3) and hf:// with the real huggingface_hub client against a local endpoint serving a
small repository (tests/fake_hub.py says what that endpoint covers and what not). Skip marker,
re-download on change, and clear errors for a missing object, a wrong credential, a missing
revision and a missing repository."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fake_hub import FakeHub, FakeRepo
from s3_server import start_s3_server
from kubetune.operator.fetch import MARKER, FetchError, fetch, read_marker
from kubetune.operator.initializers import parse_remote, sources_document
from kubetune.operator.sources import SourceError

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

MODEL_FILES = {
    "models/tiny/config.json": b'{"model_type": "llama"}',
    "models/tiny/model.safetensors": os.urandom(4096),
    "models/tiny/tokenizer/tokenizer.json": b'{"version": "1.0"}',
    "models/tiny-2/config.json": b'{"not": "this one"}',  # a sibling prefix: never fetched for models/tiny
    "data/train.jsonl": b'{"instruction": "hi", "output": "hello"}\n',
}


@pytest.fixture(scope="module")
def s3():
    server_iter = start_s3_server()
    server = next(server_iter)
    client = server.client()
    client.create_bucket(Bucket="weights")
    for key, data in MODEL_FILES.items():
        client.put_object(Bucket="weights", Key=key, Body=data)
    try:
        yield server
    finally:
        next(server_iter, None)


def s3_source(uri: str, field: str = "spec.model.source"):
    source = parse_remote(uri, field)
    assert source is not None
    return source


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != MARKER}


# --- s3:// -------------------------------------------------------------------------------------


def test_s3_prefix_is_fetched_once_then_skipped_by_its_marker_and_refetched_when_changed(s3, tmp_path):
    source = s3_source("s3://weights/models/tiny")
    dest = Path(source.cache_path(str(tmp_path)))
    first = fetch(source, dest, endpoint=s3.endpoint, env=s3.env)
    assert not first.skipped
    assert files_under(dest) == {
        "config.json": MODEL_FILES["models/tiny/config.json"],
        "model.safetensors": MODEL_FILES["models/tiny/model.safetensors"],
        "tokenizer/tokenizer.json": MODEL_FILES["models/tiny/tokenizer/tokenizer.json"],
    }
    marker = read_marker(dest)
    assert marker["uri"] == "s3://weights/models/tiny" and set(marker["identity"]["etags"]) == {"config.json", "model.safetensors", "tokenizer/tokenizer.json"}
    stamp = (dest / "model.safetensors").stat().st_mtime_ns

    again = fetch(source, dest, endpoint=s3.endpoint, env=s3.env)
    assert again.skipped and (dest / "model.safetensors").stat().st_mtime_ns == stamp

    s3.client().put_object(Bucket="weights", Key="models/tiny/config.json", Body=b'{"model_type": "llama", "v": 2}')
    try:
        changed = fetch(source, dest, endpoint=s3.endpoint, env=s3.env)
        assert not changed.skipped and (dest / "config.json").read_bytes() == b'{"model_type": "llama", "v": 2}'
        assert not [p for p in tmp_path.rglob(".*tmp-*")] and not [p for p in tmp_path.rglob(".*old-*")]  # nothing half-written left
    finally:
        s3.client().put_object(Bucket="weights", Key="models/tiny/config.json", Body=MODEL_FILES["models/tiny/config.json"])


def test_s3_prefix_naming_one_object_fetches_that_file(s3, tmp_path):
    source = s3_source("s3://weights/data/train.jsonl", "spec.dataset.source")
    fetched = fetch(source, Path(source.cache_path(str(tmp_path))), endpoint=s3.endpoint, env=s3.env)
    assert files_under(fetched.path) == {"train.jsonl": MODEL_FILES["data/train.jsonl"]}


def test_s3_missing_objects_and_buckets_are_named(s3, tmp_path):
    with pytest.raises(FetchError, match=r"spec\.model\.source: s3://weights/models/huge: no objects under that prefix"):
        fetch(s3_source("s3://weights/models/huge"), tmp_path / "a", endpoint=s3.endpoint, env=s3.env)
    with pytest.raises(FetchError, match=r"spec\.model\.source: s3://nowhere/models: bucket nowhere does not exist"):
        fetch(s3_source("s3://nowhere/models"), tmp_path / "b", endpoint=s3.endpoint, env=s3.env)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_s3_task_file_is_that_one_object_and_a_folder_key_is_refused(s3, tmp_path):
    s3.client().put_object(Bucket="weights", Key="data/train.jsonl/shadow.jsonl", Body=b"{}\n")  # same name, as a folder too
    try:
        source = s3_source("s3://weights/data/train.jsonl", "spec.tasks[2].source")
        fetched = fetch(source, Path(source.cache_path(str(tmp_path))), endpoint=s3.endpoint, env=s3.env)
        assert files_under(fetched.path) == {"train.jsonl": MODEL_FILES["data/train.jsonl"]}  # the object only
        assert Path(source.local_path(str(tmp_path))).read_bytes() == MODEL_FILES["data/train.jsonl"]  # what the eval reads
    finally:
        s3.client().delete_object(Bucket="weights", Key="data/train.jsonl/shadow.jsonl")
    with pytest.raises(FetchError, match=r"spec\.tasks\[0\]\.source: s3://weights/models/tiny: no object models/tiny .*one JSONL object"):
        fetch(s3_source("s3://weights/models/tiny", "spec.tasks[0].source"), tmp_path / "folder", endpoint=s3.endpoint, env=s3.env)
    assert not (tmp_path / "folder").exists()


@pytest.mark.parametrize("keys", [
    {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "nope"},  # an unknown key
    "wrong-secret",  # the right key id with a wrong secret
])
def test_s3_wrong_credentials_are_refused_naming_the_secret(s3, tmp_path, keys):
    env = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": "not-the-secret"} if keys == "wrong-secret" else keys
    with pytest.raises(FetchError, match=r"refused the credentials \((InvalidAccessKeyId|SignatureDoesNotMatch)\).*spec\.secrets\.s3"):
        fetch(s3_source("s3://weights/models/tiny"), tmp_path / "x", endpoint=s3.endpoint, env=env)


def test_s3_without_credentials_says_where_they_come_from(s3, tmp_path, monkeypatch):
    for name in ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(FetchError, match=r"no S3 credentials; set spec\.secrets\.s3"):
        fetch(s3_source("s3://weights/models/tiny"), tmp_path / "x", endpoint=s3.endpoint, env={})


def test_kubetune_initialize_runs_the_plan_the_planner_writes(s3, tmp_path):
    """The init container's command, as a subprocess, on a plan like the ConfigMap's sources.yaml."""
    sources = [s3_source("s3://weights/models/tiny"), s3_source("s3://weights/data/train.jsonl", "spec.dataset.source")]
    plan = tmp_path / "sources.yaml"
    plan.write_text(yaml.safe_dump(sources_document(sources, str(tmp_path / "cache"), endpoint=s3.endpoint, region="us-east-1")))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **s3.env}
    argv = [sys.executable, "-m", "kubetune.cli", "initialize", "--plan", str(plan)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "spec.model.source: s3://weights/models/tiny fetched" in out.stderr
    assert (Path(sources[0].cache_path(str(tmp_path / "cache"))) / "model.safetensors").is_file()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    assert again.returncode == 0 and again.stderr.count("up to date") == 2

    wrong = subprocess.run(argv, capture_output=True, text=True, env={**env, "AWS_SECRET_ACCESS_KEY": "x"}, cwd=REPO)
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: spec.model.source: s3://weights/models/tiny")


# --- hf:// -------------------------------------------------------------------------------------

HF_FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": os.urandom(2048), "tokenizer/tokenizer.json": b"{}"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub(FakeRepo("acme/tiny", dict(HF_FILES), token="hf_right", tags={"v1": "0" * 40})) as server:
        yield server


def hf_env(hub: FakeHub, token: str = "hf_right") -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token}


def test_hf_repo_is_fetched_at_a_resolved_commit_then_skipped(hub, tmp_path):
    source = parse_remote("hf://acme/tiny", "spec.model.source")
    dest = Path(source.cache_path(str(tmp_path / "cache")))
    first = fetch(source, dest, env=hf_env(hub))
    assert not first.skipped and files_under(dest) == HF_FILES
    assert read_marker(dest)["identity"] == {"revision": hub.repo.commit}
    hub.requests.clear()

    again = fetch(source, dest, env=hf_env(hub))
    assert again.skipped
    assert hub.requests == ["GET /api/models/acme/tiny"]  # asked which commit main is, downloaded nothing

    pinned = parse_remote(f"hf://acme/tiny@{hub.repo.commit}", "spec.model.source")
    pinned_dest = Path(pinned.cache_path(str(tmp_path / "cache")))
    fetch(pinned, pinned_dest, env=hf_env(hub))
    hub.requests.clear()
    assert fetch(pinned, pinned_dest, env=hf_env(hub)).skipped and hub.requests == []  # a pinned commit needs no request

    hub.repo.files["config.json"] = b'{"model_type": "llama", "v": 2}'  # a new commit on main
    changed = fetch(source, dest, env=hf_env(hub))
    assert not changed.skipped and (dest / "config.json").read_bytes() == b'{"model_type": "llama", "v": 2}'
    assert read_marker(dest)["identity"] == {"revision": hub.repo.commit}


def test_hf_missing_revision_repository_and_wrong_token_are_named(hub, tmp_path):
    with pytest.raises(FetchError, match=r"spec\.model\.source: hf://acme/tiny@v9: the repository has no revision 'v9'"):
        fetch(parse_remote("hf://acme/tiny@v9", "spec.model.source"), tmp_path / "a", env=hf_env(hub))
    with pytest.raises(FetchError, match=r"hf://acme/nothing: no such repository on http://127\.0\.0\.1:\d+.*spec\.secrets\.hfToken"):
        fetch(parse_remote("hf://acme/nothing", "spec.model.source"), tmp_path / "b", env=hf_env(hub))
    with pytest.raises(FetchError, match=r"hf://acme/tiny: no such repository .*or it is private and the token"):
        fetch(parse_remote("hf://acme/tiny", "spec.model.source"), tmp_path / "c", env=hf_env(hub, token="hf_wrong"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("uri", "message"), [
    ("hf://just-a-name", r"not a Hub repository; write hf://ORG/NAME"),
    ("hf://org/name@", r"not a Hub repository"),
    ("s3://Bad_Bucket/x", r"names no valid bucket; write s3://BUCKET/PREFIX"),
])
def test_malformed_remote_sources_are_refused_naming_the_field(uri, message):
    with pytest.raises(SourceError, match=rf"spec\.model\.source: .*{message}"):
        parse_remote(uri, "spec.model.source")


def test_cache_paths_are_stable_and_distinct_per_uri():
    a, b = parse_remote("hf://acme/tiny", "f"), parse_remote("hf://acme/tiny@v1", "f")
    assert a.cache_path("/mnt/cache") == parse_remote("hf://acme/tiny", "g").cache_path("/mnt/cache")
    assert a.cache_path("/mnt/cache") != b.cache_path("/mnt/cache")
    assert a.cache_path("/mnt/cache").startswith("/mnt/cache/hf/acme--tiny-")
    assert json.dumps(a.cache_path("/c")).isascii()


# --- hf:// datasets --------------------------------------------------------------------------


def parquet_bytes(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


TRAIN = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
DATASET_FILES = {  # a Hub dataset repository's usual layout: sharded parquet under data/, a config folder
    "README.md": b"---\nlicense: mit\n---\n",
    "data/train-00000-of-00002.parquet": parquet_bytes(TRAIN[:3]),
    "data/train-00001-of-00002.parquet": parquet_bytes(TRAIN[3:]),
    "data/test-00000-of-00001.parquet": parquet_bytes([{"instruction": "t", "output": "u"}]),
    "small/train.jsonl": b'{"instruction": "s", "output": "t"}\n',
}


@pytest.fixture
def dataset_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub(FakeRepo("acme/chat", dict(DATASET_FILES), repo_type="dataset")) as server:
        yield server


def test_hf_datasets_are_fetched_from_the_dataset_repository_and_read_as_local_shards(dataset_hub, tmp_path):
    from kubetune.trainer.data.sources import has_split, load_records

    source = parse_remote("hf://acme/chat", "spec.dataset.source")
    assert (source.repo_type, source.subset) == ("dataset", None)
    dest = Path(source.cache_path(str(tmp_path / "cache")))
    assert not fetch(source, dest, env={"HF_ENDPOINT": dataset_hub.url}).skipped
    assert files_under(dest) == DATASET_FILES
    assert all(r.startswith(("GET /api/datasets/acme/chat", "HEAD /datasets/acme/chat", "GET /datasets/acme/chat")) for r in dataset_hub.requests)
    path = source.local_path(str(tmp_path / "cache"))
    assert [r.data for r in load_records(path, "train")] == TRAIN  # both shards, in order
    assert [r.data["instruction"] for r in load_records(path, "test")] == ["t"] and has_split(path, "test")
    assert fetch(source, dest, env={"HF_ENDPOINT": dataset_hub.url}).skipped  # the marker: nothing downloaded again

    config = parse_remote("hf://acme/chat/small", "spec.dataset.source")
    config_dest = Path(config.cache_path(str(tmp_path / "cache")))
    fetch(config, config_dest, env={"HF_ENDPOINT": dataset_hub.url})
    assert files_under(config_dest) == {  # only that config's files, and the card (read first: it may declare configs)
        "small/train.jsonl": DATASET_FILES["small/train.jsonl"], "README.md": DATASET_FILES["README.md"]}
    assert [r.data for r in load_records(config.local_path(str(tmp_path / "cache")), "train")] == [{"instruction": "s", "output": "t"}]


def test_hf_dataset_errors_name_the_field(dataset_hub, tmp_path):
    env = {"HF_ENDPOINT": dataset_hub.url}
    with pytest.raises(FetchError, match=r"spec\.dataset\.source: hf://acme/chat/nothere: the dataset has no folder 'nothere'"):
        fetch(parse_remote("hf://acme/chat/nothere", "spec.dataset.source"), tmp_path / "a", env=env)
    with pytest.raises(FetchError, match=r"spec\.dataset\.source: hf://acme/chat@v7: the repository has no revision 'v7'"):
        fetch(parse_remote("hf://acme/chat@v7", "spec.dataset.source"), tmp_path / "b", env=env)
    with pytest.raises(FetchError, match=r"spec\.model\.source: hf://acme/chat: no such repository"):  # a dataset is no model
        fetch(parse_remote("hf://acme/chat", "spec.model.source"), tmp_path / "c", env=env)
    with pytest.raises(SourceError, match=r"spec\.model\.source: .*write hf://ORG/NAME or"):
        parse_remote("hf://acme/chat/small", "spec.model.source")  # configs are for datasets
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("uri", "field", "message"), [
    ("hf://datasets/acme/chat", "spec.model.source", r"names a dataset repository; this field reads a model repository: hf://ORG/NAME"),
    ("hf://spaces/acme/demo", "spec.dataset.source", r"names a Space; this field reads a dataset repository"),
    ("hf://spaces/acme/demo", "spec.model.source", r"names a Space; this field reads a model repository"),
])
def test_hub_kind_prefixes_must_fit_the_field(uri, field, message):
    with pytest.raises(SourceError, match=rf"{re.escape(field)}: '{re.escape(uri)}' {message}"):
        parse_remote(uri, field)


def test_huggingface_hubs_own_form_hf_datasets_org_name_reads_the_same_repository(dataset_hub, tmp_path):
    """hf://datasets/ORG/NAME[/...] (huggingface_hub's URLs) is the dataset repository ORG/NAME, not
    a repository `datasets/ORG` with a config NAME."""
    env, cache = {"HF_ENDPOINT": dataset_hub.url}, str(tmp_path / "cache")
    for uri, field, subset, file in (("hf://datasets/acme/chat/small", "spec.dataset.source", "small", None),
                                     ("hf://datasets/acme/chat/small/train.jsonl", "spec.tasks[0].source", None, "small/train.jsonl")):
        source = parse_remote(uri, field)
        assert (source.repo, source.repo_type, source.subset, source.file) == ("acme/chat", "dataset", subset, file)
        fetch(source, Path(source.cache_path(cache)), env=env)
        local = Path(source.local_path(cache))
        assert (local / "train.jsonl" if subset else local).read_bytes() == DATASET_FILES["small/train.jsonl"]


def test_hf_task_file_is_that_one_file_of_the_dataset_repository(dataset_hub, tmp_path):
    env = {"HF_ENDPOINT": dataset_hub.url}
    source = parse_remote("hf://acme/chat/small/train.jsonl", "spec.tasks[0].source")
    assert (source.repo, source.repo_type, source.file) == ("acme/chat", "dataset", "small/train.jsonl")
    fetched = fetch(source, Path(source.cache_path(str(tmp_path / "cache"))), env=env)
    assert files_under(fetched.path) == {"small/train.jsonl": DATASET_FILES["small/train.jsonl"]}  # nothing else of the repository
    assert Path(source.local_path(str(tmp_path / "cache"))).read_bytes() == DATASET_FILES["small/train.jsonl"]
    assert fetch(source, fetched.path, env=env).skipped
    with pytest.raises(FetchError, match=r"spec\.tasks\[1\]\.source: hf://acme/chat/small/dev\.jsonl: the dataset repository has no file 'small/dev\.jsonl'"):
        fetch(parse_remote("hf://acme/chat/small/dev.jsonl", "spec.tasks[1].source"), tmp_path / "missing", env=env)
    assert not (tmp_path / "missing").exists()


CARD_ONLY = {  # splits declared only in the dataset card: no file is named after a split
    "README.md": (b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path:\n    - corpus/part-*.parquet\n"
                  b"  - split: validation\n    path: heldout/dev.jsonl\n- config_name: small\n  data_files: [mini/*.jsonl]\n---\n# Card\n"),
    "corpus/part-0.parquet": parquet_bytes(TRAIN[:2]),
    "corpus/part-1.parquet": parquet_bytes(TRAIN[2:]),
    "heldout/dev.jsonl": b'{"instruction": "d", "output": "e"}\n',
    "mini/one.jsonl": b'{"instruction": "m", "output": "n"}\n',
    "raw/unused.jsonl": b'{"instruction": "never", "output": "fetched"}\n',
}


@pytest.fixture
def card_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with FakeHub(FakeRepo("acme/card", dict(CARD_ONLY), repo_type="dataset")) as server:
        yield server


def test_hf_dataset_splits_declared_only_in_the_card_are_fetched_and_read_per_config(card_hub, tmp_path):
    from kubetune.trainer.data.sources import DatasetError, has_split, load_records

    env, cache = {"HF_ENDPOINT": card_hub.url}, str(tmp_path / "cache")
    source = parse_remote("hf://acme/card", "spec.dataset.source")
    dest = Path(source.cache_path(cache))
    fetch(source, dest, env=env)
    # the default config's files and the card: not the other config's, not the rest of the repository
    assert set(files_under(dest)) == {"README.md", "corpus/part-0.parquet", "corpus/part-1.parquet", "heldout/dev.jsonl"}
    path = source.local_path(cache)
    assert [r.data for r in load_records(path, "train")] == TRAIN
    assert [r.data for r in load_records(path, "validation")] == [{"instruction": "d", "output": "e"}] and has_split(path, "validation")
    with pytest.raises(DatasetError, match=r"config 'default' of its dataset card: no split 'test'; its splits: train, validation"):
        load_records(path, "test")

    small = parse_remote("hf://acme/card/small", "spec.dataset.source")
    fetch(small, Path(small.cache_path(cache)), env=env)
    assert set(files_under(Path(small.cache_path(cache)))) == {"README.md", "mini/one.jsonl"}
    assert not Path(small.local_path(cache)).exists()  # a config of the card, not a folder: the reader asks the card
    assert [r.data for r in load_records(small.local_path(cache), "train")] == [{"instruction": "m", "output": "n"}]

    with pytest.raises(FetchError, match=r"spec\.dataset\.source: hf://acme/card/large: the dataset has no folder 'large' \(its config\) "
                                         r"and its card declares no config 'large' \(its configs: default, small\)"):
        fetch(parse_remote("hf://acme/card/large", "spec.dataset.source"), tmp_path / "large", env=env)
    folder = parse_remote("hf://acme/card/raw", "spec.dataset.source")  # a folder the card does not declare: read as a folder
    fetch(folder, Path(folder.cache_path(cache)), env=env)
    assert [r.data["instruction"] for r in load_records(folder.local_path(cache), "unused")] == ["never"]


def test_hf_dataset_card_without_a_default_config_is_refused_at_fetch_naming_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    files = {"README.md": b"---\nconfigs:\n- config_name: en\n  data_files: en.jsonl\n- config_name: fr\n  data_files: fr.jsonl\n---\n",
             "en.jsonl": b'{"a": 1}\n', "fr.jsonl": b'{"a": 2}\n'}
    with FakeHub(FakeRepo("acme/langs", files, repo_type="dataset")) as server:
        with pytest.raises(FetchError, match=r"spec\.dataset\.source: hf://acme/langs: the dataset card declares the configs en, fr and none "
                                             r"is the default; name one: hf://ORG/NAME/CONFIG"):
            fetch(parse_remote("hf://acme/langs", "spec.dataset.source"), tmp_path / "x", env={"HF_ENDPOINT": server.url})
        fr = parse_remote("hf://acme/langs/fr", "spec.dataset.source")
        fetch(fr, Path(fr.cache_path(str(tmp_path))), env={"HF_ENDPOINT": server.url})
        assert set(files_under(Path(fr.cache_path(str(tmp_path))))) == {"README.md", "fr.jsonl"}
    assert not (tmp_path / "x").exists()
