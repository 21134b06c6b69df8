"""The tensorrt-target graphs, run on the CPU (exporter/tensorrt_on_cpu.py), against transformers and our model.

fp32 compute: tolerance 1e-4 (same math, fp32 reduction order; the HybridAttention nodes run the reference op
lowered to standard ONNX). bf16: every tensor the graph writes is rounded to bf16, so logits move by a few bf16
steps of the logit scale against our PyTorch model in bf16 (which rounds at its own op boundaries): tolerance
stated per test. Quantized weight formats are checked where they are decoded: ONNX Runtime's DequantizeLinear
reads the stored bytes back to exactly our quantizer's values.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

from gemma3.exporter.export import export
from gemma3.exporter.quantize import dequantize_blockwise, signed_int4_columns
from gemma3.exporter.quantizers import quantize
from gemma3.exporter.recipes import Scheme, recipe
from gemma3.exporter.tensorrt_on_cpu import CpuSteps
from gemma3.graphs import load_checkpoint, open_checkpoint
from gemma3.graphs.config import tiny
from gemma3.plugins import attention_launch as launch
from gemma3.plugins import attention_schema as schema
from tests.hf_reference import prompt_with_images, random_hf_model, save_hf, tiny_multimodal

CHUNKS = [7, 12, 1, 1, 1, 9, 1]  # 12 > window 8: a chunk longer than the ring


def _trt(name: str):
    return recipe(name, "tensorrt")


@pytest.fixture(scope="module")
def trt_fp32(tiny_checkpoint, tmp_path_factory):
    return export(open_checkpoint(tiny_checkpoint[1]), tmp_path_factory.mktemp("trt") / "fp32", _trt("fp32"),
                  max_context=64, max_batch=4)


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = 2
    return ids


def _run_chunks(steps: CpuSteps, ids: torch.Tensor) -> list[np.ndarray]:
    out, pos = [], 0
    for n in CHUNKS:
        out.append(steps(ids[:, pos:pos + n].numpy())[0, -1])
        pos += n
    return out


@torch.no_grad()
def test_fp32_graph_matches_transformers(tiny_checkpoint, trt_fp32):
    hf, _ = tiny_checkpoint
    ids = _ids(sum(CHUNKS))
    reference = hf(ids).logits[0].numpy()
    got = _run_chunks(CpuSteps(trt_fp32), ids)
    ends = np.cumsum(CHUNKS) - 1
    worst = max(float(np.abs(g - reference[e]).max()) for g, e in zip(got, ends))
    print(f"tensorrt fp32 graph on CPU vs transformers, chunked prefill + decode: {worst:.2e}")
    assert worst < 1e-4


def test_batched_decode_equals_each_sequence_alone(trt_fp32):
    """Two sequences at different positions (13 and 5 tokens in) decode in one B=2 step each: per-sequence
    past_len, the local rings wrapping at different rows. Each row equals the sequence run alone."""
    a, b = _ids(13, seed=1).numpy(), _ids(5, seed=2).numpy()
    alone = []
    for prompt in (a, b):
        steps = CpuSteps(trt_fp32)
        steps(prompt)
        alone.append([steps(np.array([[7 + i]]))[0, -1] for i in range(6)])
    batched, singles = CpuSteps(trt_fp32, batch=2), [CpuSteps(trt_fp32), CpuSteps(trt_fp32)]
    for single, prompt in zip(singles, (a, b)):
        single(prompt)
    for name in batched.cache:
        batched.cache[name] = np.concatenate([s.cache[name] for s in singles])
    batched.past = np.array([13, 5], np.int32)
    for i in range(6):
        logits = batched(np.array([[7 + i], [7 + i]]))[:, -1]
        for row in range(2):
            assert np.abs(logits[row] - alone[row][i]).max() < 1e-5


def test_graph_contract(trt_fp32):
    """What TensorRT's parser and the plugin see: one gemma3::HybridAttention per layer with int/float attributes,
    past_len [batch] int32, explicit caches (ring of W rows / max context), standard ONNX only."""
    model = onnx.load(trt_fp32 / "decoder.onnx", load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == schema.ONNX_OP_TYPE]
    config = tiny()
    assert len(nodes) == config.num_layers and {n.domain for n in nodes} == {schema.ONNX_DOMAIN}
    for node in nodes:
        kinds = {a.name: a.type for a in node.attribute}
        assert set(kinds) == {a.name for a in schema.ATTRIBUTES}
        assert all(t in (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT) for t in kinds.values())
    assert {n.domain for n in model.graph.node} <= {"", schema.ONNX_DOMAIN}  # no com.microsoft ops
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert inputs["past_len"].elem_type == TensorProto.INT32
    assert [d.dim_param or d.dim_value for d in inputs["past_len"].shape.dim] == ["batch"]
    manifest = json.loads((trt_fp32 / "manifest.json").read_text())
    assert manifest["target"] == "tensorrt" and manifest["engine"]["max_batch"] == 4
    capacities = [layer["capacity"] for layer in manifest["decoder"]["layers"]]
    assert capacities == [config.window(i) or 64 for i in range(config.num_layers)]
    # the plugin's scratch: one graph input, the 8th input of every node, sized for the max batch
    workspace = manifest["decoder"]["workspace"]
    assert all(list(n.input)[len(schema.INPUTS):] == [schema.WORKSPACE_INPUT] for n in nodes)
    assert [d.dim_value for d in inputs[schema.WORKSPACE_INPUT].shape.dim] == [workspace["elements"]]
    assert workspace["elements"] == launch.workspace_elements(4, config.num_kv_heads, config.head_dim)


@torch.no_grad()
def test_bf16_graph_tracks_our_bf16_model(tiny_checkpoint, tmp_path):
    _, folder = tiny_checkpoint
    out = export(open_checkpoint(folder), tmp_path / "bf16", _trt("bf16"), max_context=64, eval_graph=False)
    model = onnx.load(out / "decoder.onnx", load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert all(t == TensorProto.BFLOAT16 for name, t in types.items() if name.endswith(".weight"))
    ids = _ids(sum(CHUNKS), seed=4)
    ours = load_checkpoint(folder).to(torch.bfloat16)
    reference = ours(ids)[0].float().numpy()
    got = _run_chunks(CpuSteps(out), ids)
    scale = float(np.abs(reference).max())
    worst = max(float(np.abs(g - reference[e]).max()) for g, e in zip(got, np.cumsum(CHUNKS) - 1))
    print(f"tensorrt bf16 graph on CPU vs our bf16 model: {worst:.3e} (logit scale {scale:.2f})")
    assert worst < 0.03 * scale


def test_int4_bytes_decode_to_our_quantizer_values():
    """INT4 [K, N] (signed, low nibble first) + scales [K / block, N] through ONNX Runtime's DequantizeLinear
    (axis 0, block_size) give exactly the symmetric quantizer's values."""
    weight = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)  # [N, K]
    scheme = Scheme("int4", 128, symmetric=True, search=True)
    packed, scales, _ = quantize(weight, scheme)
    expected = dequantize_blockwise(packed, scales, 4, 256).T  # [K, N]
    data = signed_int4_columns(packed, 256)
    w = helper.make_tensor("w", TensorProto.INT4, [256, 48], data.tobytes(), raw=True)
    s = helper.make_tensor("s", TensorProto.FLOAT, [2, 48], scales.T.ravel())
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0, block_size=128)
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 48])],
                              initializer=[w, s])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    np.testing.assert_array_equal(got, expected)
    assert np.sqrt(np.square(expected - weight.T).mean()) < 0.15 * np.sqrt(np.square(weight).mean())  # 4 bits


