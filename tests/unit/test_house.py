"""House rules a test can prove: the linter's rules (pyproject.toml [tool.ruff]), the type checker's ([tool.mypy]),
and the layering the README promises ([tool.importlinter]: api at the bottom, contract/storage above it, operator,
trainer and the local runner independent of each other)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def test_the_code_passes_the_linter():
    out = subprocess.run([BIN / "ruff", "check", "lorafinetune", "tests", "benchmarks"], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_layers_import_only_downwards():
    out = subprocess.run([BIN / "lint-imports"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "0 broken" in out.stdout, out.stdout + out.stderr


def test_the_code_type_checks():
    out = subprocess.run([BIN / "mypy"], cwd=REPO, capture_output=True, text=True)  # what it checks: [tool.mypy]
    assert out.returncode == 0, out.stdout + out.stderr
