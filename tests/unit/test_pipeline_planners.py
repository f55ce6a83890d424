"""The EvalJob and ModelDeployment planners and the reference rules they share (pure functions)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml

from kubetune.errors import KubetuneError
from kubetune.operator.api import parse_object
from kubetune.operator.deployplanner import MODEL_ID_ANNOTATION, SPEC_HASH_ANNOTATION, plan_deployment
from kubetune.operator.evalplanner import plan_eval
from kubetune.operator.pipeline_status import deployment_state, eval_result
from kubetune.operator.references import (
    PipelineReferenceError,
    dependency_order,
    finetune_wait,
    promotion_metric_error,
    promotion_verdict,
)
from kubetune.trainer.config import resolve_config

REPO = Path(__file__).resolve().parents[2]
K8S = "1.30.0"
VLLM = yaml.safe_load((Path(__file__).parent / "data" / "vllm_cli_flags.yaml").read_text())


def ftj_body(result=None, phase="Succeeded", output="pvc://outputs/runs/demo", uid="ftj-uid-1"):
    doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid=uid)
    doc["spec"]["model"]["source"] = "pvc://models/llama"
    if output:
        doc["spec"]["output"] = {"source": output}
    doc["status"] = {"phase": phase, "result": result if result is not None else
                     {"adapter": "/mnt/output/runs/demo/adapter", "checkpoint": "/mnt/output/runs/demo/model", "finalLoss": 0.5}}
    return doc


def evj(**spec):
    doc = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob",
           "metadata": {"name": "demo-eval", "namespace": "ml", "uid": "evj-uid"},
           "spec": {"fineTuneJob": {"name": "demo"}, "baseline": True, "resources": {"gpusPerNode": 1},
                    "tasks": [{"name": "facts", "type": "multiple_choice", "source": "builtin://tiny_instruct_mc",
                               "options": {"context_field": "question"}}], **spec}}
    if "model" in spec:
        del doc["spec"]["fineTuneJob"]
    return parse_object(doc, "test")


def mdep(**spec):
    doc = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "ModelDeployment",
           "metadata": {"name": "bot", "namespace": "ml", "uid": "mdep-uid"},
           "spec": {"fineTuneJob": {"name": "demo"}, "replicas": 2, "resources": {"gpusPerNode": 1}, **spec}}
    if "model" in spec:
        del doc["spec"]["fineTuneJob"]
    return parse_object(doc, "test")


def planned(dep, ftj=None):
    """The ModelDeployment's children by kind."""
    return {child["kind"]: child for child in plan_deployment(dep, ftj)}


# ---- EvalJob ----------------------------------------------------------------------------------


