"""The TensorRT backend, as far as a machine without TensorRT or a GPU can take it.

Checked for real: engines.json parsing and its one-line errors, the checks against the export and the installed
TensorRT / GPU (injected), the manifest of a real tensorrt-target export, load()'s refusals, and the binding plan
against the exported graph and the builder's profiles. Then TensorRTDecoder and TensorRTVision run on fakes of
`tensorrt` and cuda-python: device memory is host memory, and the fake "engine" runs the exported graph on ONNX
Runtime (tensorrt_on_cpu), reading inputs from and writing outputs to the addresses the decoder bound. So binding,
the in-place caches (present bound to past), chunking, CUDA-graph capture and replay, and the cache pool are
checked against `CpuSteps`. Real engines on a GPU: skipped here.
"""

from __future__ import annotations

import ast
import copy
import gc
import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gemma3.engine.profiles import DECODE, PREFILL, decoder_profiles
from gemma3.exporter.export import export
from gemma3.exporter.recipes import recipe
from gemma3.exporter.tensorrt_on_cpu import CpuSteps, cpu_session
from gemma3.graphs.config import tiny
from gemma3.graphs.loaders.random_weights import RandomCheckpoint
from gemma3.plugins import attention_launch
from gemma3.runtime.api import load
from gemma3.runtime.generate import generate
from gemma3.runtime.kv_cache import ContextLengthError
from gemma3.runtime.manifest import GLOBAL, ManifestError, load_manifest
from gemma3.runtime.sampling import SamplingParams
from gemma3.runtime.tensorrt import cuda
from gemma3.runtime.tensorrt.engines import (
    BackendMissing,
    Installed,
    TrtEngineView,
    binding_plan,
    check_engine_io,
    check_engines,
    read_engines,
)
from tests.tensorrt_fakes import (
    FAKE_TRT,
    OK,
    OURS,
    VERSION,
    FakeEngine,
    _Err,
    fake_backend,
    graph_tensors,
    ort_run,
    read,
    write,
)

NOT_IN_CI = "needs TensorRT and an NVIDIA GPU: not run in this repository's CI"
MAX_CHUNK = 16



def engines_dict(**changes) -> dict:
    d = {"format_version": 1, "tensorrt_version": VERSION,
         "gpu": {"name": "NVIDIA H200", "compute_capability": [9, 0], "arch": "sm_90a"},
         "precision": "bf16", "compute_dtype": "bfloat16", "cache_dtype": "bfloat16",
         "max_batch": 4, "max_context": 64, "max_chunk": MAX_CHUNK,
         "decoder": {"file": "decoder.engine", "profiles": {"prefill": 0, "decode": 1}}, "timing_cache": "timing.cache"}
    d.update(changes)
    return d


def write_engines(folder: Path, data: dict | str, vision: bool = False) -> Path:
    (folder / "engines").mkdir(exist_ok=True)
    (folder / "engines" / "engines.json").write_text(data if isinstance(data, str) else json.dumps(data))
    (folder / "engines" / "decoder.engine").write_bytes(b"decoder")  # the fake runtime maps these bytes to engines
    if vision:
        (folder / "engines" / "vision.engine").write_bytes(b"vision")
    return folder


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "bf16"
    return export(RandomCheckpoint(tiny(), seed=5), out, recipe("bf16", "tensorrt"), max_context=64, max_batch=4,
                  eval_graph=False)


@pytest.fixture
def folder(trt_export, tmp_path):
    """A copy of the export (tests add engines/ to it)."""
    return Path(shutil.copytree(trt_export, tmp_path / "model"))


# --- engines.json ---------------------------------------------------------------------------------------------


def test_engines_json_is_read(folder):
    spec = read_engines(write_engines(folder, engines_dict()))
    assert (spec.tensorrt_version, spec.gpu.compute_capability, spec.gpu.arch) == (VERSION, (9, 0), "sm_90a")
    assert (spec.max_batch, spec.max_context, spec.max_chunk, spec.profiles) == (4, 64, 16, {"prefill": 0, "decode": 1})
    assert spec.decoder == folder / "engines" / "decoder.engine" and spec.vision is None
    check_engines(spec, load_manifest(folder), Installed(VERSION, (9, 0)))


