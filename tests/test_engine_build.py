"""`gemma3-build` and the TensorRT plugin registration, as far as this GPU-less, TensorRT-less machine can go.

Checked here: the optimization profiles against the exported graph's inputs, the limits, the one-line refusals
(no TensorRT, wrong folder), nothing half-written, and the plugin's plain functions (types, tactics, launch spec)
against the kernel's ABI. The engine build itself needs TensorRT and a GPU: that test skips, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import onnx
import pytest

from gemma3.engine.profiles import DECODE, PREFILL, check_limits, decoder_profiles
from gemma3.exporter.export import export
from gemma3.exporter.recipes import recipe
from gemma3.graphs import open_checkpoint
from gemma3.graphs.config import tiny
from gemma3.plugins import attention_launch as launch
from gemma3.plugins import attention_schema as schema
from gemma3.plugins import tensorrt_plugin
from tests.hf_reference import random_hf_model, save_hf

NOT_IN_CI = "needs TensorRT and an NVIDIA GPU: not run in this repository's CI"


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    folder = save_hf(random_hf_model(tiny(), seed=3), tmp_path_factory.mktemp("ckpt"))
    (folder / "tokenizer.model").write_bytes(b"placeholder: the build does not tokenize")
    return export(open_checkpoint(folder), tmp_path_factory.mktemp("trt") / "bf16", recipe("bf16", "tensorrt"),
                  max_context=64, max_batch=2, eval_graph=False)


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_profiles_cover_every_dynamic_input(trt_export):
    manifest = _manifest(trt_export)
    graph = onnx.load(trt_export / "decoder.onnx", load_external_data=False).graph
    profiles = decoder_profiles(manifest, max_batch=2, max_context=48, max_chunk=16)
    for name, profile in profiles.items():
        for value in graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            if all(d is not None for d in dims):  # static (the workspace): no profile entry
                assert value.name not in profile and value.name == schema.WORKSPACE_INPUT
                continue
            lo, opt, hi = profile[value.name]
            for shape in (lo, opt, hi):
                assert len(shape) == len(dims)
                assert all(d is None or d == s for d, s in zip(dims, shape)), (name, value.name, shape)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    ids = manifest["decoder"]["input_ids"]
    assert profiles[DECODE][ids][2] == (2, 1) and profiles[PREFILL][ids][2] == (2, 16)
    windows = [layer["window"] for layer in manifest["decoder"]["layers"]]
    rows = [profiles[DECODE][layer["past_key"]][2][2] for layer in manifest["decoder"]["layers"]]
    assert rows == [w or 48 for w in windows]  # rings of W rows; globals at the engine's max context


def test_limits_are_the_exports(trt_export):
    manifest = _manifest(trt_export)
    with pytest.raises(ValueError, match="--max-batch 3"):
        check_limits(manifest, 3, 64, 16)
    with pytest.raises(ValueError, match="--max-context 65"):
        check_limits(manifest, 1, 65, 16)
    with pytest.raises(ValueError, match="--max-chunk 0"):
        check_limits(manifest, 1, 64, 0)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_one_line_and_nothing_written(trt_export):
    run = subprocess.run([sys.executable, "-m", "gemma3.engine.cli", str(trt_export)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "pip install tensorrt" in run.stderr
    assert not (trt_export / "engines").exists() and not (trt_export / ".engines.partial").exists()


def test_an_ort_export_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "ort"}))
    run = subprocess.run([sys.executable, "-m", "gemma3.engine.cli", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "target 'ort'" in run.stderr


def test_plugin_types_and_launch_match_the_kernel_abi():
    n_io = len(schema.PLUGIN_INPUTS) + len(schema.OUTPUTS)
    assert n_io == launch.N_INPUTS + launch.N_OUTPUTS
    combos = tensorrt_plugin.type_combinations()
    assert all(len(c.split(", ")) == n_io for c in combos)
    assert "BF16, BF16, BF16, FP8, FP8, INT32, INT32, FP32, BF16, FP8, FP8" in combos
    assert [tensorrt_plugin.tactic_for(t) for t in tensorrt_plugin.TACTIC_IDS] == list(launch.TACTICS)
    attrs = launch.Attributes(8, 4, 256, 256 ** -0.5, 1024)
    spec = tensorrt_plugin.launch_spec(attrs, 1, 3, 4096, launch.TACTICS[1], cdiv=lambda a, b: -(-a // b))
    assert spec == {"grid": (1, 12, launch.TACTICS[1].splits), "block": 128, "scalars": (1, 4096)}
    assert tensorrt_plugin.PLUGIN_ID == "gemma3::HybridAttention"


def test_engine_build_on_a_gpu(trt_export):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip(NOT_IN_CI)
    from gemma3.engine.build import build_engines

    out = build_engines(trt_export, max_context=64, max_chunk=16)
    record = json.loads((out / "engines.json").read_text())
    assert (out / "decoder.engine").stat().st_size > 0 and record["precision"] == "bf16"
