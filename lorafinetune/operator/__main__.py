"""Run the operator: python -m lorafinetune.operator (settings from the environment; see settings.py)."""

from __future__ import annotations

import asyncio

import kopf

from lorafinetune.operator import handlers  # noqa: F401  (registers the handlers)
from lorafinetune.operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings.from_env()
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