def _gpu(**changes):
    return {**engines_dict()["gpu"], **changes}


BROKEN = {
    "missing key 'tensorrt_version'": engines_dict(tensorrt_version=None),
    "missing key 'gpu.arch'": engines_dict(gpu={"name": "x", "compute_capability": [9, 0]}),
    "missing key 'decoder.profiles.decode'": engines_dict(decoder={"file": "d.engine", "profiles": {"prefill": 0}}),
    "'max_batch' must be an integer, got '4'": engines_dict(max_batch="4"),
    "'max_chunk' must be an integer, got True": engines_dict(max_chunk=True),
    "'max_context' must be positive": engines_dict(max_context=0),
    "'gpu.compute_capability' must be \\[major, minor\\]": engines_dict(gpu=_gpu(compute_capability=[9])),
    "'gpu.arch' 'sm_89' does not match compute capability 9.0": engines_dict(gpu=_gpu(arch="sm_89")),
    "two distinct profile indices": engines_dict(decoder={"file": "d.engine", "profiles": {"prefill": 1, "decode": 1}}),
    "'max_chunk' 128 exceeds 'max_context' 64": engines_dict(max_chunk=128),
    "format_version 2 is not supported": engines_dict(format_version=2),
    "'decoder' must be an object": engines_dict(decoder=[]),
    "cannot read it as JSON": "{not json",
    "the top level must be a JSON object": "[]",
}


@pytest.mark.parametrize("message", list(BROKEN))
def test_engines_json_errors_name_the_key(folder, message):
    write_engines(folder, BROKEN[message])
    with pytest.raises(ManifestError, match=message) as e:
        read_engines(folder)
    assert "\n" not in str(e.value) and "engines.json" in str(e.value)


def test_ampere_cards_share_sm_80(folder):
    """The builder names sm_80 PTX for every Ampere card (attention_aot.arch_for_capability); 8.9 has its own."""
    write_engines(folder, engines_dict(gpu=_gpu(name="NVIDIA A10", compute_capability=[8, 6], arch="sm_80")))
    assert read_engines(folder).gpu.compute_capability == (8, 6)
    write_engines(folder, engines_dict(gpu=_gpu(compute_capability=[8, 9], arch="sm_80")))
    with pytest.raises(ManifestError, match="'gpu.arch' 'sm_80' does not match compute capability 8.9"):
        read_engines(folder)


MISMATCH = {
    "built with TensorRT 10.13.0.35 but TensorRT 10.9.0.34 is installed": ({}, Installed("10.9.0.34", (9, 0))),
    "built for NVIDIA H200 \\(compute capability 9.0, sm_90a\\) but this GPU, NVIDIA L40S, is 8.9":
        ({}, Installed(VERSION, (8, 9), "NVIDIA L40S")),
    "'precision' is 'fp8' but the export's manifest says 'bf16'": ({"precision": "fp8"}, None),
    "'compute_dtype' is 'float16'": ({"compute_dtype": "float16"}, None),
    "'cache_dtype' is 'float8e4m3fn'": ({"cache_dtype": "float8e4m3fn"}, None),
    "names a vision engine but the export is text-only": ({"vision": {"file": "vision.engine"}}, None),
}


@pytest.mark.parametrize("message", list(MISMATCH))
def test_engines_must_fit_the_export_and_this_machine(folder, message):
    changes, here = MISMATCH[message]
    spec = read_engines(write_engines(folder, engines_dict(**changes)))
    with pytest.raises(ManifestError, match=message) as e:
        check_engines(spec, load_manifest(folder), here or Installed(VERSION, (9, 0)))
    assert "\n" not in str(e.value)


