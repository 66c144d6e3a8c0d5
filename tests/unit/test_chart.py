"""The chart's values model: its generated files parse back to it, and it agrees with the operator."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from lorafinetune.generate.chart import CHART_DIR, ChartValues, values_schema


def test_values_yaml_parses_back_to_the_model_defaults():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert ChartValues.model_validate(values) == ChartValues()
    assert values["dashboard"]["labels"] == {"grafana_dashboard": "1"}


def test_values_schema_is_closed_so_typos_fail():
    schema = values_schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["operator"]["additionalProperties"] is False
    assert schema["properties"]["resources"]["additionalProperties"] is True  # free-form Kubernetes object
    assert "$defs" not in json.dumps(schema) and "$ref" not in json.dumps(schema)
    with pytest.raises(ValidationError, match="reconcileIntervalSecond"):
        ChartValues.model_validate({"operator": {"reconcileIntervalSecond": 5}})
