"""The runtime fuzzed with Hypothesis, seeded (derandomize) and bounded (max_examples): random prompts, sampling
parameters, image bytes and sizes, and truncated or bit-flipped manifest.json / tokenizer.model files.

Every case must end in a result or in one of our errors (a ValueError subclass: ManifestError, ImageError,
TokenizerError, ContextLengthError, ...) raised by our code, with a one-line message: never a library's traceback,
a hang or an ONNX Runtime crash. The model is tests/test_bad_inputs_runtime.py's tiny multimodal folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gemma3.runtime import cli
from gemma3.runtime.api import load
from gemma3.runtime.images import ImageError, load_image, pan_and_scan_boxes, prepare_images
from gemma3.runtime.sampling import SamplingParams
from gemma3.runtime.tokenizer import Tokenizer
from tests.test_bad_inputs_runtime import write_tiny_multimodal

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
FUZZ = dict(derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def assert_ours(error: BaseException) -> None:
    """One of our ValueErrors: one line, raised by a frame of runtime/ (not re-raised from inside a library)."""
    assert isinstance(error, ValueError), repr(error)
    message = str(error)
    assert message and "\n" not in message, repr(message)
    frames = traceback.extract_tb(error.__traceback__)
    assert frames and Path(frames[-1].filename).resolve().is_relative_to(RUNTIME), (message, frames[-1])


def outcome(call, *args, **kwargs):
    """call(*args, **kwargs), or None when it raised one of our errors (checked)."""
    try:
        return call(*args, **kwargs)
    except ValueError as e:
        assert_ours(e)
        return None


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory) -> Path:
    return write_tiny_multimodal(tmp_path_factory.mktemp("fuzz") / "tiny-mm", max_context=128)


@pytest.fixture(scope="module")
def model(mm_dir):
    return load(mm_dir, threads=1)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_scratch")


# --- prompts: tokenizer + chat template + a short greedy generation --------------------------------------

SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<eos>",
           "<bos>", "<pad>", "<unk>", "<mask>", "<unused0>", "user\n", "model\n", "\n\n", "\u2581", "<0xFF>"]
PIECES = st.one_of(
    st.text(max_size=20),  # any code point but surrogates
    st.sampled_from(SPECIAL),
    st.text(st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\u200b\ufeff\u2028\U0010ffff"), max_size=8),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(30, 300)),  # long: past the context
)
CLEAN = st.lists(PIECES, min_size=1, max_size=5).map("".join)
# a lone surrogate (what undecodable bytes on a command line become), in one prompt of four
SURROGATE = st.tuples(CLEAN, st.characters(categories=["Cs"])).map("".join)
PROMPTS = st.integers(0, 3).flatmap(lambda k: SURROGATE if k == 0 else CLEAN)


@settings(max_examples=60, **FUZZ)
@given(prompt=PROMPTS, raw=st.booleans(), system=st.none() | st.text(max_size=10))
def test_random_prompts(model, prompt, raw, system):
    result = outcome(model.generate, prompt, raw=raw, system=None if raw else system, temperature=0,
                     max_new_tokens=3)
    if result is not None:
        assert len(result.token_ids) <= 3 and result.text == model.tokenizer.decode(result.token_ids)
        assert result.stats.prompt_tokens == len(model.prompt_ids(prompt, None if raw else system, raw))


# --- sampling parameters: SamplingParams, the API and the CLI's options ----------------------------------

VALUES = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.none(), st.booleans(), st.text(max_size=3),
                   st.sampled_from([np.float32(0.5), np.int64(3), np.float64("nan"), np.uint64(2**63)]))
IN_RANGE = {"temperature": st.just(0.0) | st.floats(1e-4, 4), "top_k": st.integers(0, 300),
            "top_p": st.floats(0, 1, exclude_min=True), "min_p": st.floats(0, 1),
            "repetition_penalty": st.floats(1e-4, 4), "seed": st.integers(0, 2**63 - 1)}
FIELDS = tuple(IN_RANGE)
# half the dicts in range throughout, half mixing in anything at all
KWARGS = st.one_of(st.fixed_dictionaries({}, optional=IN_RANGE),
                   st.fixed_dictionaries({}, optional={k: st.one_of(v, VALUES) for k, v in IN_RANGE.items()}))


def _real(v) -> float | None:
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        return None
    try:
        return float(v)
    except OverflowError:  # an int past float range
        return math.inf


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def valid(name: str, v) -> bool:
    """The documented ranges, written out independently of runtime/sampling.py."""
    x = _real(v)
    return {
        "temperature": x is not None and (x == 0 or 1e-4 <= x < math.inf),  # tiny ones would overflow float32
        "top_k": _is_int(v) and v >= 0,
        "top_p": x is not None and 0 < x <= 1,
        "min_p": x is not None and 0 <= x <= 1,
        "repetition_penalty": x is not None and 1e-4 <= x < math.inf,
        "seed": v is None or (_is_int(v) and 0 <= v < 2**63),
    }[name]


@settings(max_examples=300, **FUZZ)
@given(KWARGS)
def test_random_sampling_params(kwargs):
    params = outcome(SamplingParams, **kwargs)
    assert (params is not None) == all(valid(k, v) for k, v in kwargs.items()), kwargs


@settings(max_examples=40, **FUZZ)
@given(KWARGS)
def test_random_sampling_through_the_api(model, kwargs):
    given_ = {k: v for k, v in kwargs.items() if v is not None}  # None keeps the model's default
    result = outcome(model.generate, "Hi", max_new_tokens=2, **kwargs)
    assert (result is not None) == all(valid(k, v) for k, v in given_.items()), kwargs
    assert result is None or len(result.token_ids) <= 2


FLOATS = st.one_of(st.floats(0, 1).map(repr), st.floats().map(repr),
                   st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-0.0", "1", "0", "1e-320"]))
INTS = st.one_of(st.integers(0, 100), st.integers(-(2**65), 2**65)).map(str)
OPTIONS = {"--temperature": FLOATS, "--top-k": INTS, "--top-p": FLOATS, "--min-p": FLOATS,
           "--repetition-penalty": FLOATS, "--seed": INTS}


@settings(max_examples=150, **FUZZ)
@given(st.fixed_dictionaries({}, optional=OPTIONS))
def test_random_cli_sampling_options(scratch, options):
    argv = ["--model", str(scratch / "absent"), "-p", "hi", *[f"{k}={v}" for k, v in options.items()]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(argv) == 2
    out, err = out.getvalue(), err.getvalue()
    assert out == "" and err.count("\n") == 1 and err.startswith("gemma3-run: error: ")
    values = {k[2:].replace("-", "_"): (int(v) if k in ("--top-k", "--seed") else float(v)) for k, v in options.items()}
    ok = all(valid(k, v) for k, v in values.items())
    assert ("does not exist" in err) == ok, (options, err)  # bad options are reported before the model loads


# --- images: random bytes and sizes through loading, Pan & Scan and preprocessing ---------------------------


def _encoded(width: int, height: int, fmt: str, mode: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert("RGB" if (fmt, mode) == ("JPEG", "P") else mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _damaged(data: bytes, where: float, bit: int, truncate: bool | None) -> bytes:
    """`data` cut at `where` (truncate), with one bit flipped there (not truncate), or whole (None)."""
    at = int(where * len(data))
    if truncate is None or at >= len(data):
        return data
    if truncate:
        return data[:at]
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]


IMAGE_FILES = st.one_of(
    st.binary(max_size=300),
    st.builds(_damaged, st.builds(_encoded, st.integers(1, 48), st.integers(1, 48),
                                  st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]),
                                  st.sampled_from(["RGB", "L", "P", "1"]), st.integers(0, 9)),
              st.floats(0, 1), st.integers(0, 7), st.sampled_from([None, False, True])),
)


@settings(max_examples=80, **FUZZ)
@given(data=IMAGE_FILES, min_crop=st.integers(1, 24), max_crops=st.integers(1, 5))
def test_random_image_files(scratch, data, min_crop, max_crops):
    path = scratch / "image.bin"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = outcome(load_image, path)
    assert not caught, [str(w.message) for w in caught]  # nothing but our one line reaches a user's stderr
    if image is None:
        return
    assert image.mode == "RGB"
    prepared = outcome(prepare_images, image, pan_and_scan=True, min_crop_size=min_crop, max_crops=max_crops, size=16)
    assert prepared is not None  # a decoded image is always usable
    pixels, crops = prepared
    assert pixels.shape == (1 + crops[0], 3, 16, 16) and crops[0] <= max_crops and np.all(np.abs(pixels) <= 1)


@settings(max_examples=60, **FUZZ)
@given(width=st.integers(0, 600), height=st.integers(0, 600), min_crop=st.integers(-2, 300),
       max_crops=st.integers(-1, 6), ratio=st.floats(0.5, 3))
def test_random_image_sizes_and_pan_and_scan(width, height, min_crop, max_crops, ratio):
    boxes = outcome(pan_and_scan_boxes, width, height, min_crop, max_crops, ratio)
    if boxes is not None:
        assert len(boxes) <= max(max_crops, 0) or len(boxes) == 0
        assert all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for x0, y0, x1, y1 in boxes)
    array = np.zeros((height, width, 3), np.uint8)
    prepared = outcome(prepare_images, [array], pan_and_scan=True, min_crop_size=min_crop, max_crops=max_crops,
                       activation_ratio=ratio, size=8)
    assert (prepared is None) == (boxes is None), (boxes, prepared)  # the same checks, the same verdict
    if prepared is not None:
        assert prepared[0].shape == (1 + len(boxes), 3, 8, 8)


# --- truncated and bit-flipped manifest.json / tokenizer.model, given to load() ------------------------------


def _run_damaged(source: Path, folder: Path, name: str, cat: Path, where: float, bit: int, truncate: bool) -> None:
    """`folder` = `source` with one file damaged; load it, and generate (with an image too) if it loads."""
    for f in ("manifest.json", "tokenizer.model"):
        (folder / f).unlink(missing_ok=True)
        if f != name:
            (folder / f).symlink_to(source / f)
    data = (source / name).read_bytes()
    if name == "manifest.json":  # compact, so that most flips land in keys and values rather than indentation
        data = json.dumps(json.loads(data), separators=(",", ":")).encode()
    (folder / name).write_bytes(_damaged(data, where, bit, truncate))
    model = outcome(load, folder, threads=1)
    if model is not None:  # a flip the checks cannot see: it must still generate, or fail in one line of ours
        outcome(model.generate, "Describe it.", temperature=0, max_new_tokens=2)
        outcome(model.generate, "Describe it.", images=cat, temperature=0, max_new_tokens=2)


@pytest.fixture(scope="module")
def damaged_dir(mm_dir, scratch) -> Path:
    folder = scratch / "damaged"
    folder.mkdir()
    for f in mm_dir.iterdir():
        (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture(scope="module", autouse=True)
def tokenizers_by_content():
    """Tokenizer.from_file memoized on the file's bytes: an unchanged 5 MB tokenizer.model is parsed once
    (0.8 s), a damaged one afresh. Every other step of load() runs for real."""
    real, cache = Tokenizer.from_file, {}

    def from_file(path):
        key = hashlib.sha256(Path(path).read_bytes()).digest()
        if key not in cache:
            cache[key] = real(path)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Tokenizer, "from_file", staticmethod(from_file))
        yield


@pytest.fixture(scope="module")
def cat(scratch) -> Path:
    path = scratch / "cat.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (10, 30, 3), dtype=np.uint8)).save(path)
    return path


@settings(max_examples=80, **FUZZ)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), truncate=st.sampled_from([False] * 3 + [True]))
def test_damaged_manifests(mm_dir, damaged_dir, cat, where, bit, truncate):
    _run_damaged(mm_dir, damaged_dir, "manifest.json", cat, where, bit, truncate)


@settings(max_examples=15, **FUZZ)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7), truncate=st.booleans())
def test_damaged_tokenizers(mm_dir, damaged_dir, cat, where, bit, truncate):
    _run_damaged(mm_dir, damaged_dir, "tokenizer.model", cat, where, bit, truncate)


def _paths(obj, prefix: tuple = ()):
    """Every key path in a JSON tree."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63])
    | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=4,
)


@settings(max_examples=80, **FUZZ)
@given(index=st.integers(0, 2**20), value=JSON_VALUES, delete=st.booleans())
def test_manifest_values_replaced_at_random(mm_dir, damaged_dir, cat, index, value, delete):
    """Structured damage: one key of the manifest deleted, or its value replaced by any JSON value."""
    m = json.loads((mm_dir / "manifest.json").read_text())
    paths = list(_paths(m))
    *parents, key = paths[index % len(paths)]
    holder = m
    for part in parents:
        holder = holder[part]
    if delete:
        del holder[key]
    else:
        holder[key] = value
    (damaged_dir / "manifest.json").unlink()
    (damaged_dir / "manifest.json").write_text(json.dumps(m))
    model = outcome(load, damaged_dir, threads=1)
    if model is not None:
        outcome(model.generate, "Describe it.", temperature=0, max_new_tokens=2)
        outcome(model.generate, "Describe it.", images=cat, temperature=0, max_new_tokens=2)


def test_image_errors_are_value_errors():
    assert issubclass(ImageError, ValueError)