def test_a_missing_engine_file_is_named(folder):
    spec = read_engines(write_engines(folder, engines_dict()))
    spec.decoder.unlink()
    with pytest.raises(ManifestError, match="decoder engine .*decoder.engine.* is missing: rebuild"):
        check_engines(spec, load_manifest(folder), Installed(VERSION, (9, 0)))


# --- the manifest of a tensorrt-target export, and load() ------------------------------------------------------


def test_manifest_reads_a_tensorrt_export(trt_export):
    m = load_manifest(trt_export)
    config = tiny()
    assert (m.target, m.precision, m.compute_dtype, m.max_batch, m.max_context) == ("tensorrt", "bf16", "bfloat16", 4,
                                                                                    64)
    d = m.decoder
    assert (d.cache_dtype, d.past_len_dtype, d.logits, d.image_features) == ("bfloat16", "int32", "last", None)
    assert d.workspace.input == "attention_workspace" and d.workspace.elements == attention_launch.workspace_elements(
        4, config.num_kv_heads, config.head_dim)
    assert [(layer.kind, layer.window, layer.capacity) for layer in d.layers] == [
        (kind, config.window(i), config.window(i) or 64) for i, kind in enumerate(config.layer_types)]
    assert m.image_decoder is None and m.vision is None


def _edited(folder: Path, change) -> Path:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


TRT_BROKEN = {
    "'decoder.layers\\[0\\].capacity' of a tensorrt local layer must be 8, got 16":
        lambda d: d["decoder"]["layers"][0].update(capacity=16),
    "'decoder.layers\\[5\\].capacity' of a tensorrt global layer must be 64":
        lambda d: d["decoder"]["layers"][5].update(capacity=32),
    "missing key 'decoder.workspace'": lambda d: d["decoder"].pop("workspace"),
    "'decoder.past_len_dtype' of a tensorrt graph must be 'int32'":
        lambda d: d["decoder"].update(past_len_dtype="int64"),
    "missing key 'max_batch'": lambda d: d.pop("max_batch"),
    "'image_decoder' is not part of a tensorrt export": lambda d: d.update(image_decoder=d["decoder"]),
    "'vision' and 'decoder.image_features' come together": lambda d: d["decoder"].update(image_features="x"),
    "target 'trt' is not one this runtime runs \\(ort, tensorrt\\)": lambda d: d.update(target="trt"),
}


@pytest.mark.parametrize("message", list(TRT_BROKEN))
def test_tensorrt_manifest_errors(folder, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_edited(folder, TRT_BROKEN[message]))


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_load_without_engines_says_how_to_build_them(folder):
    with pytest.raises(ManifestError) as e:
        load(folder)
    assert _one_line(e) == (f"{folder} holds TensorRT-target graphs but no engines: build them with "
                            f"`gemma3-build {folder}` on the GPU machine")


@pytest.mark.parametrize("blocked", [("tensorrt",), ("cuda", "cuda.bindings", "cuda.cudart")])
def test_load_without_tensorrt_says_what_to_install(folder, monkeypatch, blocked):
    write_engines(folder, engines_dict())
    if blocked[0] == "cuda":  # tensorrt "installed", cuda-python not
        monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    monkeypatch.setattr(cuda, "_cudart", None)
    with pytest.raises(BackendMissing) as e:
        load(folder)
    text = _one_line(e)
    assert text.startswith("running TensorRT engines needs the tensorrt and cuda-python packages (")
    assert text.endswith(f"pip install tensorrt-cu12=={VERSION} cuda-python --extra-index-url https://pypi.nvidia.com")
    assert ("tensorrt" if blocked[0] == "tensorrt" else "No module named 'cuda.bindings'") in text


# --- the binding plan against the graph and the builder's profiles ------------------------------------------------


def decoder_engine(folder: Path, manifest: dict | None = None, run=None) -> FakeEngine:
    manifest = manifest or json.loads((folder / "manifest.json").read_text())
    profiles = decoder_profiles(manifest, 4, 64, MAX_CHUNK)
    return FakeEngine(graph_tensors(folder / "decoder.onnx"), [profiles[PREFILL], profiles[DECODE]], run)


