"""The metric names others read are ones the trainer or the operator exports: a renamed metric must fail here, not
leave a Grafana panel empty (tests/integration/test_metrics.py runs the queries, but needs a cluster)."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from lorafinetune.contract import TrainerMetricNames
from lorafinetune.operator.metrics import OperatorMetrics
from lorafinetune.trainer.metrics import TrainerMetrics
from tests.conftest import REPO

# The chart ships a byte copy of it (tests/unit/test_generate.py checks the copy is current).
DASHBOARD = REPO / "dashboards" / "lorafinetune.json"
# The series each metric type is exported as.
SUFFIXES = {"gauge": [""], "counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}


def exported(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def test_every_metric_the_dashboard_queries_is_exported():
    known = exported(TrainerMetrics().registry) | exported(OperatorMetrics().registry)
    used = set(re.findall(r"lorafinetune_[a-z_]+", DASHBOARD.read_text()))
    assert used, "no metric names found in the dashboard"
    assert used <= known, f"not exported by the trainer or the operator: {sorted(used - known)}"


def test_the_contract_names_exactly_the_trainer_metrics():
    names = {v for k, v in vars(TrainerMetricNames).items() if k.isupper()}
    assert names == {family.name for family in TrainerMetrics().registry.collect()}
