"""operator/chaining.py's pure parts: which reference each resource waits on (the kopf indexes'
entries) and which changes of a referenced object wake what waits on it."""
from __future__ import annotations

from kubetune.operator.chaining import Changes, evaljob_waits_on, finetunejob_waits_on, modeldeployment_waits_on, waiting_on


def body(kind: str, name: str, spec: dict, status: dict | None = None, uid: str = "u1") -> dict:
    return {"kind": kind, "metadata": {"namespace": "team-a", "name": name, "uid": uid}, "spec": spec, "status": status or {}}


def test_a_finetunejob_waits_on_its_reference_until_it_resolved_it_or_ended():
    spec = {"fineTuneJob": {"name": "base"}}
    assert finetunejob_waits_on(body("FineTuneJob", "instruct", spec)) == {("team-a", "FineTuneJob", "base"): "instruct"}
    assert finetunejob_waits_on(body("FineTuneJob", "instruct", spec, {"phase": "Pending"})) == {("team-a", "FineTuneJob", "base"): "instruct"}
    for status in ({"baseModel": "pvc://c/m"}, {"workload": {"name": "instruct"}}, {"phase": "Failed"}, {"phase": "Succeeded"}):
        assert finetunejob_waits_on(body("FineTuneJob", "instruct", spec, status)) == {}, status  # {} clears its entry
    assert finetunejob_waits_on(body("FineTuneJob", "plain", {"model": {"source": "builtin://tiny"}})) == {}


def test_an_evaljob_waits_until_its_job_exists_and_a_modeldeployment_always_follows_both_references():
    spec = {"fineTuneJob": {"name": "base"}}
    assert evaljob_waits_on(body("EvalJob", "e", spec)) == {("team-a", "FineTuneJob", "base"): "e"}
    assert evaljob_waits_on(body("EvalJob", "e", spec, {"workload": {"name": "e"}})) == {}
    assert evaljob_waits_on(body("EvalJob", "e", {"model": {"source": "pvc://m"}})) == {}
    mdep = body("ModelDeployment", "bot", {"fineTuneJob": {"name": "base"}, "promotion": {"evalJob": "gate", "metric": "t/acc", "min": 0.5}},
                {"phase": "Ready"})
    assert modeldeployment_waits_on(mdep) == {("team-a", "FineTuneJob", "base"): "bot", ("team-a", "EvalJob", "gate"): "bot"}
    assert modeldeployment_waits_on(body("ModelDeployment", "bot", {"model": {"source": "pvc://m"}})) == {}


def test_a_phase_change_a_new_uid_first_sight_and_deletion_wake_other_status_writes_do_not():
    changes = Changes()
    pending = body("FineTuneJob", "base", {}, {"phase": "Pending"})
    assert changes.changed("FineTuneJob", "ADDED", pending)  # first seen: what waits for it to exist
    assert not changes.changed("FineTuneJob", "MODIFIED", body("FineTuneJob", "base", {}, {"phase": "Pending", "progress": {"step": 3}}))
    assert changes.changed("FineTuneJob", "MODIFIED", body("FineTuneJob", "base", {}, {"phase": "Succeeded"}))
    assert not changes.changed("FineTuneJob", "MODIFIED", body("FineTuneJob", "base", {}, {"phase": "Succeeded"}))
    assert changes.changed("FineTuneJob", "MODIFIED", body("FineTuneJob", "base", {}, {"phase": "Succeeded"}, uid="u2"))  # made again
    assert changes.changed("FineTuneJob", "DELETED", pending)
    assert changes.changed("FineTuneJob", "ADDED", pending)  # re-created after the deletion
    assert changes.changed("EvalJob", "ADDED", body("EvalJob", "base", {}, {"phase": "Pending"}))  # kinds kept apart


def test_waiting_on_reads_a_missing_key_or_index_as_nothing():
    assert waiting_on(None, ("team-a", "FineTuneJob", "x")) == set()
    assert waiting_on({}, ("team-a", "FineTuneJob", "x")) == set()
    assert waiting_on({("team-a", "FineTuneJob", "x"): ["a", "b", "a"]}, ("team-a", "FineTuneJob", "x")) == {"a", "b"}
