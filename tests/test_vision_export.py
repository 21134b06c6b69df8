"""vision.onnx (exporter/vision_graph.py) against transformers and our PyTorch definition, and its files.

Tolerance, fp32: both sides compute the same math in fp32 and differ in reduction order only (matmul blocking,
ONNX Runtime's fused MultiHeadAttention vs matmul + softmax), a few ulps per op: max abs difference <= 1e-5 of
the features' scale (max |feature|). A semantic error (pool order, norm offset, missing bias, wrong scale) moves
features by >= 1e-2 of their scale.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gemma3.exporter.recipes import recipe
from gemma3.exporter.vision_graph import DATA_FILE, FILE, export_vision
from gemma3.exporter.weights import ALIGN
from gemma3.graphs.config import preset, tiny
from gemma3.graphs.loaders.checkpoint import open_checkpoint
from gemma3.graphs.loaders.random_weights import RandomCheckpoint
from gemma3.graphs.model import Gemma3
from tests.hf_reference import random_hf_model, save_hf, tiny_multimodal

RTOL = 1e-5  # of max |feature|
REPO = Path(__file__).resolve().parents[1]


def _session(folder) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(folder / FILE), options, providers=["CPUExecutionProvider"])


def _pixels(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny random multimodal HF model, saved, exported fp32 and int4 by our exporter."""
    config = tiny_multimodal()
    hf = random_hf_model(config, seed=3)
    root = tmp_path_factory.mktemp("vision-tiny")
    checkpoint = open_checkpoint(save_hf(hf, root / "hf"))
    manifests = {}
    for name in ("fp32", "int4"):
        (root / name).mkdir()
        manifests[name] = export_vision(checkpoint, root / name, recipe(name))
    return hf, root, manifests


@pytest.mark.parametrize("images", [1, 3])
@torch.no_grad()
def test_tiny_matches_transformers(tiny_export, images):
    hf, root, manifests = tiny_export
    side = hf.config.vision_config.image_size
    pixels = _pixels(images, side, seed=images)
    reference = hf.get_image_features(pixels).pooler_output.numpy()  # (N, tokens, text_hidden)
    ours = _session(root / "fp32").run(None, {"pixel_values": pixels.numpy()})[0]
    diff, scale = float(np.abs(ours - reference).max()), float(np.abs(reference).max())
    print(f"tiny vision.onnx vs transformers, N={images}: max abs diff {diff:.2e} (scale {scale:.2f})")
    assert ours.shape == reference.shape == (images, 4, hf.config.text_config.hidden_size)
    assert diff <= RTOL * scale
    m = manifests["fp32"]
    assert m["weights"] == "fp32" and m["tokens_per_image"] == 4 and m["image_size"] == side


@torch.no_grad()
def test_tiny_quantized_precision_gives_8bit_vision(tiny_export):
    """A 4-bit decoder precision gives the vision graph 8-bit weights (see the manifest note)."""
    hf, root, manifests = tiny_export
    m = manifests["int4"]
    assert m["weights"] == "int8" and m["quantization"]["linear_bits"] == 8 and "4-bit" in m["note"]
    graph = onnx.load(root / "int4" / FILE, load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2 and all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")
    pixels = _pixels(2, hf.config.vision_config.image_size)
    reference = hf.get_image_features(pixels).pooler_output.numpy()
    ours = _session(root / "int4").run(None, {"pixel_values": pixels.numpy()})[0]
    rel = float(np.abs(ours - reference).max() / np.abs(reference).max())
    print(f"tiny 8-bit vision.onnx vs transformers fp32: max abs diff {rel:.2e} of the scale")
    assert rel < 1e-2


def test_text_only_model_has_no_vision_graph(tmp_path):
    with pytest.raises(ValueError, match="text-only"):
        export_vision(RandomCheckpoint(tiny()), tmp_path, recipe("fp32"))


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """The 4b preset's SigLIP at full width and resolution (896x896: 4096 patches, hidden 1152, 16 heads of 72) with
    3 of its 27 layers, random weights, fp32: every shape of the real tower, a ninth of its run time."""
    config = _full_width()
    checkpoint = RandomCheckpoint(config)
    folder = tmp_path_factory.mktemp("vision-4b")
    t0 = time.perf_counter()
    manifest = export_vision(checkpoint, folder, recipe("fp32"))
    print(f"full-size vision export: {time.perf_counter() - t0:.1f} s")
    return checkpoint, folder, manifest


def _our_image_model(checkpoint) -> Gemma3:
    """`Gemma3` with only the tower and projector filled (the 4b text decoder stays on meta: 16 GB in fp32)."""
    with torch.device("meta"):
        model = Gemma3(checkpoint.config)
    for part in ("vision", "projector"):
        module = getattr(model, part)
        module.load_state_dict({name: checkpoint.tensor(f"{part}.{name}") for name, _ in module.named_parameters()},
                               assign=True)
    return model.eval()


# Run in a child: THP_MEM_ALLOC_ENABLE makes torch back its 1 GB attention temporaries (16 x 4096 x 4096 fp32 per
# layer) with huge pages. It is read once, at the first allocation, and page faults otherwise cost this VM
# about a second per such tensor: 91 s -> 65 s for the eager forward.
def _full_width():
    """preset("4b") with its vision tower cut to 3 layers (the layers are identical in shape)."""
    config = preset("4b")
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision, num_layers=3))


