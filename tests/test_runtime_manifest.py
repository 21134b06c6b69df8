"""manifest.json: a valid folder loads into dataclasses; every kind of breakage is one clear ManifestError."""

from __future__ import annotations

import copy
import json

import pytest

from gemma3.runtime.manifest import GLOBAL, LOCAL, ManifestError, load_manifest
from tests.test_runtime_tinymodel import CAPACITY, LAYERS, WINDOW, manifest_dict


def write(folder, data) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(data if isinstance(data, str) else json.dumps(data))


def test_valid_manifest(tmp_path):
    write(tmp_path, manifest_dict(vocab=64, max_context=128))
    m = load_manifest(tmp_path)
    assert (m.format_version, m.precision, m.target, m.max_context) == (1, "fp32", "ort", 128)
    assert m.model.vocab_size == 64 and m.model.num_layers == len(LAYERS) and m.model.bos_token_id == 2
    assert m.model.config["layer_types"] == list(LAYERS) and m.model.image_token_id is None
    assert m.decoder.file == tmp_path / "decoder.onnx" and m.decoder.logits == "last"
    assert m.eval_decoder is not None and m.eval_decoder.logits == "all"
    assert [layer.kind for layer in m.decoder.layers] == [LOCAL, GLOBAL, LOCAL]
    local, glob = m.decoder.layers[0], m.decoder.layers[1]
    assert (local.window, local.capacity, local.past_key, local.present_value) == (
        WINDOW, CAPACITY, "past_key.0", "present_value.0")
    assert (glob.window, glob.capacity) == (0, None)
    assert m.tokenizer == tmp_path / "tokenizer.model"
    assert m.generation_defaults == {"top_k": 64, "top_p": 0.95, "temperature": 1.0}


def test_optional_parts(tmp_path):
    d = manifest_dict(vocab=64, max_context=128, eval_decoder=False)
    for key in ("generation_defaults", "source", "versions"):
        del d[key]
    del d["model"]["bos_token_id"]
    write(tmp_path, d)
    m = load_manifest(tmp_path)
    assert m.eval_decoder is None and m.generation_defaults == {} and m.model.bos_token_id == 2


def _broken(change):
    d = manifest_dict(vocab=64, max_context=128)
    change(d)
    return d


BROKEN = {
    "format_version 2 is not supported": _broken(lambda d: d.update(format_version=2)),
    "missing key 'format_version'": _broken(lambda d: d.pop("format_version")),
    "missing key 'decoder'": _broken(lambda d: d.pop("decoder")),
    "missing key 'model.head_dim'": _broken(lambda d: d["model"].pop("head_dim")),
    "missing key 'decoder.layers\\[1\\].past_key'": _broken(lambda d: d["decoder"]["layers"][1].pop("past_key")),
    "missing key 'eval_decoder.file'": _broken(lambda d: d["eval_decoder"].pop("file")),
    "'model.vocab_size' must be an integer": _broken(lambda d: d["model"].update(vocab_size="64")),
    "'max_context' must be an integer": _broken(lambda d: d.update(max_context=True)),
    "lists 2 layers, the model has 3": _broken(lambda d: d["decoder"]["layers"].pop()),
    "'decoder.layers\\[0\\].kind' must be": _broken(lambda d: d["decoder"]["layers"][0].update(kind="sliding")),
    "capacity' of a local layer must be": _broken(lambda d: d["decoder"]["layers"][2].update(capacity=2)),
    "'decoder.logits' must be 'last' or 'all'": _broken(lambda d: d["decoder"].update(logits="first")),
    "cache_dtype' 'int8' is not one of": _broken(lambda d: d["decoder"].update(cache_dtype="int8")),
    "generation_defaults.top_k' must be a number": _broken(lambda d: d["generation_defaults"].update(top_k="x")),
    "the top level must be a JSON object": [1, 2],
    "cannot read it as JSON": "{not json",
}


@pytest.mark.parametrize("message", sorted(BROKEN))
def test_broken_manifest(tmp_path, message):
    write(tmp_path, copy.deepcopy(BROKEN[message]))
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(tmp_path)
    assert str(tmp_path) in str(info.value)  # the error names the file
    assert "\n" not in str(info.value)


def test_missing_folder_or_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path)