def test_symmetric_search_beats_round_to_nearest():
    from gemma3.exporter import quantize as primitives

    weight = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    searched = quantize(weight, Scheme("int4", 128, symmetric=True, search=True))
    saved = primitives.SHRINK
    primitives.SHRINK = (1.0,)
    try:
        nearest = quantize(weight, Scheme("int4", 128, symmetric=True, search=True))
    finally:
        primitives.SHRINK = saved

    def error(q):
        return float(np.square(dequantize_blockwise(q.data, q.scales, 4, 256) - weight).sum())

    assert error(searched) < 0.9 * error(nearest)


def _calibrated(monkeypatch, ids):
    import sentencepiece

    import gemma3.exporter.export as export_module

    monkeypatch.setattr(sentencepiece, "SentencePieceProcessor", lambda model_file: SimpleNamespace(encode=None))
    monkeypatch.setattr(export_module, "calibration_ids", lambda encode, bos, count: ids)


def _fake_quantized_model(folder, r, absmax: dict[str, float]):
    """Our fp32 model computing what the quantized graph computes, in PyTorch: fp8 weights per output row and
    fp8 inputs per tensor (scales rounded to bf16, as stored), or int4 weights dequantized from our quantizer."""
    from gemma3.exporter.recipes import EMBED
    from gemma3.exporter.weight_pass import fused_name

    fused = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
             "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
             "up_proj": ("gate_proj", "up_proj")}
    model = load_checkpoint(folder)

    def bf16(x):  # scales as stored: in the compute dtype
        return x.to(torch.bfloat16).float() if r.compute_dtype == "bfloat16" else x

    def fp8(x, scale):
        return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale

    for param_name, param in model.named_parameters():
        if param.ndim != 2 or param_name.startswith(("vision", "projector")):
            continue
        module = param_name.rsplit(".", 2)[1]
        parts = fused.get(module, (module,))
        full = EMBED if param_name == EMBED else fused_name([param_name.replace(module, p) for p in parts])
        scheme = r.scheme(full, param.shape[1])
        if scheme.storage == "float8e4m3fn":
            scale = bf16(param.abs().amax(1, keepdim=True) / 448)
            param.data = fp8(param.data, scale)
        elif scheme.storage == "int4":
            q = quantize(param.numpy(), scheme, scale_dtype=r.compute_dtype)
            param.data = torch.from_numpy(dequantize_blockwise(q.data, q.scales, 4, param.shape[1]))
    if r.name == "fp8":
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                first = module_name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace(
                    "up_proj", "gate_proj") + ".weight"
                scale = bf16(torch.tensor(absmax[first] / 448))
                module.register_forward_pre_hook(lambda _m, args, s=scale: (fp8(args[0], s),))
        if r.table.activations:  # the lm_head's input
            scale = bf16(torch.tensor(absmax[EMBED] / 448))
            model.text.final_norm.register_forward_hook(lambda _m, _i, out, s=scale: fp8(out, s))
    return model