def test_evaljob_of_a_lora_finetunejob_evaluates_base_plus_adapter_and_the_baseline_first():
    config_map, job = plan_eval(evj(), ftj_body())
    for obj in (config_map, job):
        kubernetes_validate.validate(obj, K8S, strict=True)
        assert obj["metadata"]["ownerReferences"][0] == {"apiVersion": "kubetune.dev/v1alpha1", "kind": "EvalJob", "name": "demo-eval",
                                                         "uid": "evj-uid", "controller": True, "blockOwnerDeletion": True}
    model = resolve_config("eval", yaml.safe_load(config_map["data"]["config.yaml"]))
    baseline = resolve_config("eval", yaml.safe_load(config_map["data"]["baseline.yaml"]))
    # The FineTuneJob's summary names pod paths; its claims are mounted where its trainer had them.
    assert (model.model.path, model.adapter) == ("/mnt/model/llama", "/mnt/output/runs/demo/adapter")
    assert (baseline.model.path, baseline.adapter) == ("/mnt/model/llama", None)
    assert model.tasks[0].path == "builtin://tiny_instruct_mc" and baseline.tasks == model.tasks
    assert baseline.output_dir == model.output_dir + "/baseline"
    pod = job["spec"]["template"]["spec"]
    (init,), (main,) = pod["initContainers"], pod["containers"]
    assert init["command"] == ["kubetune", "run", "eval", "--config", "/etc/kubetune/baseline.yaml"]
    assert main["command"] == ["kubetune", "run", "eval", "--config", "/etc/kubetune/config.yaml"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models": True, "outputs": True}
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in main["volumeMounts"]}
    assert mounts["/mnt/model"] and mounts["/mnt/output"] and not mounts["/mnt/results"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert main["securityContext"]["allowPrivilegeEscalation"] is False and main["securityContext"]["readOnlyRootFilesystem"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert job["spec"]["completions"] == 1 and job["spec"]["template"]["metadata"]["labels"]["kubetune.dev/evaljob"] == "demo-eval"


def test_evaljob_of_a_full_finetunejob_uses_its_model_and_kueue_suspends_the_job():
    result = {"checkpoint": "/mnt/output/runs/demo/model", "adapter": None}
    config_map, job = plan_eval(evj(queueName="eval-queue"), ftj_body(result))
    model = resolve_config("eval", yaml.safe_load(config_map["data"]["config.yaml"]))
    assert (model.model.path, model.adapter) == ("/mnt/output/runs/demo/model", None)
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "eval-queue"


def test_evaljob_refusals_name_the_field():
    with pytest.raises(KubetuneError, match=r"spec.baseline: there is nothing to compare"):
        plan_eval(evj(model={"source": "builtin://tiny"}))
    with pytest.raises(KubetuneError, match=r"emptyDir.*spec.output.source: pvc://"):
        plan_eval(evj(), ftj_body(output=None))
    with pytest.raises(KubetuneError, match=r"spec.config.tasks: set by spec.tasks"):
        plan_eval(evj(config={"tasks": []}), ftj_body())
    with pytest.raises(KubetuneError, match=r"(?s)spec.config: .*batch_sise"):
        plan_eval(evj(config={"batch_sise": 4}), ftj_body())


def test_eval_result_shows_both_models_and_the_difference():
    tuned = json.dumps({"mainMetric": "facts/acc=0.9", "metrics": {"facts/acc": 0.9, "facts/acc_norm": 0.8}})
    base = "some log line\n" + json.dumps({"mainMetric": "facts/acc=0.25", "metrics": {"facts/acc": 0.25, "facts/acc_norm": 0.3}})
    result = eval_result(tuned, base)
    assert result["metrics"] == {"facts/acc": 0.9, "facts/acc_norm": 0.8}
    assert result["baseline"] == {"facts/acc": 0.25, "facts/acc_norm": 0.3}
    assert result["delta"] == {"facts/acc": pytest.approx(0.65), "facts/acc_norm": pytest.approx(0.5)}
    assert result["mainMetric"] == "facts/acc=0.9 (+0.65 vs baseline)" and result["baselineMainMetric"] == "facts/acc=0.25"
    assert eval_result(tuned) == {"metrics": {"facts/acc": 0.9, "facts/acc_norm": 0.8}, "mainMetric": "facts/acc=0.9"}
    assert eval_result("Traceback: boom") is None


# ---- references ------------------------------------------------------------------------------


def test_finetunejob_references_wait_fail_or_resolve():
    assert finetune_wait("demo", ftj_body(), None) is None
    running = finetune_wait("demo", ftj_body(phase="Running"), "ftj-uid-1")
    assert (running.phase, running.reason) == ("Pending", "WaitingForFineTuneJob") and "demo" in running.message
    failed_body = ftj_body(phase="Failed")
    failed_body["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "OOM in step 3"}]
    failed = finetune_wait("demo", failed_body, None)
    assert (failed.phase, failed.reason) == ("Failed", "FineTuneJobFailed") and "OOM in step 3" in failed.message
    never_seen = finetune_wait("demo", None, None)  # `kubectl apply -f folder/` may create the EvalJob first
    assert (never_seen.phase, never_seen.reason) == ("Pending", "FineTuneJobNotFound")
    deleted = finetune_wait("demo", None, "ftj-uid-1")
    assert (deleted.phase, deleted.reason) == ("Failed", "FineTuneJobNotFound") and "deleted" in deleted.message
    replaced = finetune_wait("demo", ftj_body(uid="other"), "ftj-uid-1")
    assert (replaced.phase, replaced.reason) == ("Failed", "FineTuneJobNotFound")
    nothing = finetune_wait("demo", ftj_body(result={"finalLoss": 1.0}), None)
    assert (nothing.phase, nothing.reason) == ("Failed", "FineTuneJobOutputMissing")


def evaljob_body(phase="Succeeded", metrics=None, model_id="finetunejob/demo@ftj-uid-1"):
    return {"status": {"phase": phase, "modelId": model_id, "model": "finetunejob/demo",
                       "result": {"metrics": metrics if metrics is not None else {"facts/acc": 0.5}}}}


def test_promotion_gate_in_both_directions_with_the_measured_value():
    gate = mdep(promotion={"evalJob": "demo-eval", "metric": "facts/acc", "min": 0.6}).spec.promotion
    model_id = "finetunejob/demo@ftj-uid-1"
    held = promotion_verdict(gate, evaljob_body(metrics={"facts/acc": 0.5}), model_id)
    assert not held.promoted and held.reason == "MetricBelowThreshold" and held.value == 0.5
    assert "facts/acc = 0.5" in held.message and ">= min 0.6" in held.message and "previous model keeps serving" in held.message
    passed = promotion_verdict(gate, evaljob_body(metrics={"facts/acc": 0.75}), model_id)
    assert passed.promoted and passed.reason == "MetricPassed" and "0.75" in passed.message
    assert promotion_verdict(gate, evaljob_body(phase="Running"), model_id).reason == "WaitingForEvalJob"
    assert promotion_verdict(gate, evaljob_body(phase="Failed"), model_id).reason == "EvalJobFailed"
    assert promotion_verdict(gate, None, model_id).reason == "EvalJobNotFound"
    assert promotion_verdict(gate, evaljob_body(model_id="finetunejob/demo@old-run"), model_id).reason == "EvalJobModelMismatch"
    assert promotion_verdict(gate, evaljob_body(metrics={"other/acc": 1.0}), model_id).reason == "MetricNotFound"
    lower = mdep(promotion={"evalJob": "e", "metric": "facts/perplexity", "max": 20}).spec.promotion
    assert promotion_verdict(lower, evaljob_body(metrics={"facts/perplexity": 12.0}), model_id).promoted
    assert not promotion_verdict(lower, evaljob_body(metrics={"facts/perplexity": 25.0}), model_id).promoted


def test_promotion_metric_must_exist_in_the_evaljobs_tasks():
    job = evj()
    ok = mdep(promotion={"evalJob": "demo-eval", "metric": "facts/acc_norm", "min": 0.5}).spec.promotion
    assert promotion_metric_error(ok, job) is None
    wrong_task = mdep(promotion={"evalJob": "demo-eval", "metric": "hellaswag/acc", "min": 0.5}).spec.promotion
    assert "has no task 'hellaswag'" in promotion_metric_error(wrong_task, job)
    wrong_metric = mdep(promotion={"evalJob": "demo-eval", "metric": "facts/perplexity", "min": 0.5}).spec.promotion
    assert "reports acc, acc_norm, not 'perplexity'" in promotion_metric_error(wrong_metric, job)
    with pytest.raises(KubetuneError, match="exactly one of min"):
        mdep(promotion={"evalJob": "e", "metric": "facts/acc", "min": 1, "max": 2})
    with pytest.raises(KubetuneError, match="spec.promotion.metric"):
        mdep(promotion={"evalJob": "e", "metric": "acc", "min": 1})


def test_dependency_order_puts_references_first_and_refuses_cycles():
    ftj = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
    ftj["metadata"]["name"] = "demo"  # the one evj() refers to
    objs = [mdep(promotion={"evalJob": "demo-eval", "metric": "facts/acc", "min": 0.5}), evj(), parse_object(ftj, "t")]
    assert [o.kind for o in dependency_order(objs)] == ["FineTuneJob", "EvalJob", "ModelDeployment"]

    def node(kind, name, ref):
        spec = SimpleNamespace(fine_tune_job=None, promotion=SimpleNamespace(eval_job=ref))
        return SimpleNamespace(kind=kind, metadata=SimpleNamespace(name=name), spec=spec)

    with pytest.raises(PipelineReferenceError, match="cycle: EvalJob/a -> EvalJob/b -> EvalJob/a"):
        dependency_order([node("EvalJob", "a", "b"), node("EvalJob", "b", "a")])


# ---- ModelDeployment ----------------------------------------------------------------------------


def test_deployment_serves_the_finetunejobs_adapter_by_its_name_with_probes_and_no_downtime_rollouts():
    service, policy, deployment = plan_deployment(mdep(adapters=[{"name": "support", "source": "pvc://adapters/support"}]), ftj_body())
    for obj in (service, policy, deployment):
        kubernetes_validate.validate(obj, K8S, strict=True)
        assert obj["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    spec = deployment["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    container = spec["template"]["spec"]["containers"][0]
    argv = container["command"]
    assert argv[:3] == ["kubetune", "serve", "/mnt/model/llama"]
    assert argv[argv.index("--served-model-name") + 1] == "bot" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--adapter"] == ["demo=/mnt/output/runs/demo/adapter", "support=/mnt/adapter-0/support"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 600
    assert spec["template"]["metadata"]["annotations"][MODEL_ID_ANNOTATION] == "finetunejob/demo@ftj-uid-1"
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert set(spec["selector"]["matchLabels"].items()) <= set(spec["template"]["metadata"]["labels"].items())
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # Same input, same hash; a new FineTuneJob output (a re-run) changes the template and the hash.
    again = planned(mdep(adapters=[{"name": "support", "source": "pvc://adapters/support"}]), ftj_body())["Deployment"]
    assert again["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == deployment["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    rerun = planned(mdep(adapters=[{"name": "support", "source": "pvc://adapters/support"}]), ftj_body(uid="ftj-uid-2"))["Deployment"]
    assert rerun["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != deployment["metadata"]["annotations"][SPEC_HASH_ANNOTATION]


def test_vllm_arguments_are_vllms_documented_flags():
    dep = mdep(runtime="vllm", maxModelLen=4096, resources={"gpusPerNode": 4}, extraArgs=["--gpu-memory-utilization", "0.85"])
    deployment = planned(dep, ftj_body())["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    argv = container["command"]
    assert argv[:2] == VLLM["command"] and argv[2] == "/mnt/model/llama"
    flags = VLLM["flags"]
    i = 3
    seen = {}
    while i < len(argv):  # every option is one of vLLM's, with the arity vLLM gives it
        flag = argv[i]
        assert flag in flags, f"{flag} is not a vLLM flag"
        if flags[flag] == "switch":
            values, i = [], i + 1
        elif flags[flag] == "value":
            values, i = [argv[i + 1]], i + 2
        else:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            values, i = argv[i + 1:j], j
        seen[flag] = values
    assert seen["--tensor-parallel-size"] == ["4"] and seen["--max-model-len"] == ["4096"]
    assert seen["--lora-modules"] == ["demo=/mnt/output/runs/demo/adapter"] and "--enable-lora" in seen
    assert seen["--served-model-name"] == ["bot"] and seen["--gpu-memory-utilization"] == ["0.85"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == VLLM["health_path"]
    assert container["image"].startswith("vllm/vllm-openai:")


def test_autoscaling_makes_an_hpa_and_leaves_replicas_to_it():
    dep = mdep(model={"source": "pvc://models/llama"}, resources={"gpusPerNode": 1, "requests": {"cpu": "4"}},
               autoscaling={"minReplicas": 1, "maxReplicas": 4})
    service, _policy, deployment, hpa = plan_deployment(dep)
    kubernetes_validate.validate(hpa, K8S, strict=True)
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bot"}
    assert hpa["spec"]["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    in_flight = mdep(model={"source": "pvc://models/llama"}, autoscaling={"maxReplicas": 3, "metric": "requestsInFlight", "target": 6})
    pods_metric = planned(in_flight)["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]
    assert pods_metric == {"metric": {"name": "kubetune_serve_running_sequences"}, "target": {"type": "AverageValue", "averageValue": "6"}}


def server_pod(children):
    return children["Deployment"]["spec"]["template"]["spec"]


def test_api_key_secret_reaches_the_server_as_a_mounted_file_never_as_a_value():
    key = {"name": "bot-keys", "key": "keys"}
    children = planned(mdep(apiKeySecret=key), ftj_body())
    kubernetes_validate.validate(children["Deployment"], K8S, strict=True)
    pod = server_pod(children)
    (container,) = pod["containers"]
    argv = container["command"]
    path = argv[argv.index("--api-key-file") + 1]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "bot-keys" and volume["secret"]["items"] == [{"key": "keys", "path": "keys"}]
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and path == f"{mount['mountPath']}/keys"
    # The server reads exactly this flag (a key file, one key per line).
    from kubetune.cli import build_parser

    args = build_parser().parse_args(["serve", *argv[2:]])
    assert args.api_key_file == path and args.api_key == []
    # The kubetune server's env does not touch the Secret; vLLM gets its one key through secretKeyRef.
    assert "bot-keys" not in json.dumps(container["env"])
    vllm = server_pod(planned(mdep(apiKeySecret=key, runtime="vllm"), ftj_body()))["containers"][0]
    assert {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": key}} in vllm["env"]
    assert "--api-key" not in vllm["command"] and "--api-key-file" not in vllm["command"]
    assert "--api-key-file" not in server_pod(planned(mdep(), ftj_body()))["containers"][0]["command"]
    # Naming the Secret needs the right to read it (the admission webhook's SubjectAccessReview).
    from kubetune.operator.tenancy import Access, needs

    assert ("spec.apiKeySecret", (Access("get", "secrets", "bot-keys"),)) in [(n.field, n.any_of) for n in needs(mdep(apiKeySecret=key))]


def test_network_policy_admits_only_the_api_port_from_the_allowed_peers():
    default = planned(mdep(port=8080), ftj_body())
    policy = default["NetworkPolicy"]
    kubernetes_validate.validate(policy, K8S, strict=True)
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "mdep-uid"
    # It selects exactly the server pods, and denies every other ingress to them.
    assert policy["spec"]["podSelector"]["matchLabels"] == default["Deployment"]["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert rule["from"] == [{"podSelector": {}}]  # default: every pod of the ModelDeployment's namespace
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
              "podSelector": {"matchLabels": {"app": "ingress"}}},
             {"podSelector": {"matchLabels": {"role": "client"}}}]
    custom = planned(mdep(networkPolicy={"from": peers}), ftj_body())["NetworkPolicy"]
    kubernetes_validate.validate(custom, K8S, strict=True)
    assert custom["spec"]["ingress"][0]["from"] == peers
    assert custom["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != policy["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    assert "NetworkPolicy" not in planned(mdep(networkPolicy={"enabled": False}), ftj_body())
    with pytest.raises(KubetuneError, match="networkPolicy.*podSelector, namespaceSelector"):
        mdep(networkPolicy={"from": [{}]})


def test_deployment_refusals_name_the_field():
    with pytest.raises(KubetuneError, match="spec.resources.gpusPerNode: runtime vllm"):
        plan_deployment(mdep(runtime="vllm", resources={"gpusPerNode": 0}), ftj_body())
    with pytest.raises(KubetuneError, match="spec.autoscaling.metric cpu.*requests.cpu"):
        plan_deployment(mdep(autoscaling={"maxReplicas": 2}), ftj_body())
    with pytest.raises(KubetuneError, match="'demo' is served twice"):
        plan_deployment(mdep(adapters=[{"name": "demo", "source": "pvc://a/b"}]), ftj_body())
    with pytest.raises(KubetuneError, match="maxReplicas"):
        mdep(autoscaling={"minReplicas": 3, "maxReplicas": 2})


def test_deployment_state_follows_the_deployment_controller():
    dep = {"metadata": {"generation": 2}, "status": {"observedGeneration": 2, "readyReplicas": 2, "updatedReplicas": 2,
                                                      "conditions": [{"type": "Available", "status": "True"}]}}
    assert deployment_state(dep, 2)[:2] == ("Ready", 2)
    stale = copy.deepcopy(dep)
    stale["status"]["observedGeneration"] = 1
    assert deployment_state(stale, 2)[0] == "Progressing"
    rolling = copy.deepcopy(dep)
    rolling["status"]["updatedReplicas"] = 1
    assert deployment_state(rolling, 2)[0] == "Progressing"
    stuck = {"status": {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}}
    assert deployment_state(stuck, 1)[0] == "Failed"
    assert deployment_state(None, 1) == ("Pending", 0, {})


def test_the_example_pipeline_plans_on_the_example_finetunejob():
    ftj = yaml.safe_load((REPO / "examples" / "llama3.1-8b-lora.yaml").read_text())
    ftj["metadata"]["uid"] = "u1"
    ftj["status"] = {"phase": "Succeeded", "result": {"adapter": "/mnt/output/adapter", "checkpoint": "/mnt/output/model"}}
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "eval-and-serve.yaml").read_text()) if d]
    objects = [parse_object(d, "example") for d in docs]
    assert [o.kind for o in dependency_order(objects)] == ["EvalJob", "ModelDeployment", "ModelDeployment"]
    evaljob, support, vllm = objects
    assert promotion_metric_error(vllm.spec.promotion, evaljob) is None  # lm-eval tasks: any metric name
    for obj in plan_eval(evaljob, ftj) + plan_deployment(vllm, ftj) + plan_deployment(support):
        kubernetes_validate.validate(obj, K8S, strict=True)
    argv = planned(vllm, ftj)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert argv[argv.index("--lora-modules") + 1] == "llama31-8b-lora=/mnt/output/adapter"


# --- initializers: hf:// and s3:// models and adapters of EvalJobs and ModelDeployments ---------


def init_of(pod):
    return {c["name"]: c for c in pod.get("initContainers") or []}


def restricted(pod_spec):
    from pss import restricted_violations

    return restricted_violations({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec})


def test_evaljob_fetches_hub_and_s3_models_with_the_initializer_before_the_baseline():
    job = evj(model={"source": "hf://org/base@v1"}, adapter={"source": "s3://adapters/demo/lora"}, s3={"endpoint": "http://minio:9000"},
              secrets={"hfToken": {"name": "hf", "key": "token"}, "s3": {"name": "s3-keys"}}, cache={"claimName": "model-cache"})
    config_map, job_ = plan_eval(job)
    pod = job_["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["initializer", "baseline"]  # fetched before anything reads it
    init = init_of(pod)["initializer"]
    assert init["command"] == ["kubetune", "initialize", "--plan", "/etc/kubetune/sources.yaml"]
    plan = yaml.safe_load(config_map["data"]["sources.yaml"])
    cfg = resolve_config("eval", yaml.safe_load(config_map["data"]["config.yaml"]))
    assert plan == {"sources": [
        {"field": "spec.model.source", "uri": "hf://org/base@v1", "dest": cfg.model.path},
        {"field": "spec.adapter.source", "uri": "s3://adapters/demo/lora", "dest": cfg.adapter},
    ], "s3": {"endpoint": "http://minio:9000"}}
    assert cfg.model.path.startswith("/mnt/cache/hf/org--base-") and cfg.adapter.startswith("/mnt/cache/s3/adapters--demo--lora-")
    baseline = yaml.safe_load(config_map["data"]["baseline.yaml"])
    assert baseline["model"]["path"] == cfg.model.path and baseline["adapter"] is None
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in init["env"] if "valueFrom" in e}
    assert secrets == {"HF_TOKEN": "hf", "AWS_ACCESS_KEY_ID": "s3-keys", "AWS_SECRET_ACCESS_KEY": "s3-keys"}
    assert not any("AWS" in e["name"] for c in pod["containers"] + [init_of(pod)["baseline"]] for e in c["env"])  # only the initializer
    assert {v["name"]: v for v in pod["volumes"]}["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "model-cache"}}
    for container in pod["containers"] + [init_of(pod)["baseline"]]:
        assert {"name": "cache", "mountPath": "/mnt/cache", "readOnly": True} in container["volumeMounts"]
    assert {"name": "cache", "mountPath": "/mnt/cache"} in init["volumeMounts"]  # the only writer
    assert restricted(pod) == []
    kubernetes_validate.validate(job_, K8S, strict=True)


def test_evaljob_of_a_finetunejob_on_a_hub_model_fetches_that_base_model():
    ftj = ftj_body()
    ftj["spec"]["model"]["source"] = "hf://org/base"
    config_map, job = plan_eval(evj(), ftj)
    plan = yaml.safe_load(config_map["data"]["sources.yaml"])
    assert [(s["field"], s["uri"]) for s in plan["sources"]] == [("spec.model.source of FineTuneJob demo", "hf://org/base")]
    cfg = yaml.safe_load(config_map["data"]["config.yaml"])
    assert cfg["model"]["path"] == plan["sources"][0]["dest"] and cfg["adapter"] == "/mnt/output/runs/demo/adapter"
    assert init_of(job["spec"]["template"]["spec"])["initializer"]["image"] == job["spec"]["template"]["spec"]["containers"][0]["image"]


def test_evaljob_without_remote_sources_has_no_initializer():
    config_map, job = plan_eval(evj(), ftj_body())
    assert "sources.yaml" not in config_map["data"]
    assert [c["name"] for c in job["spec"]["template"]["spec"]["initContainers"]] == ["baseline"]
    assert "cache" not in {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}


@pytest.mark.parametrize("runtime", ["kubetune", "vllm"])
def test_deployment_fetches_hub_and_s3_models_and_adapters_with_kubetunes_image(runtime):
    md = mdep(model={"source": "s3://weights/llama"}, adapters=[{"name": "sql", "source": "hf://org/sql-lora"}], runtime=runtime,
              secrets={"s3": {"name": "s3-keys"}})
    children = plan_deployment(md, server_image="registry.example/kubetune-server:1")
    kinds = [c["kind"] for c in children]
    assert kinds.index("ConfigMap") < kinds.index("Deployment")  # the plan exists before any pod
    sources_map = next(c for c in children if c["kind"] == "ConfigMap")
    deployment = next(c for c in children if c["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "registry.example/kubetune-server:1"  # vLLM's image has no `kubetune initialize`
    assert {v["name"]: v for v in pod["volumes"]}["config"] == {"name": "config", "configMap": {"name": sources_map["metadata"]["name"]}}
    plan = yaml.safe_load(sources_map["data"]["sources.yaml"])
    dests = {s["field"]: s["dest"] for s in plan["sources"]}
    argv = pod["containers"][0]["command"]
    assert argv[2] == dests["spec.model.source"]
    assert any(arg.endswith(f"sql={dests['spec.adapters[0].source']}") for arg in argv)
    assert [e["name"] for e in init["env"] if "valueFrom" in e] == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]  # no HF token was set
    assert {v["name"]: v for v in pod["volumes"]}["cache"] == {"name": "cache", "emptyDir": {}}
    assert restricted(pod) == []
    for child in children:
        kubernetes_validate.validate(child, K8S, strict=True)
    # Another model: the plan changes and says so by its hash (the reconciler patches it).
    other = plan_deployment(mdep(model={"source": "s3://weights/other"}, runtime=runtime), server_image="registry.example/kubetune-server:1")
    other_map = next(c for c in other if c["kind"] == "ConfigMap")
    assert other_map["metadata"]["annotations"][SPEC_HASH_ANNOTATION] != sources_map["metadata"]["annotations"][SPEC_HASH_ANNOTATION]


def test_evaljob_task_files_on_s3_and_the_hub_are_fetched_by_the_initializer_and_read_from_the_cache():
    # A task source with shell metacharacters: it may reach the pod only as data (the plan), never a command string.
    hostile = "s3://tasks/evals/$(reboot);x.jsonl"
    tasks = [{"name": "mc", "type": "multiple_choice", "source": hostile, "options": {"context_field": "question"}},
             "hellaswag",  # lm-eval names: not sources
             {"name": "gen", "type": "generate", "source": "hf://acme/evals/qa/dev.jsonl@v2"},
             {"name": "ppl", "type": "perplexity", "source": "pvc://evals/heldout.jsonl"}]
    job = evj(tasks=tasks, s3={"endpoint": "http://minio:9000", "region": "eu-west-1"},
              secrets={"hfToken": {"name": "hf", "key": "token"}, "s3": {"name": "s3-keys"}})
    config_map, job_ = plan_eval(job, ftj_body())  # the model: the FineTuneJob's output on a claim (nothing to fetch)
    pod = job_["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["initializer", "baseline"]  # the files are there before either eval
    init = init_of(pod)["initializer"]
    assert init["command"] == ["kubetune", "initialize", "--plan", "/etc/kubetune/sources.yaml"]
    plan = yaml.safe_load(config_map["data"]["sources.yaml"])
    assert [(s["field"], s["uri"]) for s in plan["sources"]] == [
        ("spec.tasks[0].source", hostile), ("spec.tasks[2].source", "hf://acme/evals/qa/dev.jsonl@v2")]
    assert plan["s3"] == {"endpoint": "http://minio:9000", "region": "eu-west-1"}
    dests = {s["field"]: s["dest"] for s in plan["sources"]}
    for file in ("config.yaml", "baseline.yaml"):  # both evals read the fetched files
        cfg = resolve_config("eval", yaml.safe_load(config_map["data"][file]))
        paths = {t.name: t.path for t in cfg.tasks if not isinstance(t, str)}
        assert paths == {"mc": dests["spec.tasks[0].source"] + "/$(reboot);x.jsonl",  # the object's name in its download
                         "gen": dests["spec.tasks[2].source"] + "/qa/dev.jsonl",  # its path in the repository
                         "ppl": "/mnt/task-3/heldout.jsonl"}
        assert all(path.startswith("/mnt/cache/") for name, path in paths.items() if name != "ppl")
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"] if "valueFrom" in e}
    assert secrets == {"HF_TOKEN": {"name": "hf", "key": "token"}, "AWS_ACCESS_KEY_ID": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"},
                       "AWS_SECRET_ACCESS_KEY": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert not any("AWS" in e["name"] for c in pod["containers"] + [init_of(pod)["baseline"]] for e in c["env"])  # only the initializer
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"] == {"name": "cache", "emptyDir": {}}
    assert volumes["task-3"] == {"name": "task-3", "persistentVolumeClaim": {"claimName": "evals", "readOnly": True}}
    for container in pod["containers"] + [init_of(pod)["baseline"]]:
        assert {"name": "cache", "mountPath": "/mnt/cache", "readOnly": True} in container["volumeMounts"]
    assert {"name": "cache", "mountPath": "/mnt/cache"} in init["volumeMounts"]  # the only writer
    every_string = json.dumps(job_)
    assert "reboot" not in every_string  # the CR's source is in the ConfigMap only, as YAML data
    assert not any(arg in ("sh", "bash", "-c") for c in pod["containers"] + pod["initContainers"] for arg in c["command"])
    assert restricted(pod) == []
    kubernetes_validate.validate(job_, K8S, strict=True)
    kubernetes_validate.validate(config_map, K8S, strict=True)


@pytest.mark.parametrize("source, message", [
    ("s3://tasks/evals/", r"spec\.tasks\[0\]\.source: 's3://tasks/evals/': a task's source is one JSONL file; write s3://BUCKET/PATH/TO/FILE\.jsonl"),
    ("s3://tasks", r"spec\.tasks\[0\]\.source: 's3://tasks': a task's source is one JSONL file"),
    ("hf://acme/evals", r"spec\.tasks\[0\]\.source: 'hf://acme/evals': a task's source is one JSONL file; write hf://ORG/NAME/PATH"),
    ("hf://acme/evals/../x.jsonl", r"spec\.tasks\[0\]\.source: .*one JSONL file"),
])
def test_task_sources_that_name_no_file_are_refused_naming_the_field(source, message):
    with pytest.raises(KubetuneError, match=message):
        plan_eval(evj(tasks=[{"name": "t", "type": "generate", "source": source}]), ftj_body())


@pytest.mark.parametrize("kind", ["EvalJob", "ModelDeployment", "FineTuneJob"])
def test_the_cache_claim_is_a_claim_the_requester_must_be_allowed_to_read(kind):
    from kubetune.operator.tenancy import Access, needs

    if kind == "FineTuneJob":
        doc = yaml.safe_load((REPO / "examples" / "finetune-tiny.yaml").read_text())
        doc["spec"]["cache"] = {"claimName": "team-b-cache"}
        obj = parse_object(doc, "test")
    else:
        obj = (evj if kind == "EvalJob" else mdep)(model={"source": "hf://org/base"}, cache={"claimName": "team-b-cache"})
    assert ("spec.cache.claimName", (Access("get", "persistentvolumeclaims", "team-b-cache"),)) in [(n.field, n.any_of) for n in needs(obj)]
