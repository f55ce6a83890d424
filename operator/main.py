"""`kubetune operator`: run the operator (kopf) against the cluster in the current context."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
from typing import Any, Optional, Sequence

import kopf

from kubetune.errors import KubetuneError
from kubetune.operator.handlers import OperatorConfig, OperatorState, build_registry
from kubetune.operator.peering import Peering, own_identity
from kubetune.operator.planner import scale_quantity
from kubetune.operator.tenancy import Policy


def peering_priority(priority: Optional[int]) -> int:
    """kopf freezes every operator of a peering when two have the same priority, so replicas of
    one Deployment (which cannot be told apart by their arguments) each draw a random one: the
    highest serves, the others wait and take over when it is gone."""
    if priority is not None:
        return priority
    return random.SystemRandom().randint(1, 2**31 - 1)


def make_settings(
    *, peering: Optional[str], webhook: Optional[kopf.WebhookServer] = None, priority: Optional[int] = None
) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # kopf's bookkeeping goes to annotations: status is ours and typed (the CRD prunes unknown fields).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.dev", key="last-handled-configuration")
    settings.persistence.finalizer = "kubetune.dev/finalizer"
    # Watches end on the server side every few minutes and are re-established: no silent stalls.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.INFO
    settings.networking.request_timeout = 60
    if peering:
        settings.peering.name = peering
        settings.peering.standalone = False
        settings.peering.mandatory = True
        settings.peering.priority = peering_priority(priority)
    else:
        settings.peering.standalone = True
    if webhook is not None:
        settings.admission.server = webhook
        # No settings.admission.managed: the ValidatingWebhookConfiguration is a static manifest
        # (deploy/admission/, or the Helm chart) for CREATE and UPDATE only, so the operator needs
        # no cluster-wide write on webhook configurations and can never register DELETE.
    return settings


def webhook_from_env(env: dict[str, str]) -> Optional[kopf.WebhookServer]:
    """The validating webhook server, when KUBETUNE_WEBHOOK_PORT is set.

    KUBETUNE_WEBHOOK_HOST: the name the API server reaches (the operator's Service DNS name);
    KUBETUNE_WEBHOOK_CERT / _KEY: the TLS pair (e.g. from cert-manager). kopf can make a
    self-signed pair only with `certbuilder` installed, which the operator image leaves out."""
    if not env.get("KUBETUNE_WEBHOOK_PORT"):
        return None
    return kopf.WebhookServer(
        addr="0.0.0.0",
        port=int(env["KUBETUNE_WEBHOOK_PORT"]),
        host=env.get("KUBETUNE_WEBHOOK_HOST"),
        certfile=env.get("KUBETUNE_WEBHOOK_CERT"),
        pkeyfile=env.get("KUBETUNE_WEBHOOK_KEY"),
    )


def default_images(env: dict[str, str]) -> dict[str, str]:
    """The images of workloads whose manifest names none: KUBETUNE_DEFAULT_TRAINER_IMAGE and
    KUBETUNE_DEFAULT_SERVER_IMAGE (the Helm chart sets them from its values), else the built-in ones."""
    images = {}
    if env.get("KUBETUNE_DEFAULT_TRAINER_IMAGE"):
        images["trainer_image"] = env["KUBETUNE_DEFAULT_TRAINER_IMAGE"]
    if env.get("KUBETUNE_DEFAULT_SERVER_IMAGE"):
        images["server_image"] = env["KUBETUNE_DEFAULT_SERVER_IMAGE"]
    return images


def exact_namespaces(namespaces: Sequence[str]) -> bool:
    """Namespace names, none a kopf pattern (a glob `team-*`, a negation `!x`, a list `a,b`)."""
    return bool(namespaces) and not any(set(ns) & set("!*?,") for ns in namespaces)


def confine_to_namespaces(settings: kopf.OperatorSettings, namespaces: Sequence[str]) -> None:
    """With exact namespaces, Roles in them are all the operator needs: kopf's scans of the
    cluster's namespaces and CRDs would be refused (403), and kopf retries a refused namespace
    list for about a minute before it serves anything. Patterns still need those scans (and the
    rights to list and watch namespaces)."""
    if exact_namespaces(namespaces):
        settings.scanning.disabled = True


async def run_operator(
    config: OperatorConfig,
    *,
    namespaces: Sequence[str] = (),
    peering: Optional[str] = None,
    liveness: Optional[str] = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
    state: Optional[OperatorState] = None,
    settings: Optional[kopf.OperatorSettings] = None,
) -> None:
    """The operator as a coroutine (the CLI, the tests and the benchmark all start it this way)."""
    state = state or OperatorState(config)
    settings = settings or make_settings(peering=peering)
    confine_to_namespaces(settings, namespaces)
    identity = own_identity()
    if peering is not None:  # the sync loops pause with kopf's watches (operator/peering.py)
        state.config.peering = Peering(peering, identity, settings.peering.priority, tuple(namespaces))
    await kopf.operator(
        registry=build_registry(state),
        settings=settings,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=peering is None,
        peering_name=peering,
        identity=identity,
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def operator_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    webhook = webhook_from_env(dict(os.environ))
    config = OperatorConfig(
        metrics_port=args.metrics_port,
        admission=webhook is not None,
        sync_interval=float(os.environ.get("KUBETUNE_SYNC_INTERVAL", "5")),
        reference_grace=float(os.environ.get("KUBETUNE_REFERENCE_GRACE_SECONDS", "300")),
        reference_poll=float(os.environ.get("KUBETUNE_REFERENCE_POLL_SECONDS", "60")),
        tenancy=Policy.from_env(dict(os.environ)),
        cpu_per_gpu=os.environ.get("KUBETUNE_CPU_PER_GPU", "4"),
        memory_per_gpu=os.environ.get("KUBETUNE_MEMORY_PER_GPU", "32Gi"),
        **default_images(dict(os.environ)),
    )
    for name in ("cpu_per_gpu", "memory_per_gpu"):
        try:
            scale_quantity(getattr(config, name), 1)
        except ValueError as err:
            raise KubetuneError(f"KUBETUNE_{name.upper()}: {err}") from None
    settings = make_settings(peering=args.peering, webhook=webhook, priority=args.priority)
    asyncio.run(
        run_operator(config, namespaces=args.namespace or (), peering=args.peering, liveness=args.liveness, settings=settings)
    )
    return 0
