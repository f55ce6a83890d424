"""Experiment trackers write with the libraries' own writers, and the libraries' own readers get the
values back: TensorBoard's event reader, MLflow's client on the local store, W&B's offline run files."""
from __future__ import annotations

import builtins
import glob
import json

import pytest

from kubetune.trainer.training.trackers import TrackerError, flatten, start_trackers

STEPS = {1: {"train/loss": 2.5, "train/lr": 1e-3}, 2: {"train/loss": 2.25, "train/lr": 5e-4}, 3: {"eval/loss": 2.0}}
CONFIG = {"model": {"path": "builtin://tiny"}, "optimizer": {"lr": 1e-3, "betas": [0.9, 0.99]}, "loggers": ["tensorboard"]}


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_run(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("kubetune")
    (run,) = client.search_runs([experiment.experiment_id])
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics}
    return run, history


def wandb_records(output_dir) -> list:
    """The records of the offline run file, parsed with wandb's own protobufs. The file is W&B's
    7-byte header (":W&B", magic, version) followed by a LevelDB-format log: 32 KiB blocks of
    chunks, each with a 7-byte header (crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(output_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, chunks = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def test_all_three_trackers_record_config_metrics_and_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # set by the tracker for its local default
    trackers = start_trackers(["tensorboard", "mlflow", "wandb"], tmp_path, CONFIG, run_name="unit")
    for step, values in STEPS.items():
        trackers.log(values, step)
    trackers.summary({"finalLoss": 2.25, "evalLoss": 2.0, "steps": 3, "checkpoint": "/out/model"})
    trackers.close()

    expected: dict[str, dict[int, float]] = {}
    for step, values in STEPS.items():
        for key, value in values.items():
            expected.setdefault(key, {})[step] = value

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert {k: {s: pytest.approx(v) for s, v in steps.items()} for k, steps in expected.items()} == scalars

    run, history = mlflow_run(tmp_path / "mlruns")
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert run.data.params["optimizer.lr"] == "0.001" and run.data.params["optimizer.betas"] == "[0.9, 0.99]"
    assert {k: history[k] for k in expected} == {k: {s: pytest.approx(v) for s, v in steps.items()} for k, steps in expected.items()}
    assert history["final/finalLoss"] == {0: 2.25} and run.data.tags["final.checkpoint"] == "/out/model"

    records = wandb_records(tmp_path)
    logged = {}
    for record in records:
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            logged[int(items["_step"])] = {k: float(v) for k, v in items.items() if not k.startswith("_")}
    assert logged == {step: pytest.approx(values) for step, values in STEPS.items()}
    (run_record,) = [record.run for record in records if record.HasField("run")]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert run_record.display_name == "unit" and config["optimizer"] == CONFIG["optimizer"]
    summaries = [item for record in records if record.HasField("summary") for item in record.summary.update]
    assert {item.key: json.loads(item.value_json) for item in summaries}["final/finalLoss"] == 2.25


def test_a_missing_tracker_library_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    with pytest.raises(TrackerError, match=r"loggers: mlflow needs the mlflow-skinny \(or mlflow\) package: "
                                           r"pip install 'kubetune\[tracking\]'"):
        start_trackers(["tensorboard", "mlflow"], tmp_path, CONFIG)


def test_only_rank_zero_tracks_and_config_is_flattened(tmp_path):
    assert start_trackers(["tensorboard"], tmp_path, CONFIG, enabled=False).trackers == []
    assert not (tmp_path / "tensorboard").exists()
    assert flatten(CONFIG) == {"model.path": "builtin://tiny", "optimizer.lr": 1e-3, "optimizer.betas": "[0.9, 0.99]",
                               "loggers": '["tensorboard"]'}