def test_binding_plan_is_the_graphs_io(folder):
    m = load_manifest(folder)
    plan = binding_plan(m, read_engines(write_engines(folder, engines_dict())))
    tensors = graph_tensors(folder / "decoder.onnx")
    assert [b.name for b in plan] and {b.name for b in plan} == set(tensors)
    for b in plan:
        io, dtype, dims = tensors[b.name]
        assert (b.io, b.dtype, len(b.shape)) == (io, OURS[dtype], len(dims)), b
        assert all(d in (-1, s) for d, s in zip(dims, b.shape)), (b, dims)
    by_name = {b.name: b for b in plan}
    for i, layer in enumerate(m.decoder.layers):
        rows = 64 if layer.kind == GLOBAL else layer.window
        for kind in ("key", "value"):
            past, present = by_name[f"past_{kind}.{i}"], by_name[f"present_{kind}.{i}"]
            assert past.shape == present.shape == (1, 2, rows, 32) and past.per_cache and present.alias == past.name
    assert by_name["input_ids"].shape == (1, MAX_CHUNK) and by_name["input_ids"].decode == (1, 1)
    assert by_name["logits"].shape == (1, 1, 512) and by_name["logits"].alias is None
    assert by_name["attention_workspace"].shape == (m.decoder.workspace.elements,)


def test_engine_io_is_checked(folder):
    m = load_manifest(folder)
    plan = binding_plan(m, read_engines(write_engines(folder, engines_dict())))
    profiles = {"prefill": 0, "decode": 1}
    engine = decoder_engine(folder)
    assert check_engine_io(plan, TrtEngineView(FAKE_TRT, engine), profiles, "decoder.engine") == plan
    folded = copy.deepcopy(engine)  # an aliased output TensorRT folded away: nothing to bind
    del folded.tensors["present_key.0"]
    assert len(check_engine_io(plan, TrtEngineView(FAKE_TRT, folded), profiles, "d")) == len(plan) - 1

    def broken(change, message):
        e = copy.deepcopy(engine)
        change(e)
        with pytest.raises(ManifestError, match=message):
            check_engine_io(plan, TrtEngineView(FAKE_TRT, e), profiles, "decoder.engine")

    broken(lambda e: e.tensors.pop("past_len"), "lacks the tensors past_len")
    broken(lambda e: e.tensors.update(extra=("input", "FLOAT", (1,))), "does not name: extra")
    broken(lambda e: e.tensors.update(past_len=("input", "INT64", (-1,))), "past_len is int64 in the engine")
    broken(lambda e: e.tensors.update(logits=("input", "FLOAT", (-1, 1, 512))), "logits is an input of the engine")
    broken(lambda e: e.profiles[0].update(input_ids=((1, 1), (1, 8), (4, 8))),
           "profile 0 \\(prefill\\) takes input_ids .* but prefill steps set \\(1, 16\\)")
    broken(lambda e: e.profiles[1].update({"past_key.5": ((1, 2, 32, 32),) * 3}), "profile 1 \\(decode\\)")


# --- TensorRTDecoder on fakes ------------------------------------------------------------------------------------


def _decoder(folder, monkeypatch, record, capture_fails=False, **kwargs):
    from gemma3.runtime.tensorrt.decoder import TensorRTDecoder

    engine = decoder_engine(folder, run=ort_run(cpu_session(folder), record))
    cudart = fake_backend(monkeypatch, {b"decoder": engine}, capture_fails)
    write_engines(folder, engines_dict())
    decoder = TensorRTDecoder(load_manifest(folder), read_engines(folder), **kwargs)
    return decoder, engine, cudart


PROMPT = list(range(3, 43))  # 40 tokens: steps of 16, 16, 8
FOLLOW = [7, 9, 11, 13, 15, 17]


