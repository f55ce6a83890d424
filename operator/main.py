"""`kubetune operator`: run the operator (kopf) against the cluster in the current context."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any, Optional, Sequence

import kopf

from kubetune.operator.handlers import OperatorConfig, OperatorState, build_registry


def make_settings(*, peering: Optional[str], webhook_port: Optional[int] = None, webhook_host: Optional[str] = None) -> kopf.OperatorSettings:
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
    else:
        settings.peering.standalone = True
    if webhook_port:
        settings.admission.server = kopf.WebhookServer(port=webhook_port, host=webhook_host)
        settings.admission.managed = "kubetune.dev"
    return settings


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
    await kopf.operator(
        registry=build_registry(state),
        settings=settings or make_settings(peering=peering),
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=peering is None,
        peering_name=peering,
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def operator_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    webhook_port = int(os.environ["KUBETUNE_WEBHOOK_PORT"]) if os.environ.get("KUBETUNE_WEBHOOK_PORT") else None
    config = OperatorConfig(
        metrics_port=args.metrics_port,
        admission=webhook_port is not None,
        sync_interval=float(os.environ.get("KUBETUNE_SYNC_INTERVAL", "5")),
    )
    settings = make_settings(peering=args.peering, webhook_port=webhook_port, webhook_host=os.environ.get("KUBETUNE_WEBHOOK_HOST"))
    asyncio.run(
        run_operator(config, namespaces=args.namespace or (), peering=args.peering, liveness=args.liveness, settings=settings)
    )
    return 0
