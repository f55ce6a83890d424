"""The pure pieces of status: phases from Job states, progress from Prometheus text, results
from the termination message, and conditions that follow the API conventions."""
from __future__ import annotations

import datetime as dt
import json

import yaml
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from kubetune.operator.handlers import admission_error
from kubetune.operator.status import (
    WorkloadState,
    conditions_for,
    job_state,
    next_status,
    parse_result,
    pod_problem,
    progress_from_metrics,
    parse_metrics,
    set_condition,
)
from ophelpers import REPO

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def trainer_metrics(**values: float) -> str:
    """Prometheus text as the trainer's prometheus_client would serve it."""
    registry = CollectorRegistry()
    for name, value in values.items():
        Gauge(f"kubetune_train_{name}", name, registry=registry).set(value)
    return generate_latest(registry).decode()


def test_progress_percent_and_eta_follow_the_mean_step_time():
    text = trainer_metrics(step=25, total_steps=100, loss=1.5, tokens_per_second=900.0, epoch=1, learning_rate=2e-4)
    now = T0 + dt.timedelta(seconds=50)  # 2 s per step so far, 75 steps left -> 150 s
    progress = progress_from_metrics(parse_metrics(text), started_at=T0, now=now)
    assert progress["step"] == 25 and progress["totalSteps"] == 100 and progress["epoch"] == 1
    assert progress["percent"] == 25.0
    assert progress["eta"] == "2m30s"
    assert progress["loss"] == 1.5 and progress["learningRate"] == 2e-4 and progress["tokensPerSecond"] == 900.0


def test_result_comes_from_the_last_json_line_and_keeps_extra_keys():
    summary = {"finalLoss": 0.9, "evalLoss": None, "steps": 30, "checkpoint": "out/model", "adapter": None, "tokensPerSecond": 12.5, "peakMemoryBytes": 7}
    message = "some log line\n" + json.dumps(summary)
    assert parse_result(message) == {"finalLoss": 0.9, "steps": 30, "checkpoint": "out/model", "tokensPerSecond": 12.5, "metrics": {"peakMemoryBytes": 7}}
    assert parse_result("Traceback: boom") is None and parse_result(None) is None


def test_job_states_map_to_phases_with_actionable_messages():
    assert job_state({"status": {"active": 2}}, name="x", queue_name=None).phase == "Running"
    done = job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, name="x", queue_name=None)
    assert done.phase == "Succeeded"
    deadline = job_state({"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}}, name="x", queue_name=None)
    assert deadline.phase == "Failed" and "activeDeadlineSeconds" in deadline.message
    queued = job_state({"spec": {"suspend": True}, "status": {}}, name="x", queue_name="q")
    assert queued.phase == "Queued" and "q" in queued.message
    suspended = job_state({"spec": {"suspend": True}, "status": {"startTime": "t"}}, name="x", queue_name="q")
    assert suspended.phase == "Suspended"
    assert job_state({"spec": {}, "status": {}}, name="x", queue_name=None).phase == "Pending"


def test_a_bad_image_is_named_in_the_pending_message():
    pods = [{"status": {"containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff"}}}]}}]
    problem = pod_problem(pods, "ghcr.io/x/trainer:bad")
    assert problem.reason == "ImagePullBackOff" and "ghcr.io/x/trainer:bad" in problem.message and "spec.image" in problem.message


def test_condition_transition_time_moves_only_when_the_status_flips():
    conds = set_condition([], "Running", False, "NotRunning", "-", now="t1", generation=1)
    same = set_condition(conds, "Running", False, "NotRunning", "still", now="t2", generation=1)
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["message"] == "still"
    flipped = set_condition(same, "Running", True, "PodsRunning", "1 pod", now="t3", generation=2)
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["observedGeneration"] == 2
    full = conditions_for([], WorkloadState("Running", "PodsRunning", "1 pod"), now="t", generation=1)
    assert [(c["type"], c["status"]) for c in full] == [
        ("Created", "True"), ("Running", "True"), ("Succeeded", "False"), ("Failed", "False"), ("Suspended", "False"),
        ("Stalled", "False"),
    ]


def test_next_status_reports_only_changes_and_one_event_per_transition():
    running = WorkloadState("Running", "PodsRunning", "1 pod", started=True)
    changes, event = next_status({"phase": "Pending"}, running, None, trainer_metrics(step=1, total_steps=4), generation=1, now=T0)
    assert changes["phase"] == "Running" and changes["startTime"] and changes["progress"]["percent"] == 25.0
    assert event[:2] == ("Normal", "Running")
    again, event = next_status({**{"phase": "Pending"}, **changes}, running, None, None, generation=1, now=T0)
    assert again == {} and event is None


def test_admission_names_the_bad_field_and_passes_the_examples():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "FineTuneJob":
                assert admission_error(doc) is None, path
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["spec"]["config"]["optimizer"]["lrr"] = 1
    assert "optimizer.lrr" in admission_error(doc) and "spec.config" in admission_error(doc)
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["spec"]["resources"]["nodes"] = "two"
    assert "spec.resources.nodes" in admission_error(doc)


def test_a_finished_run_reports_the_summary_step_and_loss_even_if_the_last_scrape_missed_them():
    done = WorkloadState("Succeeded", "TrainingComplete", "done", started=True)
    rank0 = {"status": {"containerStatuses": [{"state": {"terminated": {"message": json.dumps({"finalLoss": 0.7, "steps": 30})}}}]}}
    old = {"phase": "Running", "progress": {"step": 29, "totalSteps": 30, "loss": 0.8, "percent": 96.7}}
    changes, event = next_status(old, done, rank0, None, generation=1, now=T0)
    assert changes["progress"]["step"] == 30 and changes["progress"]["loss"] == 0.7 and changes["progress"]["percent"] == 100.0
    assert changes["result"] == {"finalLoss": 0.7, "steps": 30}
    assert event[:2] == ("Normal", "Succeeded")