def reference(folder, prompt=PROMPT, follow=FOLLOW) -> list[np.ndarray]:
    steps, out = CpuSteps(folder, global_capacity=64), []
    for start in range(0, len(prompt), MAX_CHUNK):
        logits = steps(np.array([prompt[start:start + MAX_CHUNK]]))
    out.append(logits[0, -1])
    out += [steps(np.array([[t]]))[0, -1] for t in follow]
    return out


def test_decoder_steps_match_the_graph_on_cpu(folder, monkeypatch):
    record: list = []
    decoder, engine, cudart = _decoder(folder, monkeypatch, record)
    cache = decoder.new_cache(10)
    got = [decoder.prefill(cache, PROMPT)] + [decoder.step(cache, [t]) for t in FOLLOW]
    expected = reference(folder)
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) < 1e-5
    assert [r["past"] for r in record[:3]] == [0, 16, 32] and [len(r["ids"]) for r in record[:3]] == [16, 16, 8]
    assert all(r["present_key.0"] == r["past_key.0"] for r in record)  # in place: present bound to past
    assert cudart.launches == len(FOLLOW) - 1  # one warm-up run, then the captured graph replays
    assert cache.length == len(PROMPT) + len(FOLLOW) and cache.global_capacity == 64
    with pytest.raises(ContextLengthError, match="46 tokens in context \\+ 19 new would exceed .* 64 tokens"):
        decoder.prefill(cache, list(range(19)))
    with pytest.raises(ValueError, match="a step of 17 tokens exceeds the engine's max_chunk 16"):
        decoder.step(cache, list(range(17)))


def test_caches_interleave_and_their_memory_is_reused(folder, monkeypatch):
    decoder, engine, cudart = _decoder(folder, monkeypatch, [])
    a, b = decoder.new_cache(), decoder.new_cache()
    assert a.memory is not b.memory
    other = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    la, lb = [decoder.prefill(a, PROMPT)], [decoder.prefill(b, other)]
    for t in FOLLOW:  # decode contexts (and graphs) are per cache memory, the prefill context is rebound
        la.append(decoder.step(a, [t]))
        lb.append(decoder.step(b, [t]))
    for got, expected in ((la, reference(folder)), (lb, reference(folder, other))):
        assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) < 1e-5
    memory = b.memory
    del b
    gc.collect()
    c = decoder.new_cache()
    assert c.memory is memory and c.length == 0  # pooled, zeroed, its graph kept: same answers
    lc = [decoder.prefill(c, other)] + [decoder.step(c, [t]) for t in FOLLOW]
    assert max(float(np.abs(g - e).max()) for g, e in zip(lc, lb)) == 0.0
    assert len(engine.contexts) == 3  # prefill + one decode context per cache memory
    decoder.close()


def test_generation_runs_on_top(folder, monkeypatch, caplog):
    """generate() (sampling, stop tokens, stats) over the decoder interface; a failed capture falls back."""
    decoder, _, cudart = _decoder(folder, monkeypatch, [], capture_fails=True)
    ids = generate(decoder, decoder.new_cache(), PROMPT, SamplingParams(temperature=0), 5, stop_ids=())
    tokens = [p.token_id for p in ids]
    steps, expected = CpuSteps(folder, global_capacity=64), []
    logits = [steps(np.array([PROMPT[s:s + MAX_CHUNK]])) for s in range(0, len(PROMPT), MAX_CHUNK)][-1]
    for _ in range(5):
        expected.append(int(np.argmax(logits[0, -1])))
        logits = steps(np.array([[expected[-1]]]))
    assert tokens == expected and cudart.launches == 0 and not decoder.cuda_graphs
    assert "decoding without CUDA graphs" in caplog.text and "cudaErrorStreamCaptureUnsupported" in caplog.text


