"""Run the operator: python -m lorafinetune.operator (settings from the environment; see settings.py)."""

from __future__ import annotations

import asyncio
import logging
import os

import kopf

from lorafinetune.api.manifest import GROUP, PLURAL, VERSION
from lorafinetune.operator import handlers, kube, logs  # noqa: F401  (handlers registers the handlers)
from lorafinetune.operator.leader import LeaderElection, identity
from lorafinetune.operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings.from_env()
    logs.configure(settings.log_format)
    where = ", ".join(settings.namespaces) if settings.namespaces else "all namespaces"
    logging.getLogger("lorafinetune.operator").info(
        "watching %s.%s/%s in %s; trainer image %s; %d workers", PLURAL, GROUP, VERSION, where,
        settings.default_image, settings.workers)  # fmt: skip
    if settings.leader_election:
        _lead(settings)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None,
        )
    )


def _lead(settings: OperatorSettings) -> None:
    """Return once this replica holds the Lease; exit the process the moment it loses it."""
    kube.load_config()
    lease = LeaderElection(settings.operator_namespace or "default", settings.leader_lease, identity(),
                           settings.lease_seconds, settings.lease_seconds / 3)  # fmt: skip
    lease.wait_to_lead(settings.liveness_port)
    log = logging.getLogger("lorafinetune.operator")
    log.info("leading as %s", lease.me)

    def lost() -> None:
        log.error("lost the lease %s: exiting so that exactly one replica acts", settings.leader_lease)
        logging.shutdown()
        os._exit(1)

    lease.keep_leading(lost)


if __name__ == "__main__":
    main()
