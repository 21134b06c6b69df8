"""Images end to end on a tiny multimodal export with Gemma's real vocabulary: files -> Pan & Scan -> vision.onnx
-> image graph -> 16 greedy steps, each step's logits against transformers' Gemma3ForConditionalGeneration fed the
pixel values of its own image processor (max abs difference <= ATOL). Also the CLI's image options and errors,
and the one decoder session of multimodal exports (`decoder_multimodal.onnx`: the weights held and prepacked once)
against the two-session path (decoder.onnx + decoder_images.onnx), bit for bit."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from gemma3.exporter.combine_images import combine
from gemma3.exporter.export import export
from gemma3.exporter.recipes import recipe
from gemma3.graphs import open_checkpoint
from gemma3.graphs.loaders.embedded import embedded_270m_gguf
from gemma3.graphs.loaders.gguf_tokenizer import sentencepiece_model_from_gguf
from gemma3.runtime import cli
from gemma3.runtime.api import load
from gemma3.runtime.chat import STOP_IDS
from gemma3.runtime.manifest import ManifestError, load_manifest
from gemma3.runtime.ort_decoder import OrtDecoder
from tests.hf_reference import random_hf_model, save_hf, tiny_multimodal

# Gemma's ids (graphs/config.py): the real tokenizer encodes the prompt, so the tiny model has the real vocabulary
CONFIG = tiny_multimodal(vocab_size=262_208, image_token_id=262_144, boi_token_id=255_999, eoi_token_id=256_000,
                         max_position_embeddings=512)
STEPS = 16  # greedy steps compared, each by its logits
ATOL = 1e-4  # fp32 logits: vision (fused attention) and decoder reduction order only, as tests/test_export_images.py


@pytest.fixture(scope="module")
def mm_model(tmp_path_factory):
    hf = random_hf_model(CONFIG, seed=8)
    folder = save_hf(hf, tmp_path_factory.mktemp("mm_ckpt"))
    (folder / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(embedded_270m_gguf()))
    out = export(open_checkpoint(folder), tmp_path_factory.mktemp("mm_out") / "fp32", recipe("fp32"),
                 eval_graph=False)
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.png": (90, 30), "square.png": (40, 40)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    return hf, out, images


def _hf_step_logits(hf, ids: list[int], tokens: list[int], paths, pan_and_scan: bool) -> np.ndarray:
    """transformers' logits [len(tokens), vocab] at every generation step, teacher-forced on `tokens` (one forward
    over prompt + tokens: row i predicts tokens[i]), its pixel values from its own image processor."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    size = CONFIG.vision.image_size
    processor = Gemma3ImageProcessorPil(size={"height": size, "width": size}, do_pan_and_scan=pan_and_scan,
                                        pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
                                        pan_and_scan_min_ratio_to_activate=1.2)
    pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    full = torch.tensor([ids + tokens[:-1]])
    with torch.no_grad():
        logits = hf(input_ids=full, pixel_values=pixels, token_type_ids=(full == 262_144).long()).logits
    return logits[0, len(ids) - 1:].float().numpy()