def _multimodal(folder: Path, tokens: int = 4) -> dict:
    """The text export's manifest with an image decoder input and a vision section (the graph ignores the rows)."""
    data = json.loads((folder / "manifest.json").read_text())
    data["model"].update(image_token_id=510, boi_token_id=508, eoi_token_id=509)
    data["decoder"]["image_features"] = "image_features"
    data["vision"] = {"file": "vision.onnx", "pixel_values": "pixel_values", "image_features": "image_features",
                      "image_size": 28, "tokens_per_image": tokens}
    (folder / "manifest.json").write_text(json.dumps(data))
    return data


def test_image_steps_keep_images_whole_and_bind_their_rows(folder, monkeypatch):
    from gemma3.runtime.tensorrt.decoder import TensorRTDecoder

    session = cpu_session(folder)  # the text graph, before the manifest names image inputs
    text = json.loads((folder / "manifest.json").read_text())
    data = _multimodal(folder)
    hidden = data["model"]["hidden_size"]
    record: list = []
    engine = decoder_engine(folder, text, run=ort_run(session, record))
    engine.tensors["image_features"] = ("input", "BF16", (-1, hidden))
    for profile, most in zip(engine.profiles, (MAX_CHUNK, 0)):
        profile["image_features"] = ((0, hidden), (min(4, most), hidden), (most, hidden))
    fake_backend(monkeypatch, {b"decoder": engine})
    write_engines(folder, engines_dict())
    decoder = TensorRTDecoder(load_manifest(folder), read_engines(folder), chunk_size=8)
    image = [508, 510, 510, 510, 510, 509]
    prompt = [2, 3, 4, 5, 6] + image + [7, 8] + image + [9]  # 20 tokens: an image would straddle 8 and 16
    assert decoder.chunks(np.array(prompt)) == [(0, 6), (6, 14), (14, 20)]
    features = (np.arange(8 * hidden, dtype=np.float32).reshape(8, hidden) % 128) / 64  # bf16-exact values
    decoder.prefill(decoder.new_cache(), prompt, features)
    assert [len(r["ids"]) for r in record] == [6, 8, 6] and [r["past"] for r in record] == [0, 6, 14]
    assert [len(r["rows"]) for r in record] == [0, 4, 4]
    np.testing.assert_array_equal(np.concatenate([r["rows"] for r in record]), features)
    with pytest.raises(ValueError, match="2 image soft tokens but 8 image feature rows"):
        decoder.prefill(decoder.new_cache(), [2, 510, 510], features)
    assert TensorRTDecoder(load_manifest(folder), read_engines(folder), chunk_size=2).chunk_size == 4  # >= an image


def test_vision_engine(folder, monkeypatch):
    text = json.loads((folder / "manifest.json").read_text())
    data = _multimodal(folder)
    hidden = data["model"]["hidden_size"]

    def vision_run(engine, addresses, shapes):
        pixels = read(addresses["pixel_values"], shapes["pixel_values"], "float32")
        features = pixels.mean() + np.arange(4 * hidden, dtype=np.float32).reshape(1, 4, hidden)
        write(addresses["image_features"], features, "bfloat16")

    vision = FakeEngine({"pixel_values": ("input", "FLOAT", (-1, 3, 28, 28)),
                         "image_features": ("output", "BF16", (-1, 4, hidden))},
                        [{"pixel_values": ((1, 3, 28, 28), (1, 3, 28, 28), (5, 3, 28, 28))}], vision_run,
                        out_shape=lambda shapes: (shapes["pixel_values"][0], 4, hidden))
    decoder_fake = decoder_engine(folder, text, run=lambda *a: None)
    decoder_fake.tensors["image_features"] = ("input", "BF16", (-1, hidden))
    for profile, most in zip(decoder_fake.profiles, (MAX_CHUNK, 0)):
        profile["image_features"] = ((0, hidden), (0, hidden), (most, hidden))
    fake_backend(monkeypatch, {b"decoder": decoder_fake, b"vision": vision})
    write_engines(folder, engines_dict(vision={"file": "vision.engine", "max_images": 5}), vision=True)
    from gemma3.runtime.tensorrt.decoder import TensorRTDecoder

    encoder = TensorRTDecoder(load_manifest(folder), read_engines(folder)).vision()
    pixels = np.stack([np.full((3, 28, 28), v, np.float32) for v in (0.5, -1.0)])
    features, seconds = encoder(pixels)
    expected = np.concatenate([v + np.arange(4 * hidden, dtype=np.float32).reshape(4, hidden) for v in (0.5, -1.0)])
    assert features.shape == (8, hidden) and len(seconds) == 2
    np.testing.assert_allclose(features, expected, rtol=2 ** -8)  # bf16 rounding