_REFERENCE = """
import sys, numpy, torch
from gemma3.graphs.loaders.random_weights import RandomCheckpoint
from tests.test_vision_export import _full_width, _our_image_model, _pixels
with torch.no_grad():
    model = _our_image_model(RandomCheckpoint(_full_width()))
    numpy.save(sys.argv[1], model.image_features(_pixels(1, 896)).numpy())
"""


def test_full_size_matches_pytorch(full_size, tmp_path):
    checkpoint, folder, manifest = full_size
    assert checkpoint.config == _full_width() and checkpoint.seed == 0  # what _REFERENCE rebuilds
    t0 = time.perf_counter()
    ours = _session(folder).run(None, {"pixel_values": _pixels(1, 896).numpy()})[0]
    t1 = time.perf_counter()
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1", OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-c", _REFERENCE, str(tmp_path / "ref.npy")], check=True, cwd=REPO, env=env)
    reference = np.load(tmp_path / "ref.npy")
    t2 = time.perf_counter()
    diff, scale = float(np.abs(ours - reference).max()), float(np.abs(reference).max())
    print(f"full-size vision.onnx vs our PyTorch, N=1: max abs diff {diff:.2e} (scale {scale:.2f}); "
          f"ORT {t1 - t0:.1f} s (with load), PyTorch {t2 - t1:.1f} s (child, with weights)")
    assert ours.shape == reference.shape == (1, 256, checkpoint.config.hidden_size)
    assert diff <= RTOL * scale
    assert manifest["outputs"]["image_features"]["shape"] == ["images", 256, checkpoint.config.hidden_size]


def test_full_size_files(full_size):
    """Weights external in vision.onnx.data at page-aligned offsets; a small graph file; IR 10; fused attention."""
    checkpoint, folder, manifest = full_size
    proto = onnx.load(folder / FILE, load_external_data=False)
    assert proto.ir_version == 10
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == ["image_features"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "images"
    external, inline_bytes = [], 0
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            external.append((info["location"], int(info["offset"]), int(info["length"])))
        else:
            inline_bytes += len(tensor.raw_data) or 4 * len(tensor.float_data) or 8 * len(tensor.int64_data)
    assert {location for location, _, _ in external} == {DATA_FILE}
    assert all(offset % ALIGN == 0 for _, offset, _ in external)
    data_size = (folder / DATA_FILE).stat().st_size
    assert data_size == manifest["weights_bytes"] and max(o + n for _, o, n in external) <= data_size
    parameters = sum(np.prod(checkpoint.shape(n)) for n in checkpoint.names() if n.split(".")[0] != "text")
    assert parameters * 4 <= data_size < parameters * 4 * 1.01  # every parameter once, fp32, little padding
    # inline: shape constants and the q/k/v biases the attention fusion concatenates (27 x 3456 floats)
    assert inline_bytes < 2**20 and (folder / FILE).stat().st_size < 2**21
    layers = checkpoint.config.vision.num_layers
    assert sum(n.op_type == "MultiHeadAttention" for n in proto.graph.node) == layers
    assert any(n.name == "vision.layers.0.attn.MultiHeadAttention" for n in proto.graph.node)
    assert manifest["image_size"] == 896 and manifest["tokens_per_image"] == 256