def _our_greedy(model, ids: list[int], encoded, steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens without stopping, and the logits [steps, vocab] each was taken from."""
    cache = model.decoder.new_cache(len(ids) + steps)
    logits = model.decoder.prefill(cache, ids, encoded.features)
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits)
        tokens.append(int(np.argmax(logits)))
        if len(tokens) < steps:
            logits = model.decoder.step(cache, [tokens[-1]])
    return tokens, np.stack(rows)


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["plain", "pan-and-scan"])
def test_two_images_greedy_match_transformers(mm_model, pan_and_scan):
    hf, out, images = mm_model
    model = load(out, threads=2, chunk_size=5)  # chunks of 5: images must stretch their chunk, never split
    paths = [images / "wide.png", images / "square.png"]
    prompt = "Compare <start_of_image> and <start_of_image>."
    # tiny images: Pan & Scan's minimum crop of 256 px would never trigger; transformers gets the same setting
    encoded = model.encode_images(paths, pan_and_scan=pan_and_scan, min_crop_size=8)
    ids = model.prompt_ids(prompt, images=encoded)
    assert encoded.crops == ([3, 0] if pan_and_scan else [0, 0])
    assert ids.count(262_144) == CONFIG.vision.mm_tokens_per_image * (2 + sum(encoded.crops))
    # Every step's logits, not only the tokens: 16 greedy steps, no stop token, against transformers'
    tokens, ours = _our_greedy(model, ids, encoded, STEPS)
    reference = _hf_step_logits(hf, ids, tokens, paths, pan_and_scan)
    assert tokens == [int(t) for t in reference.argmax(-1)]  # the same greedy choice at each of the 16 steps
    np.testing.assert_allclose(ours, reference, rtol=0, atol=ATOL)
    # The API's generation (stop tokens on) is a prefix of those tokens.
    result = model.generate(prompt, images=encoded, temperature=0, max_new_tokens=STEPS)
    assert result.stats.images == 2 and result.stats.crops == encoded.crops
    n = len(result.token_ids)
    assert result.token_ids == tokens[:n] and (n == STEPS or tokens[n] in STOP_IDS)


def test_cli_image_json_and_errors(mm_model, tmp_path, capsys):
    _, out, images = mm_model
    code = cli.main(["--model", str(out), "--image", str(images / "square.png"), "-p", "What is it?",
                     "--temperature", "0", "--max-new-tokens", "4", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["images"] == 1 and record["crops"] == [0] and len(record["vision_seconds"]) == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes((images / "square.png").read_bytes()[:60])
    for path, message in [(broken, "broken.png"), (tmp_path / "missing.jpg", "missing.jpg")]:
        code = cli.main(["--model", str(out), "--image", str(path), "-p", "x"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
    code = cli.main(["--model", str(out), "--image", str(images / "square.png"), "-p", "<start_of_image> "
                     "<start_of_image>"])
    assert code == 2 and "images" in capsys.readouterr().err


def _run(decoder: OrtDecoder, prompt: np.ndarray, features: np.ndarray, steps: int) -> tuple[list[int], np.ndarray]:
    cache = decoder.new_cache(prompt.size + steps)
    rows = [decoder.prefill(cache, prompt, features)]
    tokens = [int(np.argmax(rows[-1]))]
    for _ in range(steps):
        rows.append(decoder.step(cache, [tokens[-1]]))
        tokens.append(int(np.argmax(rows[-1])))
    return tokens, np.stack(rows)


def test_one_session_serves_text_and_image_steps_with_the_same_logits(mm_model):
    manifest = load_manifest(mm_model[1])
    m = manifest.model
    rng = np.random.default_rng(0)
    image = [m.boi_token_id, *[m.image_token_id] * 4, m.eoi_token_id]
    # text chunks before, between and after two images (chunk_size 5: images stay whole), then decode steps
    prompt = np.array([2, *rng.integers(10, 200, 7), *image, *rng.integers(10, 200, 3), *image, 42, 43])
    features = rng.standard_normal((8, m.hidden_size)).astype(np.float32)
    one = OrtDecoder(manifest, chunk_size=5)
    two = OrtDecoder(manifest, manifest.decoder, chunk_size=5)  # the old path: decoder.onnx + decoder_images.onnx
    assert one.spec.file.name == "decoder_multimodal.onnx"
    ours, theirs = _run(one, prompt, features, 6), _run(two, prompt, features, 6)
    assert ours[0] == theirs[0]
    np.testing.assert_array_equal(ours[1], theirs[1])
    assert one._image_graph is None and two._image_graph is not None  # no second session was opened


def test_the_weights_are_outer_scope_initializers_stored_once(mm_model):
    mm_folder = mm_model[1]
    graph = onnx.load(mm_folder / "decoder_multimodal.onnx", load_external_data=False).graph
    external = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    text = onnx.load(mm_folder / "decoder.onnx", load_external_data=False).graph
    assert sorted(external) == sorted(t.name for t in text.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    (branching,) = [n for n in graph.node if n.op_type == "If"]
    for attr in branching.attribute:  # each branch reads them from the outer scope: none is copied into it
        assert not [t for t in attr.g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_combine_refuses_graphs_over_other_weights(mm_model):
    mm_folder = mm_model[1]
    text = onnx.load(mm_folder / "decoder.onnx", load_external_data=False)
    images = onnx.load(mm_folder / "decoder_images.onnx", load_external_data=False)
    moved = next(t for t in images.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in moved.external_data if e.key == "offset").value = "12345"
    with pytest.raises(ValueError, match="another place"):
        combine(text, images, "image_features")


def test_manifest_multimodal_decoder_needs_the_image_graph(mm_model, tmp_path):
    mm_folder = mm_model[1]
    data = json.loads((mm_folder / "manifest.json").read_text())
    data["multimodal_decoder"].pop("image_features")
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="multimodal_decoder"):
        load_manifest(tmp_path)
