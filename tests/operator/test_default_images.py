"""The trainer image of a FineTuneJob that names none comes from the operator's settings (the
Helm chart's values, through KUBETUNE_DEFAULT_TRAINER_IMAGE), not from a constant in the API."""
from __future__ import annotations

import pytest

from kubetune.operator.api import parse_object
from kubetune.operator.api.common import DEFAULT_SERVER_IMAGE, DEFAULT_TRAINER_IMAGE
from kubetune.operator.handlers import OperatorConfig
from kubetune.operator.main import default_images
from kubetune.operator.planner import ClusterInfo, plan
from ophelpers import eventually, manifest

JOBS = "batch/v1/jobs"


def job_image(children: list[dict]) -> str:
    workload = next(c for c in children if c["kind"] in {"Job", "PyTorchJob"})
    pod_specs = [workload["spec"]["template"]["spec"]] if workload["kind"] == "Job" else [
        r["template"]["spec"] for r in workload["spec"]["pytorchReplicaSpecs"].values()]
    (image,) = {c["image"] for spec in pod_specs for c in spec["containers"]}
    return image


@pytest.mark.parametrize("has_pytorchjob", [False, True])
def test_planner_uses_the_clusters_default_only_when_the_job_names_no_image(has_pytorchjob):
    doc = manifest()
    doc["metadata"]["uid"] = "uid-1"
    doc["spec"].pop("image", None)
    job = parse_object(doc, "test")
    assert job.spec.image is None  # the API leaves it empty: the CRD has no default either
    cluster = ClusterInfo(has_pytorchjob=has_pytorchjob, trainer_image="registry.example/ml/trainer:cu128")
    assert job_image(plan(job, cluster)) == "registry.example/ml/trainer:cu128"
    assert job_image(plan(job, ClusterInfo(has_pytorchjob=has_pytorchjob))) == DEFAULT_TRAINER_IMAGE
    doc["spec"]["image"] = "mine/trainer:1"
    assert job_image(plan(parse_object(doc, "test"), cluster)) == "mine/trainer:1"


def test_operator_reads_default_images_from_its_environment():
    env = {"KUBETUNE_DEFAULT_TRAINER_IMAGE": "r/trainer:2", "KUBETUNE_DEFAULT_SERVER_IMAGE": "r/server:2"}
    config = OperatorConfig(**default_images(env))
    assert (config.trainer_image, config.server_image) == ("r/trainer:2", "r/server:2")
    config = OperatorConfig(**default_images({"KUBETUNE_DEFAULT_TRAINER_IMAGE": ""}))
    assert (config.trainer_image, config.server_image) == (DEFAULT_TRAINER_IMAGE, DEFAULT_SERVER_IMAGE)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_running_operator_gives_its_default_image_to_a_job_without_one(api, operator):
    doc = manifest()
    doc["spec"].pop("image", None)
    async with operator(trainer_image="registry.example/ml/trainer:cu128"):
        await api.create_ftj(doc)
        (job,) = await eventually(lambda: api.children(JOBS), what="the Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/ml/trainer:cu128"
    assert "image" not in api.ftj("tiny")["spec"]  # spec stays the user's: GitOps sees no drift
