"""The operator SIGKILLed at random points while fine-tunes go fail -> retry -> succeed, then checked for what a crash
could leave wrong: a duplicate or missing Job, `status.attempt` not naming the newest Job, an attempt counted twice,
a run stuck waiting for its own pods.

    LFT_OPERATOR_KILLS=50 $(scripts/env.sh)/bin/python -m pytest tests/integration/test_operator_crashes.py

`make test` runs it with 5 kills (about a minute); the fault run of the issue used 50.
"""

from __future__ import annotations

import os
import random
import threading
import time

from tests.conftest import wait_for
from tests.integration.conftest import Cluster, Operator
from tests.manifests import CLUSTER_RUN, manifest

KILLS = int(os.environ.get("LFT_OPERATOR_KILLS", "5"))


def _drive(c: Cluster, names: list[str], stop: threading.Event) -> None:
    """Play the pods' part: attempt 1 of every run crashes once it runs, attempt 2 succeeds."""
    while not stop.is_set():
        for name in list(names):
            try:
                status = c.get(name).get("status", {})
                attempt = status.get("attempt", 0)
                pods = c.pods(name, attempt) if attempt in (1, 2) else []
                running = [p for p in pods if p.status.phase == "Running"
                           and "test.lorafinetune.io/outcome" not in (p.metadata.annotations or {})]  # fmt: skip
                if len(running) == 2 and status.get("phase") == "Running":
                    outcome = "Failed" if attempt == 1 else "Succeeded"
                    c.finish_pods(name, attempt, outcome, **({"exit_code": "1"} if attempt == 1 else {}))
            except Exception:  # noqa: BLE001 - the API server is fine; a pod may vanish between list and patch
                pass
        stop.wait(0.3)


def test_the_operator_killed_at_random_points_loses_and_duplicates_nothing(cluster: Cluster, operator: Operator):
    c, rng = cluster, random.Random(int(os.environ.get("LFT_CRASH_SEED", "7")))
    names: list[str] = []
    stop = threading.Event()
    driver = threading.Thread(target=_drive, args=(c, names, stop), daemon=True)
    driver.start()
    try:
        for kill in range(KILLS):
            # New runs keep arriving, so the kills land in every phase: creating, pending, running, retrying.
            if kill % 2 == 0:
                name = f"k{kill}"
                c.apply(manifest(name, CLUSTER_RUN, runPolicy={"backoffLimit": 2}, resources={"gpusPerNode": 0}))
                names.append(name)
            time.sleep(rng.uniform(0.0, 2.5))
            operator.kill()
            operator.start()
        wait_for(lambda: all(c.get(n).get("status", {}).get("phase") == "Succeeded" for n in names), 240,
                 f"every run to succeed after {KILLS} kills")  # fmt: skip
    finally:
        stop.set()
        driver.join(timeout=10)
    for name in names:
        status = c.get(name)["status"]
        jobs = sorted(j.metadata.name for j in c.jobs(name))
        assert jobs == [f"{name}-a1", f"{name}-a2"], f"{name}: one Job per attempt, none missing: {jobs}"
        assert (status["attempt"], status["failedAttempts"]) == (2, 1), (name, status)
        assert status["lastFailure"]["attempt"] == 1, (name, status["lastFailure"])
