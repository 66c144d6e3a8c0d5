"""Leader election on a coordination.k8s.io Lease, so that two or more operator replicas never both act.

Only the holder of the Lease runs the operator; the others wait, answering their liveness probe meanwhile. The holder
renews the Lease every `renew_seconds`; a replica takes it over once its record has not changed for
`lease_seconds` as observed on the replica's own clock (as client-go does: no trust in other machines' clocks). A
leader that cannot renew for `lease_seconds` exits at once, before anyone else can take over, so two leaders never
overlap; its pod restarts as a standby. Updates carry the resourceVersion read, so two standbys racing for an
expired Lease cannot both win.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("lorafinetune.operator")


def identity() -> str:
    """Pod name (HOSTNAME in a pod) plus a random suffix: a restarted pod is a new candidate."""
    return f"{os.environ.get('HOSTNAME', 'operator')}-{uuid.uuid4().hex[:6]}"


class LeaderElection:
    def __init__(self, namespace: str, name: str, me: str, lease_seconds: float = 15.0, renew_seconds: float = 5.0):
        self.namespace, self.name, self.me = namespace, name, me
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self._observed: tuple[str | None, str | None] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0  # monotonic time it was first seen

    # ---------------------------------------------------------------- one try
    def try_acquire_or_renew(self) -> bool:
        """True if this replica holds the Lease after the call."""
        api = client.CoordinationV1Api()
        now = datetime.now(UTC)
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(now, transitions=0, acquired=now),
            )
            try:
                api.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as create_err:
                if create_err.status == 409:  # another replica created it first
                    return False
                raise
        spec = lease.spec or client.V1LeaseSpec()
        record = (spec.holder_identity, str(spec.renew_time))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        mine = spec.holder_identity == self.me
        expired = time.monotonic() - self._observed_at >= self.lease_seconds
        if not (mine or not spec.holder_identity or expired):
            return False
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        acquired = spec.acquire_time if mine else now
        lease.spec = self._spec(now, transitions, acquired)
        try:
            api.replace_namespaced_lease(self.name, self.namespace, lease)  # carries the resourceVersion we read
        except ApiException as err:
            if err.status == 409:  # changed meanwhile: somebody renewed or took it
                return False
            raise
        if not mine:
            log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.me)
        return True

    def _spec(self, now: datetime, transitions: int, acquired: datetime) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(holder_identity=self.me, lease_duration_seconds=int(self.lease_seconds),
                                  acquire_time=acquired, renew_time=now, lease_transitions=transitions)  # fmt: skip

    # ---------------------------------------------------------------- the loops
    def wait_to_lead(self, liveness_port: int = 0) -> None:
        """Block until this replica holds the Lease, answering /healthz on `liveness_port` meanwhile."""
        server = _serve_healthz(liveness_port) if liveness_port else None
        log.info("waiting to lead: lease %s/%s (this replica: %s)", self.namespace, self.name, self.me)
        try:
            while True:
                try:
                    if self.try_acquire_or_renew():
                        return
                except Exception:  # noqa: BLE001 - the API server may be briefly unreachable; keep waiting
                    log.exception("lease %s/%s: could not read or update it", self.namespace, self.name)
                time.sleep(self.renew_seconds / 2)
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()  # kopf's liveness endpoint binds the same port next

    def keep_leading(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew in the background; call `on_lost` once renewing has failed for lease_seconds (or another took it)."""

        def loop() -> None:
            last_renewed = time.monotonic()
            while True:
                time.sleep(self.renew_seconds)
                try:
                    if self.try_acquire_or_renew():
                        last_renewed = time.monotonic()
                        continue
                    log.error("lease %s/%s was taken over", self.namespace, self.name)
                except Exception:  # noqa: BLE001 - retried until the lease would expire
                    log.exception("lease %s/%s: renewing failed", self.namespace, self.name)
                    # Give up a margin before others may see it expired: never two leaders at once.
                    if time.monotonic() - last_renewed < self.lease_seconds - self.renew_seconds:
                        continue
                on_lost()
                return

        thread = threading.Thread(target=loop, name="lft-lease", daemon=True)
        thread.start()
        return thread


def _serve_healthz(port: int) -> ThreadingHTTPServer:
    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *_: object) -> None:  # one line per probe would bury the operator's log
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Healthz)
    threading.Thread(target=server.serve_forever, name="lft-standby-healthz", daemon=True).start()
    return server
