"""Build-time generators: every file derived from the typed sources, so none is edited by hand.

    python -m lorafinetune.generate --write     (make generate)
    python -m lorafinetune.generate --check     exits 1 naming the files that drifted (tests/unit/test_generate.py)

  crds/lorafinetune.io_lorafinetunes.yaml   from the pydantic models of lorafinetune.api (crd.py)
  charts/lorafinetune/...                   the chart's values, schema and copies (chart.py)

Nothing at run time imports this package (an import-linter contract in pyproject.toml says so); only the CLI's
`lorafinetune crd`, which prints the CRD for `kubectl apply -f -`.
"""

from __future__ import annotations

from pathlib import Path

from lorafinetune.generate.chart import chart_files
from lorafinetune.generate.crd import CRD_PATH, REPO, render_crd

__all__ = ["REPO", "generated_files"]


def generated_files() -> dict[Path, str]:
    return {CRD_PATH: render_crd(), **chart_files()}
