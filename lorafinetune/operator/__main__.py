"""Run the operator: python -m lorafinetune.operator (settings from the environment; see settings.py)."""

from __future__ import annotations

import asyncio
import logging

import kopf

from lorafinetune.api.manifest import GROUP, PLURAL, VERSION
from lorafinetune.operator import handlers  # noqa: F401  (registers the handlers)
from lorafinetune.operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings.from_env()
    # One line per transition and per error (handlers.log), with namespace/name. kopf's own INFO lines ("handler
    # succeeded" for every resource on every timer tick) would bury them, so kopf logs warnings and errors only.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # a line per liveness probe otherwise
    where = ", ".join(settings.namespaces) if settings.namespaces else "all namespaces"
    logging.getLogger("lorafinetune.operator").info(
        "watching %s.%s/%s in %s; trainer image %s; Job events %s", PLURAL, GROUP, VERSION, where,
        settings.default_image, "watched" if settings.watch_jobs else "not watched (timer only)")  # fmt: skip
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz" if settings.liveness_port else None,
        )
    )


if __name__ == "__main__":
    main()
