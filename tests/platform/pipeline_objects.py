"""Objects the EvalJob and ModelDeployment planners make for examples/eval-and-serve.yaml, with a
succeeded FineTuneJob to refer to: shared by the PSS and the chart RBAC tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune.operator.api import parse_object
from kubetune.operator.deployplanner import plan_deployment
from kubetune.operator.evalplanner import plan_eval

REPO = Path(__file__).resolve().parents[2]


def succeeded_finetunejob(name: str, namespace: str) -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / "llama3.1-8b-lora.yaml").read_text())
    doc["metadata"].update(name=name, namespace=namespace, uid="ftj-uid")
    doc["spec"]["output"] = {"source": f"pvc://outputs/{name}"}
    doc["status"] = {"phase": "Succeeded", "result": {"adapter": f"/mnt/output/{name}/adapter",
                                                       "checkpoint": f"/mnt/output/{name}/model", "finalLoss": 0.5}}
    return doc


def pipeline_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all((REPO / "examples" / "eval-and-serve.yaml").read_text()):
        if not doc or doc["kind"] not in {"EvalJob", "ModelDeployment"}:
            continue
        doc["metadata"]["uid"] = "uid-1"
        ref = (doc["spec"].get("fineTuneJob") or {}).get("name")
        ftj = succeeded_finetunejob(ref, doc["metadata"]["namespace"]) if ref else None
        obj = parse_object(doc, "example")
        objects += plan_eval(obj, ftj) if doc["kind"] == "EvalJob" else plan_deployment(obj, ftj)
    return objects
