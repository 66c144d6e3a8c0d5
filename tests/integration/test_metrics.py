"""A real Prometheus scraping a real training run (2 ranks) and the operator; the Grafana dashboard's queries run
against it and must all return data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, wait_for, write_manifest
from tests.integration.conftest import Cluster
from tests.manifests import CLUSTER_RUN, manifest, tiny_cpu_run
from tests.prometheus import DASHBOARD, Prometheus, dashboard_queries, substitute

pytestmark = pytest.mark.integration


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "lorafinetune"
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "namespace", "finetune"]
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Run overview", "Learning", "Throughput", "GPU (needs the NVIDIA DCGM exporter)", "Operator health"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


def test_prometheus_scrapes_training_and_operator_and_every_dashboard_query_returns_data(
    cluster: Cluster, operator, tmp_path, tiny_model, chat_data
):
    # The fine-tune exists in the cluster (so the operator reports its phase), and its rank 0 is a local run that
    # Prometheus scrapes with the labels a PodMonitor would give the pod.
    cluster.apply(manifest("watched", CLUSTER_RUN))
    wait_for(lambda: cluster.get("watched").get("status", {}).get("phase") == "Running", 60, "Running")
    labels = {"namespace": cluster.ns, "finetune": "watched"}
    trainer_port = free_port()
    prom = Prometheus(tmp_path, {"trainer": (trainer_port, labels), "operator": (operator.metrics_port, {})})
    out = tmp_path / "run"
    spec = {"training": {"maxSteps": 400}, "evaluation": {"everySteps": 20}, "checkpointing": {"everySteps": 50}}
    lft = manifest(labels["finetune"], tiny_cpu_run(tiny_model, chat_data, out), **spec)
    path = write_manifest(tmp_path / "m.yaml", lft)
    run = subprocess.Popen(
        [sys.executable, "-m", "lorafinetune.cli", "run", str(path), "--quiet", "--metrics-port", str(trainer_port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        sel = f'{{namespace="{cluster.ns}", finetune="watched"}}'
        wait_for(lambda: prom.query(f"lorafinetune_last_checkpoint_timestamp_seconds{sel} > 0")
                 and prom.query(f"lorafinetune_global_step{sel} >= 120"), 180, "120 steps scraped")  # fmt: skip
        assert run.poll() is None, "the run must still be going: rate() needs recent samples"

        # 1. Every trainer series, with the expected labels and sensible values.
        step, total = prom.value(f"lorafinetune_global_step{sel}"), prom.value(f"lorafinetune_total_steps{sel}")
        assert 120 <= step <= total == 400
        assert 0 < prom.value(f"lorafinetune_train_loss{sel}") < 20
        assert 0 < prom.value(f"lorafinetune_eval_loss{sel}") < 20
        assert 0 < prom.value(f"lorafinetune_learning_rate{sel}") <= 0.01
        tokens = prom.value(f"lorafinetune_tokens_total{sel}")
        trained = prom.value(f"lorafinetune_trained_tokens_total{sel}")
        assert 0 < trained < tokens
        assert prom.value(f"lorafinetune_optimizer_steps_total{sel}") >= 120
        assert prom.value(f"lorafinetune_step_duration_seconds_count{sel}") >= 120
        assert prom.value(f"lorafinetune_tokens_per_second{sel}") > 0
        assert prom.value(f"lorafinetune_eta_seconds{sel}") >= 0
        assert abs(time.time() - prom.value(f"lorafinetune_last_checkpoint_timestamp_seconds{sel}")) < 120
        assert prom.value(f"lorafinetune_world_size{sel}") == 2
        [info] = prom.query(f"lorafinetune_trainer_info{sel}")
        assert info["metric"]["model"].startswith("file://") and info["metric"]["torch"].startswith("2.")
        assert info["metric"]["precision"] == "fp32", "what the run trains in (tiny_cpu_run writes fp32)"
        # No unbounded labels: every trainer series carries only the target's labels (+ info's fixed keys).
        for series in prom.query('{job="trainer", __name__=~"lorafinetune_.*", __name__!="lorafinetune_trainer_info"}'):
            assert set(series["metric"]) - {"__name__", "le"} == {"job", "instance", "namespace", "finetune"}, series

        # 2. The operator's series.
        assert prom.value('sum(lorafinetune_operator_reconciles_total{job="operator"})') > 0
        assert prom.query('lorafinetune_operator_finetune_phase{finetune="watched", phase="Running"} == 1')

        # 3. Every dashboard query returns data; the optional DCGM ones at least parse and run.
        queries = dashboard_queries(lambda p: "tags" not in p)
        empty = [(t, e) for t, e in queries if not prom.query(substitute(e, labels))]
        assert not empty, f"dashboard queries without data: {empty}"
        for _, expr in dashboard_queries(lambda p: "optional:dcgm" in p.get("tags", [])):
            prom.query(substitute(expr, labels))
        for _, expr in dashboard_queries():
            for result in prom.query(substitute(expr, labels)):
                assert not math.isnan(float(result["value"][1])) or "histogram_quantile" in expr, expr

        # 4. A loss-curve PNG straight from Prometheus, for people without Grafana.
        png = tmp_path / "loss.png"
        plot = subprocess.run(
            [sys.executable, "-m", "lorafinetune.cli", "plot", "--prometheus", prom.url, "--finetune", "watched",
             "--namespace", cluster.ns, "--since", "600", "-o", str(png)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert plot.returncode == 0, plot.stdout + plot.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        output, _ = run.communicate(timeout=300)
        prom.stop()
    assert run.returncode == 0, output
