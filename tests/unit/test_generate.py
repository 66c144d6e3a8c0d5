"""Every generated file (the CRD, the chart's values, schema and copies) is what its one source gives today."""

from __future__ import annotations

import pytest

from lorafinetune import generate
from lorafinetune.generate.__main__ import main
from tests.conftest import run_cli


@pytest.mark.parametrize("path", sorted(generate.generated_files()), ids=lambda p: str(p.relative_to(generate.REPO)))
def test_generated_file_is_current(path):
    assert path.read_text() == generate.generated_files()[path], f"{path} drifted: run `make generate`"


def test_check_names_a_drifted_file_and_fails(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "values.yaml"
    stale.write_text("image: {}\n")
    monkeypatch.setattr(generate, "generated_files", lambda: {stale: "image: {tag: x}\n"})
    assert main(["--check"]) == 1
    assert f"stale: {stale}" in capsys.readouterr().err


def test_the_crd_command_prints_the_checked_in_crd():
    printed = run_cli("crd")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == (generate.REPO / "crds" / "lorafinetune.io_lorafinetunes.yaml").read_text()
