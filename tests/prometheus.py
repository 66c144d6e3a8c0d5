"""A real Prometheus server for tests, and the Grafana dashboard's queries to run against it."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, wait_for

DASHBOARD = REPO / "dashboards" / "lorafinetune.json"


class Prometheus:
    """A real Prometheus server on 127.0.0.1, scraping every second: static local targets (job -> (port, labels))
    and/or scrape configs of any kind (e.g. Kubernetes service discovery)."""

    def __init__(self, folder: Path, targets: dict[str, tuple[int, dict]] | None = None,
                 scrape_configs: list[dict] | None = None):  # fmt: skip
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]}
                for job, (port, labels) in (targets or {}).items()
            ] + (scrape_configs or []),
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed (.ci/run installs Debian's package)")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=(folder / "prometheus.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(lambda: urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200, 30, "Prometheus")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict]:
        params = urllib.parse.urlencode({"query": expr})
        body = json.load(urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def dashboard_queries(panel_filter=lambda p: True) -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" and panel_filter(p)
            for t in p["targets"]]  # fmt: skip


def substitute(expr: str, labels: dict[str, str]) -> str:
    return (expr.replace("$namespace", labels["namespace"]).replace("$finetune", labels["finetune"])
            .replace("$__rate_interval", "30s"))  # fmt: skip
