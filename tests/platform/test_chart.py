"""charts/kubetune rendered and linted by Helm's own Go library (helm-python-sdk), every object
validated against the Kubernetes schemas, every pod against the restricted Pod Security Standard,
the RBAC checked for least privilege and against what the planner really creates."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pss import restricted_violations

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) renders the chart with Helm's engine")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
K8S_VERSION = "1.30.0"
RELEASE, NAMESPACE = "kt", "kubetune-system"

# Custom resources of other projects the chart may render; kubernetes-validate knows only built-ins.
FOREIGN_KINDS = {
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kopf.dev/v1", "ClusterKopfPeering"),
    ("kopf.dev/v1", "KopfPeering"),
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "webhook-cert-manager": {"webhook": {"enabled": True}},
    "webhook-own-cert": {
        "webhook": {"enabled": True, "certManager": {"enabled": False}, "existingSecret": "my-tls", "caBundle": "Q0E="}
    },
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                    "grafanaDashboard": {"enabled": True}}
    },
    "ha": {"replicaCount": 3},
    "ha-namespaced-webhook": {"replicaCount": 2, "watchNamespaces": ["ml"], "webhook": {"enabled": True}},
    "all-backends": {"rbac": {"trainJobs": True, "jobSets": True, "networkPolicies": True}},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    files = helm.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: dict[str, Any]) -> str:
    files = helm.Chart.load(str(CHART)).render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = of_kind(docs, kind)
    return doc


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(values) for name, values in SCENARIOS.items()}


# --- Helm's own checks ---------------------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_is_clean(scenario):
    result = helm.lint(str(CHART), SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version=K8S_VERSION)
    assert result["errors"] == []
    # Severity 1 is Helm's INFO ("icon is recommended"); warnings (2) and errors (3) fail.
    assert [m for m in result["messages"] if m["severity"] > 1] == []


def test_lint_reports_a_broken_template(tmp_path):
    """The lint above would catch a real mistake: a template with an unclosed action."""
    import shutil

    broken = tmp_path / "kubetune"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: ConfigMap\nname: {{ .Values.image.repository\n")
    result = helm.lint(str(broken))
    assert result["errors"] or any(m["severity"] > 1 for m in result["messages"])


@pytest.mark.parametrize(
    "values, key",
    [
        ({"replicaCount": "two"}, "replicaCount"),
        ({"imagee": {"repository": "x"}}, "imagee"),
        ({"watchNamespaces": ["team-*"]}, "watchNamespaces"),
        ({"webhook": {"failurePolicy": "Sometimes"}}, "failurePolicy"),
        ({"defaultImages": {"trainer": {"repository": "r", "digest": "md5:1"}}}, "digest"),
        ({"runAsUser": 0}, "runAsUser"),
        ({"podResources": {"memoryPerGpu": "32GB"}}, "memoryPerGpu"),
        ({"references": {"pollSeconds": 0}}, "pollSeconds"),
        ({"references": {"graceSecs": 10}}, "graceSecs"),
    ],
)
def test_values_schema_refuses_wrong_values_naming_the_key(values, key):
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert key in str(err.value)


def test_webhook_without_certificates_fails_with_what_to_set():
    with pytest.raises(helm.HelmError, match="webhook.existingSecret and webhook.caBundle"):
        render({"webhook": {"enabled": True, "certManager": {"enabled": False}}})


def test_chart_crds_are_the_repository_crds_byte_for_byte():
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        assert (CHART / "crds" / crd.name).read_bytes() == crd.read_bytes(), f"charts/kubetune/crds/{crd.name} drifted from crds/: run `make crds`"
    extra = {p.name for p in (CHART / "crds").glob("*.yaml")} - {p.name for p in (REPO / "crds").glob("*.yaml")}
    assert extra == {"kopf-peering.yaml"}  # kopf's peering CRDs, for replicaCount > 1


def test_chart_crds_are_valid_crds():
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# --- every object valid, every pod restricted ----------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_is_valid_kubernetes(rendered, scenario):
    docs = rendered[scenario]
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in FOREIGN_KINDS:
            assert doc["metadata"]["name"]
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] not in {"ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"}:
            assert doc["metadata"].get("namespace"), f"{doc['kind']} {doc['metadata']['name']} has no namespace"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_pod_meets_the_restricted_pod_security_standard(rendered, scenario):
    pods = [d for d in rendered[scenario] if d["kind"] in {"Deployment", "Pod", "Job", "StatefulSet", "DaemonSet"}]
    assert {d["kind"] for d in pods} == {"Deployment", "Pod"}  # the operator and the helm test pod
    for doc in pods:
        assert restricted_violations(doc) == []
        for c in doc["spec"].get("template", doc)["spec"]["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert "memory" in c["resources"]["limits"]


# --- RBAC: least privilege, and enough for what the operator does ----------------------------

def rbac_rules(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [rule for doc in of_kind(docs, kind) for rule in doc["rules"]]


def allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_has_no_wildcards_no_secrets_no_webhook_writes_no_deletes(rendered, scenario):
    rules = rbac_rules(rendered[scenario], "ClusterRole") + rbac_rules(rendered[scenario], "Role")
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert "secrets" not in rule["resources"]
        assert "admissionregistration.k8s.io" not in rule["apiGroups"]
        assert not set(rule["verbs"]) & {"delete", "deletecollection", "escalate", "bind", "impersonate"}, rule


def test_cluster_wide_by_default_with_finalizers_for_owner_reference_enforcement(rendered):
    docs = rendered["default"]
    rules = rbac_rules(docs, "ClusterRole")
    assert of_kind(docs, "Role") == []
    for kind in ("finetunejobs", "evaljobs", "modeldeployments"):
        assert allowed(rules, "kubetune.dev", f"{kind}/finalizers", "update")
        assert allowed(rules, "kubetune.dev", f"{kind}/status", "patch")
        assert allowed(rules, "kubetune.dev", kind, "watch")
        assert not allowed(rules, "kubetune.dev", kind, "update")  # spec is the user's
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(docs, "ServiceAccount")["metadata"]["name"], "namespace": NAMESPACE}]
    assert not allowed(rules, "kopf.dev", "clusterkopfpeerings", "patch")  # only with peering
    assert not allowed(rules, "trainer.kubeflow.org", "trainjobs", "create")  # off by default
    assert allowed(rules, "jobset.x-k8s.io", "jobsets", "create")  # backend auto picks JobSet where served
    assert not allowed(rules, "trainer.kubeflow.org", "clustertrainingruntimes", "get")
    assert allowed(rbac_rules(rendered["all-backends"], "ClusterRole"), "trainer.kubeflow.org", "clustertrainingruntimes", "get")


def test_namespaced_mode_has_a_role_per_namespace_and_nothing_cluster_wide(rendered):
    docs = rendered["namespaced"]
    assert of_kind(docs, "ClusterRole") == [] and of_kind(docs, "ClusterRoleBinding") == []
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")) == ["team-a", "team-b"]
    for binding in of_kind(docs, "RoleBinding"):
        assert binding["subjects"][0]["namespace"] == NAMESPACE  # the operator's SA, where it runs
    args = operator_container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    # Exact names: the operator turns off kopf's cluster scans, so no CRD listing is needed.
    assert not allowed(rbac_rules(docs, "Role"), "apiextensions.k8s.io", "customresourcedefinitions", "list")


def planned_children() -> list[dict[str, Any]]:
    from kubetune.operator.api import parse_object
    from kubetune.operator.planner import ClusterInfo, plan

    children = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "FineTuneJob":
                continue
            doc["metadata"].setdefault("namespace", "default")
            doc["metadata"]["uid"] = "uid-1"
            job = parse_object(doc, path.name)
            children += plan(job, ClusterInfo(has_pytorchjob=True))
            children += plan(job, ClusterInfo(has_pytorchjob=False))
            children += plan(job, ClusterInfo(has_jobset=True))  # what `backend: auto` picks where JobSet is served
    return children


def plural(kind: str) -> str:
    return kind.lower()[:-1] + "ies" if kind.endswith("y") else kind.lower() + "s"


@pytest.mark.parametrize("scenario", ["default", "namespaced"])
def test_rbac_allows_every_create_the_planner_makes(rendered, scenario):
    rules = rbac_rules(rendered[scenario], "ClusterRole") + rbac_rules(rendered[scenario], "Role")
    from pipeline_objects import pipeline_objects

    children = planned_children() + pipeline_objects()
    kinds = {(c["apiVersion"].rpartition("/")[0], c["kind"]) for c in children}
    assert {("batch", "Job"), ("kubeflow.org", "PyTorchJob"), ("jobset.x-k8s.io", "JobSet"), ("apps", "Deployment"),
            ("autoscaling", "HorizontalPodAutoscaler"), ("networking.k8s.io", "NetworkPolicy")} <= kinds
    for group, kind in kinds:
        for verb in ("create", "get", "patch"):
            assert allowed(rules, group, plural(kind), verb), f"the operator cannot {verb} {plural(kind)}.{group}"


# --- the operator's Deployment: real flags, probes, images ------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_args_are_flags_the_cli_accepts(rendered, scenario):
    from kubetune.cli import build_parser

    docs = rendered[scenario]
    container = operator_container(docs)
    args = build_parser().parse_args(container["args"])  # exits (SystemExit) on an unknown flag
    assert args.command == "operator"
    assert (args.namespace or []) == SCENARIOS[scenario].get("watchNamespaces", [])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["metrics"]
    assert args.liveness.endswith(f":{ports['health']}/healthz")
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_default_images_reach_the_operator_from_values():
    docs = render({
        "image": {"tag": "9.9.9"},
        "defaultImages": {
            "trainer": {"repository": "registry.example/ml/trainer", "tag": "cu128"},
            "server": {"repository": "registry.example/ml/server", "digest": "sha256:" + "a" * 64},
        },
    })
    container = operator_container(docs)
    assert container["image"] == "ghcr.io/kubetune/operator:9.9.9"
    env = env_of(container)
    assert env["KUBETUNE_DEFAULT_TRAINER_IMAGE"] == "registry.example/ml/trainer:cu128"
    assert env["KUBETUNE_DEFAULT_SERVER_IMAGE"] == "registry.example/ml/server@sha256:" + "a" * 64
    defaults = env_of(operator_container(render({})))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert defaults["KUBETUNE_DEFAULT_TRAINER_IMAGE"] == f"ghcr.io/kubetune/trainer:{chart['appVersion']}"


def test_reference_poll_and_grace_reach_the_operator():
    """references.pollSeconds/graceSeconds become the env `kubetune operator` reads them from
    (operator/main.py); the chart's defaults are the operator's own."""
    from kubetune.operator.handlers import OperatorConfig

    env = env_of(operator_container(render({"references": {"pollSeconds": 15, "graceSeconds": 600}})))
    assert (env["KUBETUNE_REFERENCE_POLL_SECONDS"], env["KUBETUNE_REFERENCE_GRACE_SECONDS"]) == ("15", "600")
    defaults = env_of(operator_container(render({})))
    assert float(defaults["KUBETUNE_REFERENCE_POLL_SECONDS"]) == OperatorConfig().reference_poll
    assert float(defaults["KUBETUNE_REFERENCE_GRACE_SECONDS"]) == OperatorConfig().reference_grace


def test_ha_runs_kopf_peering_with_a_disruption_budget(rendered):
    docs = rendered["ha"]
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    assert "--peering=kubetune" in operator_container(docs)["args"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "kubetune"
    assert allowed(rbac_rules(docs, "ClusterRole"), "kopf.dev", "clusterkopfpeerings", "patch")
    assert of_kind(rendered["default"], "PodDisruptionBudget") == []
    assert "--peering=kubetune" not in operator_container(rendered["default"])["args"]
    namespaced = rendered["ha-namespaced-webhook"]
    assert [p["metadata"]["namespace"] for p in of_kind(namespaced, "KopfPeering")] == ["ml"]
    assert allowed(rbac_rules(namespaced, "Role"), "kopf.dev", "kopfpeerings", "patch")


# --- admission webhook ------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", ["webhook-cert-manager", "webhook-own-cert", "ha-namespaced-webhook"])
def test_webhook_is_static_create_update_only_and_reaches_the_operator(rendered, scenario):
    from kubetune.operator.handlers import ADMISSION_ID
    from kubetune.operator.pipeline_handlers import DEPLOYMENT_ADMISSION_ID, EVAL_ADMISSION_ID

    docs = rendered[scenario]
    config = one(docs, "ValidatingWebhookConfiguration")
    hooks = config["webhooks"]  # one per kind, each at the path of the operator's handler for it
    assert [h["clientConfig"]["service"]["path"] for h in hooks] == [f"/{i}" for i in (ADMISSION_ID, EVAL_ADMISSION_ID, DEPLOYMENT_ADMISSION_ID)]
    for rule in (rule for h in hooks for rule in h["rules"]):
        assert sorted(rule["operations"]) == ["CREATE", "UPDATE"]  # never DELETE
    hook = hooks[0]
    client = hook["clientConfig"]["service"]
    service = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"] == client["name"])
    assert service["metadata"]["namespace"] == client["namespace"] == NAMESPACE
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == client["port"]]
    container = operator_container(docs)
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    env = env_of(container)
    assert env["KUBETUNE_WEBHOOK_HOST"] == f"{client['name']}.{NAMESPACE}.svc"
    assert int(env["KUBETUNE_WEBHOOK_PORT"]) == next(p["containerPort"] for p in container["ports"] if p["name"] == "webhook")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["KUBETUNE_WEBHOOK_CERT"].startswith(mounts["webhook-tls"])
    volume = next(v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "webhook-tls")
    if scenario == "webhook-own-cert":
        assert volume["secret"]["secretName"] == "my-tls"
        assert hook["clientConfig"]["caBundle"] == "Q0E="
        assert of_kind(docs, "Certificate") == []
    else:
        cert = one(docs, "Certificate")
        assert cert["spec"]["secretName"] == volume["secret"]["secretName"]
        assert env["KUBETUNE_WEBHOOK_HOST"] in cert["spec"]["dnsNames"]
        assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{cert['metadata']['name']}"
    if scenario == "ha-namespaced-webhook":
        assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["ml"]


def test_webhook_tenancy_checks_get_subject_access_reviews_and_nothing_else_cluster_wide(rendered):
    docs = rendered["ha-namespaced-webhook"]  # namespaced: the only cluster-wide right is this one
    (role,) = of_kind(docs, "ClusterRole")
    assert role["rules"] == [{"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}]
    binding = next(b for b in of_kind(docs, "ClusterRoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"])
    assert binding["subjects"][0]["name"] == one(docs, "ServiceAccount")["metadata"]["name"]
    for hook in one(docs, "ValidatingWebhookConfiguration")["webhooks"]:
        assert hook["matchConditions"] == [{"name": "spec-written", "expression": "request.operation == 'CREATE' || object.spec != oldObject.spec"}]
    assert not allowed(rbac_rules(rendered["default"], "ClusterRole"), "authorization.k8s.io", "subjectaccessreviews", "create")


def test_tenancy_allow_lists_and_pod_resources_reach_the_operator():
    env = env_of(operator_container(render({
        "tenancy": {"allowedRegistries": "registry.example/ml/", "allowedTolerations": "nvidia.com/gpu,spot",
                    "allowedPriorityClasses": "team-low", "allowedEnv": "HF_ENDPOINT,HTTPS_PROXY"},
        "podResources": {"cpuPerGpu": "6", "memoryPerGpu": "48Gi"},
    })))
    assert env["KUBETUNE_ALLOWED_REGISTRIES"] == "registry.example/ml/"
    assert env["KUBETUNE_ALLOWED_TOLERATIONS"] == "nvidia.com/gpu,spot"
    assert env["KUBETUNE_ALLOWED_PRIORITY_CLASSES"] == "team-low"
    assert (env["KUBETUNE_CPU_PER_GPU"], env["KUBETUNE_MEMORY_PER_GPU"]) == ("6", "48Gi")
    # The operator's env allow-list, read as the operator reads it: HF_ENDPOINT allowed, others still refused.
    from kubetune.operator.api.common import redirecting_env_name

    assert not redirecting_env_name("HF_ENDPOINT", env["KUBETUNE_ALLOWED_ENV"])
    assert redirecting_env_name("AWS_ENDPOINT_URL", env["KUBETUNE_ALLOWED_ENV"])
    defaults = env_of(operator_container(render({})))
    assert not {"KUBETUNE_ALLOWED_REGISTRIES", "KUBETUNE_CPU_PER_GPU", "KUBETUNE_ALLOWED_ENV"} & set(defaults)  # the operator's own defaults


def test_no_webhook_by_default(rendered):
    docs = rendered["default"]
    assert of_kind(docs, "ValidatingWebhookConfiguration") == []
    assert not any(k.startswith("KUBETUNE_WEBHOOK") for k in env_of(operator_container(docs)))


# --- monitoring, notes, helm test -------------------------------------------------------------

def test_monitors_and_rules(rendered):
    docs = rendered["monitoring"]
    service_monitor = one(docs, "ServiceMonitor")
    metrics_service = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    # The operator's per-job series carry the job's namespace: Prometheus must keep it.
    assert service_monitor["spec"]["endpoints"][0]["honorLabels"] is True
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "kubetune"}
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "http"]  # trainer, server
    rule = one(docs, "PrometheusRule")
    source = yaml.safe_load((REPO / "deploy" / "monitoring" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == source
    dashboard = next(c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kubetune.json"]) == json.loads((REPO / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    assert (CHART / "files" / "grafana-dashboard.json").read_bytes() == (REPO / "deploy" / "monitoring" / "grafana-dashboard.json").read_bytes()
    assert of_kind(rendered["default"], "ServiceMonitor") == []
    assert of_kind(rendered["default"], "ConfigMap") == []


def test_helm_test_pod_checks_the_metrics_service(rendered):
    docs = rendered["default"]
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    url = pod["spec"]["containers"][0]["command"][-1]
    service = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert url == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}/metrics"
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_notes_say_the_next_command():
    text = notes({})
    assert f"helm test {RELEASE} --namespace {NAMESPACE}" in text
    assert "kubectl get finetunejobs" in text
    assert "--namespace team-a" in notes({"watchNamespaces": ["team-a"]})


def test_values_yaml_documents_every_top_level_key():
    """Each top-level key has a comment right above it, or directly follows a documented
    top-level key of the same group (nameOverride/fullnameOverride)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: set[int] = set()
    undocumented = []
    for i, line in enumerate(lines):
        if not line or line[0] in " #-" or ":" not in line:
            continue
        above = lines[i - 1] if i else ""
        if above.startswith("#") or (i - 1) in documented:
            documented.add(i)
        else:
            undocumented.append(line.split(":")[0])
    assert len(documented) > 20
    assert undocumented == []