@pytest.mark.parametrize("name", ["fp8", "int4"])
@torch.no_grad()
def test_quantized_graphs_match_their_fake_quantized_model(tiny_checkpoint, tmp_path, monkeypatch, name):
    """fp8 (E4M3 weights per row, Q/DQ inputs with calibrated per-tensor scales) and
    int4 (symmetric blockwise DequantizeLinear) graphs, run on the CPU, against our fp32 model computing the same
    quantization in PyTorch, both in fp32: what remains is summation order and the rare fp8 rounding tie it
    flips (1% of the logit scale); against the unquantized model the graphs are far further off, so the check
    has teeth."""
    from gemma3.exporter.calibrate import input_statistics

    ids = list(range(2, 40))
    _calibrated(monkeypatch, ids)
    folder = tiny_checkpoint[1]
    # fp32 compute: fp8 roundings of activations are chaotic under bf16 noise (a bf16 graph and an fp32
    # reference differ by about the quantization noise itself), so the formats are checked in fp32 here and the
    # bf16 rounding by the bf16 test
    # and plain rounding (error feedback has its own tests below: its Gram is not this reference's)
    base = _trt(name)
    chosen = dataclasses.replace(base, compute_dtype="float32",
                                 projections=dataclasses.replace(base.projections, damp=None),
                                 table=dataclasses.replace(base.table, damp=None) if base.table.quantized
                                 else Scheme("float32"))
    out = export(open_checkpoint(folder), tmp_path / name, chosen, max_context=64, eval_graph=False,
                 calibration_tokens=38 if name == "fp8" else 0)
    calibration = json.loads((out / "manifest.json").read_text())["quantization"]["calibration"]
    assert (calibration or {}).get("tokens") == (38 if name == "fp8" else None)
    absmax = input_statistics(open_checkpoint(folder), ids).absmax
    ids_t = _ids(sum(CHUNKS), seed=5)
    reference = _fake_quantized_model(folder, chosen, absmax)(ids_t)[0].numpy()
    plain = load_checkpoint(folder)(ids_t)[0].numpy()
    got = _run_chunks(CpuSteps(out), ids_t)
    ends = np.cumsum(CHUNKS) - 1
    scale = float(np.abs(reference).max())
    worst = max(float(np.abs(g - reference[e]).max()) for g, e in zip(got, ends))
    unquantized = max(float(np.abs(g - plain[e]).max()) for g, e in zip(got, ends))
    print(f"tensorrt {name}: vs its fake-quantized model {worst:.3e}, vs fp32 {unquantized:.3e} (scale {scale:.2f})")
    assert worst < 0.01 * scale and unquantized > 3 * worst


