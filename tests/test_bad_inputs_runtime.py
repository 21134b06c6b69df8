"""Every bad input to the runtime is one clear line naming the file or option (and the fix), found as early as it can
be: before the model loads for options and prompts, at load time for the folder's files.

The model is a hand-built tiny multimodal folder (tests/test_runtime_tinymodel.py's decoder, plus an image-step
graph and a one-matmul vision graph) with Gemma's real tokenizer: a full image generation runs in milliseconds.
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from gemma3.runtime import cli, evaluate
from gemma3.runtime.api import load
from gemma3.runtime.images import ImageError
from gemma3.runtime.manifest import ManifestError
from gemma3.runtime.sampling import SamplingParams
from tests.test_runtime_tinymodel import HIDDEN, build_graph, write_tiny_model

VOCAB = 262_208  # Gemma's tokenizer plus the image soft token's row, as in the 4b-27b checkpoints
IMAGE_ID, BOI_ID, EOI_ID = 262_144, 255_999, 256_000
IMAGE_SIZE, TOKENS_PER_IMAGE = 8, 4
DATA_FILES = {"decoder.onnx.data": 128, "vision.onnx.data": 64}  # sizes the manifest records (the graphs are inline)


def image_graph(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The tiny decoder plus an `image_features` [rows, hidden] input whose mean nudges every position."""
    model = build_graph(w)
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.output[0] == "x0":
            node.output[0] = "x0_text"
            nodes += [helper.make_node("ReduceMean", ["image_features"], ["feature_mean"], keepdims=0),
                      helper.make_node("Mul", ["feature_mean", "nudge"], ["feature_nudge"]),
                      helper.make_node("Add", ["x0_text", "feature_nudge"], ["x0"])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.input.append(helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["rows", HIDDEN]))
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "nudge"))
    return model