def test_ha_replicas_never_tie_on_kopf_peering_priority(rendered):
    """kopf freezes all operators of a peering whose priorities tie; the chart's replicas share
    one set of arguments, so each must draw its own priority."""
    from kubetune.cli import build_parser
    from kubetune.operator.main import make_settings

    args = build_parser().parse_args(operator_container(rendered["ha"])["args"])
    replicas = [make_settings(peering=args.peering, priority=args.priority) for _ in range(3)]
    assert all(s.peering.name == "kubetune" and not s.peering.standalone for s in replicas)
    assert len({s.peering.priority for s in replicas}) == 3
    assert make_settings(peering="kubetune", priority=7).peering.priority == 7
    assert make_settings(peering=None).peering.standalone


def test_webhook_can_cover_every_kind_at_the_operators_paths():
    docs = render({"webhook": {"enabled": True, "resources": ["finetunejobs", "evaljobs", "modeldeployments"]}})
    hooks = one(docs, "ValidatingWebhookConfiguration")["webhooks"]
    paths = {h["rules"][0]["resources"][0]: h["clientConfig"]["service"]["path"] for h in hooks}
    assert paths == {"finetunejobs": "/validate-finetunejob", "evaljobs": "/validate-evaljob",
                     "modeldeployments": "/validate-modeldeployment"}
    assert len({h["name"] for h in hooks}) == 3
    for hook in hooks:
        assert hook["rules"][0]["operations"] == ["CREATE", "UPDATE"]
        kubernetes_validate.validate(one(docs, "ValidatingWebhookConfiguration"), K8S_VERSION, strict=True)