@torch.no_grad()
def test_image_prompt_matches_transformers(tmp_path):
    """One decoder graph serves text and image steps: image_features rows (0 on text steps) and the plugin's
    bidirectional groups, against Gemma3ForConditionalGeneration."""
    hf = random_hf_model(tiny_multimodal(mm_tokens=4), seed=3)
    folder = save_hf(hf, tmp_path / "mm")
    (folder / "tokenizer.model").write_bytes(b"placeholder")
    out = export(open_checkpoint(folder), tmp_path / "out", _trt("fp32"), max_context=128, eval_graph=False)
    ours = load_checkpoint(folder)
    c = ours.config
    ids = prompt_with_images(c, images=2, seed=2, text=30)
    pixels = torch.rand(2, 3, c.vision.image_size, c.vision.image_size, generator=torch.Generator().manual_seed(1))
    pixels = pixels * 2 - 1
    features = ours.image_features(pixels).flatten(0, 1).numpy()
    reference = hf(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == c.image_token_id).long()).logits[0]
    steps, used, start, worst = CpuSteps(out), 0, 0, 0.0
    row = ids[0].tolist()
    while start < len(row):  # text in pieces of 5, each image whole with the text right after it
        end = min(start + 5, len(row))
        if c.boi_token_id in row[start:end]:
            end = min(row.index(c.eoi_token_id, start) + 2, len(row))
        chunk = ids[:, start:end].numpy()
        n_image = int((chunk == c.image_token_id).sum())
        logits = steps(chunk, features[used:used + n_image] if n_image else None)[0, -1]
        used += n_image
        worst = max(worst, float(np.abs(logits - reference[end - 1].numpy()).max()))
        start = end
    print(f"tensorrt fp32 graph, image prompt: max abs diff {worst:.2e}")
    assert worst < 1e-4