def test_bfloat16_conversion_matches_ml_dtypes():
    import ml_dtypes

    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 100
    x[:4] = [np.inf, -np.inf, 0.0, 3.4e38]
    bits = cuda.to_device_dtype(x, "bfloat16")
    np.testing.assert_array_equal(bits, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(cuda.from_device_dtype(bits, "bfloat16"), x.astype(ml_dtypes.bfloat16).astype(
        np.float32))
    assert np.isnan(cuda.from_device_dtype(cuda.to_device_dtype(np.array([np.nan], np.float32), "bfloat16"),
                                           "bfloat16")).all()


def test_cuda_errors_name_the_call_and_the_code():
    assert cuda.check((OK, 7), "cudaMalloc") == 7 and cuda.check((OK,), "x") is None
    with pytest.raises(cuda.CudaError, match="cudaMalloc: cudaErrorStreamCaptureUnsupported"):
        cuda.check((_Err.cudaErrorStreamCaptureUnsupported, None), "cudaMalloc")


# --- the dependency rule for runtime/tensorrt, and the GPU ---------------------------------------------------------

PACKAGE = Path(__file__).resolve().parent.parent / "runtime" / "tensorrt"


def test_backend_imports_without_torch_triton_tensorrt_or_cuda():
    allowed = {"numpy", "tensorrt", "cuda"}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if (
                isinstance(node, ast.ImportFrom) and node.level == 0) else []
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__" or top in allowed or name.startswith(
                    ("gemma3.runtime", "gemma3.plugins")), f"{path.name} imports {name}"
    blocked = ("torch", "triton", "tensorrt", "cuda", "onnx", "gemma3.exporter", "gemma3.graphs")
    code = "; ".join([*(f"import sys; sys.modules[{n!r}] = None" for n in blocked),
                      *(f"import gemma3.runtime.tensorrt.{p.stem}" for p in PACKAGE.glob("*.py")),
                      "import gemma3.runtime.api", "print('ok')"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _has_gpu() -> bool:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None:
        return False
    try:
        return bool(cuda.check(cuda.runtime_bindings().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except (cuda.CudaError, ImportError):
        return False


def test_engines_on_a_gpu(tmp_path):
    """Real engines (head_dim 64: the kernel's smallest) against the same graph on the CPU, bf16 tolerance."""
    if not _has_gpu():
        pytest.skip(NOT_IN_CI)
    from gemma3.engine.build import build_engines
    from gemma3.runtime.tensorrt.decoder import TensorRTDecoder

    config = tiny(head_dim=64, query_pre_attn_scalar=64)
    out = export(RandomCheckpoint(config, seed=5), tmp_path / "m", recipe("bf16", "tensorrt"), max_context=64,
                 max_batch=4, eval_graph=False)
    build_engines(out, max_context=64, max_chunk=MAX_CHUNK)
    decoder = TensorRTDecoder(load_manifest(out), read_engines(out))
    cache = decoder.new_cache()
    got = [decoder.prefill(cache, PROMPT)] + [decoder.step(cache, [t]) for t in FOLLOW]
    expected = reference(out)
    scale = max(float(np.abs(e).max()) for e in expected)
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
    print(f"TensorRT engine vs the graph on CPU: {worst:.3e} (scale {scale:.2f})")
    assert worst < 0.05 * scale  # bf16 on both sides, rounded at different op boundaries
