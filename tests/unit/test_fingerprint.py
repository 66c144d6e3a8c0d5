"""What a checkpoint or a published adapter was trained from (trainer/fingerprint.py), where training.precision
auto chose a precision on other nodes: the same spec as written, told apart from another spec."""

from __future__ import annotations

import json

import pytest

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.contract import CHECKPOINTS_DIR, COMPLETE_MARKER
from lorafinetune.trainer import checkpoint
from lorafinetune.trainer.errors import ConfigError
from lorafinetune.trainer.fingerprint import spec_fingerprint, trained_in_other_precision
from tests.manifests import MINIMAL, manifest


def spec(precision: str, **training) -> LoRAFineTuneSpec:
    """The spec as the trainer holds it: training.precision auto already resolved to `precision`."""
    lft = manifest("fp", MINIMAL, training={"precision": precision, **training})
    return LoRAFineTuneSpec.model_validate(lft["spec"])


def test_only_a_precision_auto_picked_on_both_sides_or_bf16_from_before_auto_counts_as_the_same_spec():
    here = spec("fp32")  # auto, resolved on a CPU without native bf16
    there = spec_fingerprint(spec("bf16"))
    assert trained_in_other_precision(there, here, "auto", "auto") == "bf16"  # auto picked bf16 on those nodes
    assert trained_in_other_precision(there, here, "auto", None) == "bf16"  # before auto, bf16 was the default
    assert trained_in_other_precision(spec_fingerprint(spec("fp16")), here, "auto", "auto") == "fp16"
    assert trained_in_other_precision(spec_fingerprint(spec("fp16")), here, "auto", None) is None  # never a default
    assert trained_in_other_precision(there, here, "auto", "bf16") is None  # written there: another spec
    assert trained_in_other_precision(there, here, "fp32", "auto") is None  # written here: another spec
    changed_more = spec_fingerprint(spec("bf16", learningRate=0.1))
    assert trained_in_other_precision(changed_more, here, "auto", "auto") is None
    assert trained_in_other_precision({}, here, "auto", "auto") is None


def test_prefix_sharing_changes_how_a_result_is_computed_not_which_result():
    def dataset_fingerprint(**dataset) -> str:
        lft = manifest("fp", MINIMAL, dataset=dataset)
        return spec_fingerprint(LoRAFineTuneSpec.model_validate(lft["spec"]))["dataset"]

    shared, unshared = dataset_fingerprint(sharePrefix=True), dataset_fingerprint(sharePrefix=False)
    assert shared == unshared == dataset_fingerprint()  # also a checkpoint from before the field existed
    assert dataset_fingerprint(packing=True) != shared


def write_checkpoint(run_dir, step: int, meta: dict) -> None:
    folder = run_dir / CHECKPOINTS_DIR / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_text(json.dumps({"worldSize": 1, **meta}))


@pytest.mark.parametrize(("stored_written", "why"), [
    ("auto", "which training.precision auto picked there"),
    (None, "the default before auto"),  # a checkpoint from before auto records neither precision
])  # fmt: skip
def test_a_checkpoint_auto_trained_in_another_precision_is_refused_naming_the_precision_to_write(
    tmp_path, stored_written, why
):  # fmt: skip
    written = {"precision": "bf16", "writtenPrecision": "auto"} if stored_written else {}
    write_checkpoint(tmp_path, 2, {**written, "fingerprint": {**spec_fingerprint(spec("bf16")), "trainData": "d"}})
    here = spec("fp32")
    with pytest.raises(ConfigError) as refused:
        checkpoint.latest_checkpoint(tmp_path, 1, {**spec_fingerprint(here), "trainData": "d"}, here, "auto")
    assert f"was trained in bf16 ({why}), but training.precision auto picks fp32 here" in str(refused.value)
    assert "Write training.precision: bf16 to resume it" in str(refused.value)
    # where auto picks bf16 again, it resumes
    there = spec("bf16")
    found = checkpoint.latest_checkpoint(tmp_path, 1, {**spec_fingerprint(there), "trainData": "d"}, there, "auto")
    assert found is not None and found.step == 2


def test_a_checkpoint_whose_precision_was_written_is_refused_as_a_changed_spec(tmp_path):
    meta = {"precision": "bf16", "writtenPrecision": "bf16"}
    write_checkpoint(tmp_path, 2, {**meta, "fingerprint": {**spec_fingerprint(spec("bf16")), "trainData": "d"}})
    here = spec("fp32")
    with pytest.raises(ConfigError, match=r"made with a different spec \(changed: training\)"):
        checkpoint.latest_checkpoint(tmp_path, 1, {**spec_fingerprint(here), "trainData": "d"}, here, "auto")