def test_cli_precision_target_pairs(tmp_path):
    from gemma3.exporter.cli import main

    result = CliRunner().invoke(main, ["--size", "270m", "--precision", "fp8", "--target", "ort",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no fp8 matmul kernel" in result.output
    result = CliRunner().invoke(main, ["--size", "12b", "--precision", "fp8", "--out", str(tmp_path / "y")])
    assert result.exit_code != 0 and "--checkpoint" in result.output and "--random-weights" in result.output
    result = CliRunner().invoke(main, ["--size", "270m", "--precision", "int8-head4", "--target", "tensorrt"])
    assert result.exit_code == 2 and "--target ort" in result.output
    result = CliRunner().invoke(main, ["--size", "270m", "--precision", "int8", "--kv-cache", "fp8",
                                       "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "--kv-cache fp8 needs --target tensorrt" in result.output
    assert not any((tmp_path / name).exists() for name in "xyz")


@torch.no_grad()
def test_bf16_vision_graph(tmp_path):
    """vision.onnx for TensorRT: plain SigLIP + projector in bf16 (standard ONNX, no ONNX Runtime fusions), its
    features within bf16 rounding of our fp32 tower (2% of the feature scale on random weights)."""
    from gemma3.exporter.tensorrt_on_cpu import cpu_session
    from gemma3.exporter.vision_graph import export_vision

    hf = random_hf_model(tiny_multimodal(), seed=3)
    folder = save_hf(hf, tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    section = export_vision(open_checkpoint(folder), out, _trt("bf16"))
    (out / "manifest.json").write_text(json.dumps({"target": "tensorrt", "vision": section}))
    model = onnx.load(out / "vision.onnx", load_external_data=False)
    assert {n.domain for n in model.graph.node} == {""} and section["weights"] == "bfloat16"
    ours = load_checkpoint(folder)
    pixels = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = ours.image_features(pixels).numpy()
    got = cpu_session(out, "vision").run(None, {"pixel_values": pixels.numpy()})[0]
    scale = float(np.abs(reference).max())
    print(f"bf16 vision graph vs fp32 tower: {np.abs(got - reference).max():.3e} (scale {scale:.2f})")
    assert got.shape == reference.shape and np.abs(got - reference).max() < 0.02 * scale


def test_fp8_error_feedback():
    """With a diagonal Gram nothing is fed forward (plain rounding, bit for bit); on correlated inputs the output
    error of fp8 weights drops."""
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((300, 128)).astype(np.float32)
    x = (rng.standard_normal((4000, 128)) @ rng.standard_normal((128, 128))).astype(np.float32)
    fp8 = Scheme("float8e4m3fn", 0, damp=0.01)
    plain = quantize(weight, dataclasses.replace(fp8, damp=None))
    diagonal = quantize(weight, fp8, gram=np.diag(rng.random(128) + 0.1))
    assert np.array_equal(plain.data.view(np.uint8), diagonal.data.view(np.uint8))
    fed = quantize(weight, fp8, gram=x.T.astype(np.float64) @ x / len(x))

    def output_error(q):
        return float(np.square((q.data.astype(np.float32) * q.scales[:, None] - weight) @ x.T).mean())

    print(f"fp8 output error: rounding {output_error(plain):.4f}, error feedback {output_error(fed):.4f}")
    assert output_error(fed) < 0.7 * output_error(plain)


@torch.no_grad()
def test_fp8_kv_cache_graph_matches_our_model(tiny_checkpoint, tmp_path, monkeypatch):
    """`--kv-cache fp8`: caches typed float8 E4M3FN with calibrated per-layer scales on every attention node; the
    graph on the CPU equals our model stepping with the same fp8 caches (fp32 compute: what remains is summation
    order and the rare fp8 rounding it flips), and is measurably away from the same export with fp32 caches."""
    ids = list(range(2, 40))
    _calibrated(monkeypatch, ids)
    folder = tiny_checkpoint[1]
    chosen = _trt("fp32").with_kv_cache("fp8")
    out = export(open_checkpoint(folder), tmp_path / "fp8kv", chosen, max_context=64, eval_graph=False)
    manifest = json.loads((out / "manifest.json").read_text())
    layers = manifest["decoder"]["layers"]
    assert manifest["decoder"]["cache_dtype"] == "float8e4m3fn" and manifest["engine"]["min_sm"] == 89
    assert all(layer["k_scale"] > 0 and layer["v_scale"] > 0 for layer in layers)
    graph = onnx.load(out / "decoder.onnx", load_external_data=False).graph
    caches = [i for i in graph.input if i.name.startswith(("past_key", "past_value"))]
    assert {i.type.tensor_type.elem_type for i in caches} == {TensorProto.FLOAT8E4M3FN}

    ours = load_checkpoint(folder)
    for layer, spec in zip(ours.text.layers, layers):  # the graph's attributes are float32
        layer.attn.k_scale, layer.attn.v_scale = float(np.float32(spec["k_scale"])), float(np.float32(spec["v_scale"]))
    ids_t = _ids(sum(CHUNKS), seed=4)

    def ours_chunked(cache_dtype):
        cache, pos, logits = ours.new_cache(1, 64, cache_dtype), 0, []
        for n in CHUNKS:
            step, cache = ours.step(ids_t[:, pos:pos + n], torch.tensor(pos), cache)
            logits.append(step[0, -1].numpy())
            pos += n
        return logits

    reference = ours_chunked(torch.float8_e4m3fn)
    got = _run_chunks(CpuSteps(out), ids_t)
    for layer in ours.text.layers:
        layer.attn.k_scale = layer.attn.v_scale = 0.0
    plain = ours_chunked(torch.float32)
    scale = max(float(np.abs(r).max()) for r in reference)
    worst = max(float(np.abs(g - r).max()) for g, r in zip(got, reference))
    from_plain = max(float(np.abs(g - p).max()) for g, p in zip(got, plain))
    print(f"fp8 KV cache graph: vs our model with fp8 caches {worst:.2e}, vs fp32 caches {from_plain:.2e} "
          f"(scale {scale:.2f})")
    assert worst < 0.01 * scale and from_plain > 3 * worst