def vision_graph() -> onnx.ModelProto:
    """pixel_values [N, 3, 8, 8] -> image_features [N, 4, hidden]: one random projection."""
    proj = np.random.default_rng(1).normal(0, 0.2, (3 * IMAGE_SIZE**2, TOKENS_PER_IMAGE * HIDDEN))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "proj"], ["rows"]),
         helper.make_node("Reshape", ["rows", "shape"], ["image_features"])],
        "tiny_vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["images", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["images", TOKENS_PER_IMAGE, HIDDEN])],
        [numpy_helper.from_array(proj.astype(np.float32), "proj"),
         numpy_helper.from_array(np.array([-1, TOKENS_PER_IMAGE, HIDDEN], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def write_tiny_multimodal(folder: Path, max_context: int = 96) -> Path:
    """A complete ort multimodal folder: decoder graphs, image graph, vision graph, weights files, tokenizer."""
    w = write_tiny_model(folder, vocab=VOCAB, max_context=max_context, seed=3, with_tokenizer=True)
    onnx.save(image_graph(w), folder / "decoder_images.onnx")
    onnx.save(vision_graph(), folder / "vision.onnx")
    for name, size in DATA_FILES.items():
        (folder / name).write_bytes(bytes(size))
    m = json.loads((folder / "manifest.json").read_text())
    m["model"].update(image_token_id=IMAGE_ID, boi_token_id=BOI_ID, eoi_token_id=EOI_ID)
    m["image_decoder"] = {**m["decoder"], "file": "decoder_images.onnx", "image_features": "image_features"}
    m["vision"] = {"file": "vision.onnx", "pixel_values": "pixel_values", "image_features": "image_features",
                   "image_size": IMAGE_SIZE, "tokens_per_image": TOKENS_PER_IMAGE,
                   "weights_bytes": DATA_FILES["vision.onnx.data"]}
    m["source"]["weights_bytes"] = DATA_FILES["decoder.onnx.data"]
    (folder / "manifest.json").write_text(json.dumps(m, indent=1))
    return folder


def variant(src: Path, dst: Path, drop: tuple[str, ...] = (), files: dict[str, bytes | str] | None = None,
            edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of `src` (symlinks) without `drop`, with `files` replaced and the manifest changed by `edit`."""
    files = dict(files or {})
    if edit is not None:
        m = json.loads((src / "manifest.json").read_text())
        edit(m)
        files["manifest.json"] = json.dumps(m)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in drop and f.name not in files:
            (dst / f.name).symlink_to(f)
    for name, data in files.items():
        (dst / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return dst


def one_line(capfd, main, *argv, prog: str = "gemma3-run") -> str:
    """Run a CLI expecting exit status 2 and exactly one line on stderr (file descriptor 2: ONNX Runtime's or
    SentencePiece's C++ logs would show), ours; return that line."""
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory) -> Path:
    return write_tiny_multimodal(tmp_path_factory.mktemp("bad_inputs") / "tiny-mm")


@pytest.fixture(scope="module")
def model(mm_dir):
    return load(mm_dir, threads=1)


@pytest.fixture(scope="module")
def cat(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(path)
    return path


def test_the_tiny_multimodal_folder_generates_with_an_image(model, cat):
    result = model.generate("What is it?", images=[cat], temperature=0, max_new_tokens=4)
    assert result.stats.images == 1 and len(result.token_ids) == 4


# --- the tokenizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty", "zeros", "text", "truncated", "bit-flipped header"])
def test_a_corrupt_tokenizer_is_one_line_naming_the_file(mm_dir, tmp_path, capfd, kind):
    good = (mm_dir / "tokenizer.model").read_bytes()
    data = {"empty": b"", "zeros": bytes(64), "text": b"not a model", "truncated": good[:1000],
            "bit-flipped header": bytes([good[0] ^ 0x80]) + good[1:]}[kind]
    folder = variant(mm_dir, tmp_path / "m", files={"tokenizer.model": data})
    name = str(folder / "tokenizer.model")
    with pytest.raises(ManifestError, match=f"^{name}: not a usable SentencePiece model .*re-export") as info:
        load(folder)
    assert "\n" not in str(info.value)
    assert name in one_line(capfd, cli.main, "--model", folder, "-p", "hi")
    assert name in one_line(capfd, evaluate.main, folder, "--targets", "8", "--window", "8", prog="gemma3-eval")


# --- sampling options and prompts: checked before the model loads ---------------------------------------

SAMPLING_ERRORS = [
    (["--temperature", "nan"], "temperature must be 0 (greedy) or a finite number >= 0.0001, got nan"),
    (["--temperature", "inf"], "temperature must be 0 (greedy) or a finite number >= 0.0001, got inf"),
    (["--temperature", "-0.5"], "temperature must be 0 (greedy) or a finite number >= 0.0001, got -0.5"),
    (["--temperature", "1e-300"], "temperature must be 0 (greedy) or a finite number >= 0.0001, got 1e-300"),
    (["--top-k", "-1"], "top_k must be an integer >= 0 (0 = off), got -1"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-p", "nan"], "top_p must be in (0, 1], got nan"),
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--min-p=-inf"], "min_p must be in [0, 1], got -inf"),
    (["--min-p", "1.01"], "min_p must be in [0, 1], got 1.01"),
    (["--repetition-penalty", "0"], "repetition_penalty must be a finite number >= 0.0001 (1 = off), got 0.0"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be a finite number >= 0.0001 (1 = off), got nan"),
    (["--seed", "-1"], "seed must be a non-negative integer below 2**63, got -1"),
    (["--seed", str(2**63)], "seed must be a non-negative integer below 2**63, got 9223372036854775808"),
]


@pytest.mark.parametrize(("args", "message"), SAMPLING_ERRORS, ids=[" ".join(a) for a, _ in SAMPLING_ERRORS])
def test_cli_sampling_options_are_checked_before_loading(tmp_path, capfd, args, message):
    # The folder does not exist: the option's error comes first, so nothing was loaded.
    err = one_line(capfd, cli.main, "--model", tmp_path / "absent", "-p", "hi", *args)
    assert err == f"gemma3-run: error: {message}"


def test_api_sampling_errors_and_the_largest_seed(model):
    for bad in ({"temperature": math.nan}, {"top_k": 2.5}, {"seed": -1}, {"repetition_penalty": math.inf}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} must be"):
            model.generate("hi", max_new_tokens=2, **bad)
    first = model.generate("hi", max_new_tokens=3, seed=2**63 - 1)
    assert model.generate("hi", max_new_tokens=3, seed=2**63 - 1).token_ids == first.token_ids
    assert SamplingParams(seed=np.int64(5), top_k=np.int32(3)).top_k == 3


@pytest.mark.parametrize(("argv", "stdin"), [(["-p", ""], None), (["-p", " \n\t"], None), ([], ""), ([], "  \n")],
                         ids=["-p empty", "-p blank", "stdin empty", "stdin blank"])
def test_an_empty_prompt_is_refused_before_loading(tmp_path, capfd, monkeypatch, argv, stdin):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    source = "stdin" if stdin is not None else "-p"
    assert one_line(capfd, cli.main, "--model", tmp_path / "absent", *argv) == (
        f"gemma3-run: error: the prompt is empty ({source} gave no text): give some text with -p TEXT or on stdin")


def test_empty_prompts_in_the_api_and_image_only_prompts(model, mm_dir, cat, capfd):
    for prompt, kwargs in (("", {}), ("  ", {"raw": True})):
        with pytest.raises(ValueError, match="^the prompt is empty: give some text"):
            model.generate(prompt, **kwargs)
    with pytest.raises(ValueError, match="^the message is empty"):
        model.chat().send(" \n")
    assert model.generate("", images=cat, temperature=0, max_new_tokens=2).stats.images == 1  # the image is the prompt
    assert cli.main(["--model", str(mm_dir), "-p", "", "--image", str(cat), "--max-new-tokens", "2"]) == 0
    capfd.readouterr()


# --- images ----------------------------------------------------------------------------------------------


def test_one_image_may_be_a_str_a_path_a_pil_image_or_an_array(model, cat):
    expected = model.generate("What is it?", images=[cat], temperature=0, max_new_tokens=6)
    pixels = np.asarray(Image.open(cat).convert("RGB"))
    for single in (str(cat), cat, Image.open(cat), pixels, (str(cat),)):
        result = model.generate("What is it?", images=single, temperature=0, max_new_tokens=6)
        assert result.stats.images == 1 and result.token_ids == expected.token_ids
    assert model.encode_images(str(cat)).crops == [0]
    assert model.chat(temperature=0, max_new_tokens=6).stream("What is it?", images=cat).consume().token_ids == (
        expected.token_ids)
    assert model.generate("What is it?", images=None, max_new_tokens=2).stats.images == 0


def test_bad_images_are_one_line_naming_the_file(model, mm_dir, cat, tmp_path, capfd):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(cat.read_bytes()[:60])
    cases = [
        (5, "images must be a file path, a PIL image, an RGB array or a list of them, got int"),
        (b"\x89PNG", "images must be a file path, a PIL image, an RGB array or a list of them, got bytes"),
        ({"a": cat}, "images must be a file path, a PIL image, an RGB array or a list of them, got dict"),
        ([cat, 5], "image 2 of 2 has type int: give a file path, a PIL image or an RGB array"),
        (tmp_path / "missing.jpg", f"image '{tmp_path / 'missing.jpg'}' does not exist"),
        (tmp_path, f"image '{tmp_path}' is a folder, not an image file"),
        (mm_dir / "manifest.json", f"cannot read image '{mm_dir / 'manifest.json'}': not an image format Pillow"),
        (truncated, f"cannot read image '{truncated}': OSError"),
        (np.zeros((0, 4, 3), np.uint8), "an image needs at least one pixel, got 4x0"),
        (np.zeros((4, 4, 3), np.float32), "an image array must be (height, width, 3) uint8 RGB, got (4, 4, 3)"),
    ]
    for value, message in cases:
        with pytest.raises(ImageError) as info:
            model.generate("x", images=value)
        assert str(info.value).startswith(message) and "\n" not in str(info.value), (value, info.value)
    for path in (tmp_path, mm_dir / "manifest.json", truncated):
        assert str(path) in one_line(capfd, cli.main, "--model", mm_dir, "--image", path, "-p", "x")


# --- the model folder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["decoder.onnx", "decoder.onnx.data", "decoder_images.onnx", "vision.onnx",
                                  "vision.onnx.data", "tokenizer.model"])
def test_a_missing_file_is_named_at_load_time(mm_dir, tmp_path, capfd, name):
    folder = variant(mm_dir, tmp_path / "m", drop=(name,))
    with pytest.raises(ManifestError, match=f"'{folder / name}'.* is missing \\(copy the whole folder") as info:
        load(folder)  # not at the first image
    assert "\n" not in str(info.value)
    assert f"'{folder / name}'" in one_line(capfd, cli.main, "--model", folder, "-p", "hi")


@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_a_weights_file_of_the_wrong_size_is_refused(mm_dir, tmp_path, name):
    folder = variant(mm_dir, tmp_path / "m", files={name: bytes(100)})
    with pytest.raises(ManifestError, match=f"holds 100 bytes but manifest.json says {DATA_FILES[name]}: it is "
                                            "truncated or from another export"):
        load(folder)


def test_eval_names_its_missing_graph_or_weights(mm_dir, tmp_path, capfd):
    for name in ("decoder_all_logits.onnx", "decoder.onnx.data"):
        folder = variant(mm_dir, tmp_path / name, drop=(name,))
        assert f"'{folder / name}'" in one_line(capfd, evaluate.main, folder, "--targets", "8", "--window", "8",
                                                prog="gemma3-eval")


def _format_2(m: dict) -> None:
    m["format_version"] = 2


BAD_FOLDERS = {
    "absent": (None, "model folder '{d}' does not exist or is not a folder"),
    "no manifest": ({}, "no manifest.json in '{d}': is this a folder written by gemma3-export?"),
    "empty manifest": ({"manifest.json": ""}, "{d}/manifest.json: cannot read it as JSON (Expecting value"),
    "not JSON": ({"manifest.json": "{not json"}, "{d}/manifest.json: cannot read it as JSON (Expecting property"),
    "binary": ({"manifest.json": b"\xff\xfe\x00"}, "{d}/manifest.json: cannot read it as JSON ('utf-8' codec"),
    "a JSON list": ({"manifest.json": "[1, 2]"}, "{d}/manifest.json: the top level must be a JSON object"),
    "format_version 2": (_format_2, "{d}/manifest.json: format_version 2 is not supported (this runtime reads "
                                    "version 1): re-export the model with this version's gemma3-export"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FOLDERS))
def test_a_bad_model_folder_is_one_line_in_both_tools(mm_dir, tmp_path, capfd, kind):
    setup, message = BAD_FOLDERS[kind]
    folder = tmp_path / "m"
    if isinstance(setup, dict):
        folder.mkdir()
        for name, data in setup.items():
            (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    elif setup is not None:
        variant(mm_dir, folder, edit=setup)
    expected = message.format(d=folder)
    assert one_line(capfd, cli.main, "--model", folder, "-p", "hi").startswith(f"gemma3-run: error: {expected}")
    assert one_line(capfd, evaluate.main, folder, prog="gemma3-eval").startswith(f"gemma3-eval: error: {expected}")


MISMATCHES = {
    "num_kv_heads": (lambda m: m["model"].update(num_kv_heads=2),
                     "decoder.onnx: 'past_key.0' is tensor(float) [1, 1, 6, 8] but manifest.json implies float "
                     "[1, 2, 6, 8]: the manifest does not describe this graph"),
    "vocab_size": (lambda m: m["model"].update(vocab_size=VOCAB + 1),
                   "decoder.onnx: 'logits' is tensor(float) [1, 1, 262208] but manifest.json implies float "
                   "[1, ?, 262209]"),
    "head_dim": (lambda m: m["model"].update(head_dim=0), "'model.head_dim' must be positive, got 0"),
    "image_token_id": (lambda m: m["model"].update(image_token_id=300_000),
                       "'model.image_token_id' 300000 is not a token id of the 262208-row vocabulary"),
    "generation_defaults": (lambda m: m["generation_defaults"].update(temperature=math.nan),
                            "manifest.json: 'generation_defaults': temperature must be 0 (greedy) or a finite number"),
}


@pytest.mark.parametrize("key", sorted(MISMATCHES))
def test_a_manifest_that_does_not_describe_its_graphs_fails_at_load(mm_dir, tmp_path, key):
    edit, message = MISMATCHES[key]
    with pytest.raises(ManifestError) as info:
        load(variant(mm_dir, tmp_path / "m", edit=edit))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_vision_graph_that_does_not_match_fails_at_the_first_image(mm_dir, tmp_path, cat):
    model = load(variant(mm_dir, tmp_path / "m", edit=lambda m: m["vision"].update(tokens_per_image=5)))
    with pytest.raises(ManifestError, match=r"vision.onnx: 'image_features' is tensor\(float\) \['images', 4, 16\] "
                                            r"but manifest.json implies float \[\?, 5, 16\]"):
        model.generate("x", images=cat)


def test_onnx_runtime_failures_while_generating_are_one_line(mm_dir, tmp_path, capfd):
    # max_context beyond the graph's 96 position rows: ONNX Runtime's Gather fails mid-prefill
    folder = variant(mm_dir, tmp_path / "m", edit=lambda m: m.update(max_context=400))
    with pytest.raises(ManifestError, match="^ONNX Runtime failed running .*decoder.onnx at position") as info:
        load(folder, chunk_size=64).generate("word " * 120, max_new_tokens=2)
    assert "\n" not in str(info.value)
    assert "ONNX Runtime failed running" in one_line(capfd, cli.main, "--model", folder, "-p", "word " * 120)
