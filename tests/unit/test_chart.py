"""The chart's generated files come from one source each, and the values model agrees with the operator."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from lorafinetune.operator.chart import CHART_DIR, ChartValues, generated_files, main, values_schema


@pytest.mark.parametrize("path", sorted(generated_files()), ids=lambda p: p.name)
def test_generated_chart_file_is_current(path):
    assert path.read_text() == generated_files()[path], f"{path} drifted: run `make generate`"


def test_check_mode_reports_drift(tmp_path, monkeypatch, capsys):
    from lorafinetune.operator import chart

    stale = tmp_path / "values.yaml"
    stale.write_text("image: {}\n")
    monkeypatch.setattr(chart, "generated_files", lambda: {stale: "image: {tag: x}\n"})
    assert main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err


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
