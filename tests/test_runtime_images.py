"""runtime/images.py against transformers' Gemma 3 image processor and processor, bit for bit.

The reference is `Gemma3ImageProcessorPil`: in transformers 5.23 the name `Gemma3ImageProcessor` belongs to the
torchvision backend, and resolves to the PIL one when torchvision is not installed (as here). We name the PIL
class directly so these comparisons keep their meaning if torchvision is ever added to the venv.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import Gemma3ImageProcessorPil  # a test dependency (pyproject's `test` extra): no skip
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb

from gemma3.runtime.images import (
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_TOKEN,
    ImageError,
    expand_image_tokens,
    image_sequence,
    load_image,
    pan_and_scan,
    pan_and_scan_boxes,
    prepare_images,
    preprocess,
    to_rgb,
)


def hf_image_processor(pan_and_scan: bool = True, max_crops: int = 4, min_crop_size: int = 256):
    return Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896},
        do_pan_and_scan=pan_and_scan,
        pan_and_scan_min_crop_size=min_crop_size,
        pan_and_scan_max_num_crops=max_crops,
        pan_and_scan_min_ratio_to_activate=1.2,
    )


def noise(width: int, height: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def hf_pixel_values(images, **kwargs) -> tuple[np.ndarray, list[int]]:
    out = hf_image_processor(**kwargs)(images)
    return np.stack(out["pixel_values"]), list(out["num_crops"])


def test_gemma3_image_processor_is_the_pil_backend_here():
    """Which processor these tests match: without torchvision, `Gemma3ImageProcessor` is the PIL backend."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: Gemma3ImageProcessor is its backend (torch resize), not the reference")
    from transformers import Gemma3ImageProcessor

    assert Gemma3ImageProcessor is Gemma3ImageProcessorPil


# --- Pan & Scan ------------------------------------------------------------------------------------------

# (width, height, max_crops, expected number of crops): each hits a different branch of the arithmetic.
SWEEP = [
    (300, 900, 4, 3),  # tall: ratio 3, three stacked crops of 300x300
    (1000, 400, 4, 3),  # wide: ratio 2.5 rounds half up to 3
    (1000, 400, 2, 2),  # ... capped by max_crops
    (10, 7, 4, 0),  # tiny: ratio 1.43 activates, but crops would be 5 px < 256
    (4000, 1000, 4, 4),  # huge: ratio 4, crops 1000x1000
    (4000, 1000, 2, 2),  # huge, two crops of 2000x1000
    (512, 512, 4, 0),  # exactly square
    (599, 500, 4, 0),  # ratio 1.198: just under the 1.2 threshold
    (600, 500, 4, 2),  # ratio exactly 1.2 activates (the test is `<`): rounded to 1, raised to the minimum 2
    (601, 500, 4, 2),  # just over
    (500, 599, 4, 0),  # portrait, just under
    (500, 601, 4, 2),  # portrait, just over
    (1001, 333, 4, 3),  # odd width: crops 334 wide, the last one truncated to 333
    (257, 769, 4, 3),  # odd height: crops 257 tall, the last one truncated to 255
    (1500, 300, 4, 4),  # ratio 5 capped at max_crops 4 (375 px crops)
    (600, 200, 4, 0),  # ratio 3 but only two 256 px crops fit, and 200 px height is too small
    (700, 300, 4, 2),  # ratio 2.33: two crops of 350x300
]


@pytest.mark.parametrize(("width", "height", "max_crops", "expected"), SWEEP)
def test_pan_and_scan_matches_transformers_crop_for_crop(width, height, max_crops, expected):
    pixels = noise(width, height, seed=width * 7919 + height)
    ours = pan_and_scan(pixels, max_num_crops=max_crops)
    # transformers crops the channels-first array; move its crops back to (H, W, C) to compare.
    theirs = hf_image_processor(max_crops=max_crops).pan_and_scan(
        np.moveaxis(pixels, -1, 0), pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=max_crops,
        pan_and_scan_min_ratio_to_activate=1.2)
    assert len(ours) == len(theirs) == expected
    for mine, hf in zip(ours, theirs):
        np.testing.assert_array_equal(mine, np.moveaxis(hf, 0, -1))


@pytest.mark.parametrize(("width", "height", "max_crops", "expected"), SWEEP)
def test_pixel_values_match_transformers_bitwise(width, height, max_crops, expected):
    image = Image.fromarray(noise(width, height, seed=width + 31 * height))
    ours, crops = prepare_images([image], pan_and_scan=True, max_crops=max_crops)
    theirs, hf_crops = hf_pixel_values([image], max_crops=max_crops)
    assert crops == hf_crops == [expected]
    assert ours.shape == theirs.shape == (1 + expected, 3, 896, 896)
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)  # same PIL resize, same float64 -> float32 steps: no ulp slack


def test_several_images_are_laid_out_image_then_its_crops():
    images = [Image.fromarray(noise(*size, seed=i)) for i, size in enumerate([(900, 300), (64, 64), (257, 769)])]
    ours, crops = prepare_images(images, pan_and_scan=True, max_crops=4)
    theirs, hf_crops = hf_pixel_values(images)
    assert crops == hf_crops == [3, 0, 3]
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours[4], preprocess(images[1]))  # image 1 comes after image 0's three crops


def test_without_pan_and_scan_one_entry_per_image():
    images = [Image.fromarray(noise(1000, 300, seed=1)), Image.fromarray(noise(10, 7, seed=2))]
    ours, crops = prepare_images(images)
    theirs, hf_crops = hf_pixel_values(images, pan_and_scan=False)
    assert crops == hf_crops == [0, 0]
    np.testing.assert_array_equal(ours, theirs)


def test_pan_and_scan_geometry_exhaustively():
    """Every crop's origin and size against transformers over a grid of sizes and settings (no pixels needed).

    transformers' `pan_and_scan` only slices, so it is fed broadcast views of the row and column indices:
    each crop's first element is its origin.
    """
    hf = hf_image_processor()
    sizes = [*range(1, 1300, 23), *range(250, 262), *range(1020, 1030), 2999, 4096]
    checked = 0
    for min_crop, max_crops in [(256, 4), (256, 2), (100, 3), (2, 4)]:
        for width in sizes:
            for height in sizes[::3]:
                rows = np.broadcast_to(np.arange(height)[None, :, None], (1, height, width))
                cols = np.broadcast_to(np.arange(width)[None, None, :], (1, height, width))
                args = dict(pan_and_scan_min_crop_size=min_crop, pan_and_scan_max_num_crops=max_crops,
                            pan_and_scan_min_ratio_to_activate=1.2)
                row_crops, col_crops = hf.pan_and_scan(rows, **args), hf.pan_and_scan(cols, **args)
                boxes = pan_and_scan_boxes(width, height, min_crop, max_crops, 1.2)
                assert len(boxes) == len(row_crops), (width, height, min_crop, max_crops)
                for (left, top, right, bottom), r, c in zip(boxes, row_crops, col_crops):
                    assert r.shape[1:] == (bottom - top, right - left), (width, height, min_crop, max_crops)
                    if r.size:  # a tiny min_crop_size can leave the last crop empty, in both implementations
                        assert (r[0, 0, 0], c[0, 0, 0]) == (top, left), (width, height, min_crop, max_crops)
                checked += len(boxes)
    assert checked > 1000


# --- loading and modes -----------------------------------------------------------------------------------


def _image_in_mode(mode: str) -> Image.Image:
    rgba = Image.fromarray(noise(40, 30, seed=5, channels=4), "RGBA")
    if mode == "I":  # 32-bit ints beyond 255, so Pillow's clipping to RGB is exercised too
        return Image.fromarray((noise(40, 30, seed=6, channels=1).astype(np.int32) - 64) * 3)
    if mode == "F":
        return Image.fromarray(np.random.default_rng(7).uniform(-20, 300, (30, 40)).astype(np.float32))
    if mode == "I;16":
        return Image.fromarray(np.random.default_rng(8).integers(0, 1000, (30, 40), dtype=np.uint16))
    return rgba.convert(mode)


MODES = ["RGBA", "LA", "P", "PA", "CMYK", "I;16", "I", "F", "L", "1", "RGB"]


@pytest.mark.parametrize("mode", MODES)
def test_mode_conversion_matches_transformers(mode, tmp_path):
    path = tmp_path / f"image_{mode.replace(';', '_')}.tiff"  # TIFF round-trips every one of these modes
    _image_in_mode(mode).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
        expected = hf_convert_to_rgb(reopened, return_numpy=True)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    # ... and through the whole pipeline, transformers converting the opened file itself.
    with Image.open(path) as reopened:
        theirs, _ = hf_pixel_values([reopened], pan_and_scan=False)
    np.testing.assert_array_equal(prepare_images([path])[0], theirs)


@pytest.mark.parametrize("mode", ["P", "L", "RGB"])
def test_transparency_chunk_is_composited_on_white(mode, tmp_path):
    """A PNG tRNS entry (no alpha band) also counts as transparency for transformers."""
    image = _image_in_mode(mode)
    path = tmp_path / "trns.png"
    transparency = 7 if mode in ("P", "L") else (10, 20, 30)
    image.save(path, transparency=transparency)
    with Image.open(path) as reopened:
        assert reopened.info.get("transparency") is not None
        expected = hf_convert_to_rgb(reopened, return_numpy=True)
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)


def test_to_rgb_on_an_in_memory_image_and_arrays_are_accepted():
    image = _image_in_mode("LA")
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), hf_convert_to_rgb(image, return_numpy=True))
    pixels = noise(50, 40, seed=9)
    np.testing.assert_array_equal(preprocess(pixels), preprocess(Image.fromarray(pixels)))
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 RGB"):
        pan_and_scan(noise(50, 40, channels=4))


# --- errors ----------------------------------------------------------------------------------------------


def _png_bytes(width=300, height=200) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(width, height, seed=3)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(300, 200, seed=4)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.png", b""),
        ("truncated.png", _png_bytes()[: len(_png_bytes()) // 2]),
        ("truncated.jpg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2]),
        ("notes.png", b"these are notes, not pixels\n" * 10),
    ],
)
def test_unusable_files_raise_image_error_naming_the_file(name, content, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=name):
        load_image(path)
    with pytest.raises(ImageError, match=name):
        prepare_images([str(path)])


def test_missing_file_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="absent.png"):
        load_image(tmp_path / "absent.png")


@pytest.mark.parametrize("side", [12, 20])  # 144 px: Pillow's warning level; 400 px: its error level (> 2 x 100)
def test_decompression_bomb_raises_image_error(side, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_bytes(side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="bomb.png.*too large"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(path).size == (side, side)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


# --- prompt text -----------------------------------------------------------------------------------------


class _RecordingTokenizer:
    """Passes everything to the wrapped tokenizer and keeps the texts it was asked to encode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.texts: list[list[str]] = []

    def __call__(self, text, **kwargs):
        self.texts.append(list(text))
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def hf_processor():
    """A real `Gemma3Processor` whose tokenizer only knows the special tokens (built in milliseconds).

    The 270M tokenizer would not do: it is text-only, has no `<image_soft_token>` and no boi/eoi/image token
    attributes, and takes ~20 s to load. The processor only needs those three tokens to expand the text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3Processor, PreTrainedTokenizerFast

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN]
    model = Tokenizer(models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN},
    )
    processor = Gemma3Processor(image_processor=hf_image_processor(pan_and_scan=False), tokenizer=tokenizer)
    processor.tokenizer = _RecordingTokenizer(tokenizer)
    return processor


PROMPTS = [
    f"<start_of_turn>user\n{BOI_TOKEN}Describe this.<end_of_turn>\n<start_of_turn>model\n",
    f"Compare {BOI_TOKEN} with {BOI_TOKEN}, then {BOI_TOKEN}",
    f"{BOI_TOKEN}{BOI_TOKEN} back to back",
]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("use_pan_and_scan", [False, True])
def test_expanded_text_matches_gemma3_processor(prompt, use_pan_and_scan, hf_processor):
    sizes = [(1200, 300), (200, 200), (300, 700)][: prompt.count(BOI_TOKEN)]
    images = [Image.fromarray(noise(w, h, seed=w)) for w, h in sizes]
    hf_processor.tokenizer.texts.clear()
    out = hf_processor(images=images, text=prompt, do_pan_and_scan=use_pan_and_scan)
    (hf_text,) = hf_processor.tokenizer.texts[-1]
    pixel_values, crops = prepare_images(images, pan_and_scan=use_pan_and_scan)
    assert crops == ([4, 0, 2][: len(images)] if use_pan_and_scan else [0] * len(images))
    assert expand_image_tokens(prompt, crops) == hf_text
    np.testing.assert_array_equal(pixel_values, np.stack(out["pixel_values"]))


def test_image_sequence_layout():
    plain = image_sequence()
    assert plain == "\n\n" + BOI_TOKEN + IMAGE_TOKEN * 256 + EOI_TOKEN + "\n\n"
    with_crops = image_sequence(2)
    assert with_crops == (
        f"Here is the original image {plain} and here are some crops to help you see better {plain} {plain}"
    )
    assert image_sequence(0, tokens_per_image=3).count(IMAGE_TOKEN) == 3


def test_placeholder_count_must_match_the_images():
    assert expand_image_tokens("no images here", []) == "no images here"
    with pytest.raises(ValueError, match="2 <start_of_image> placeholders for 1 images"):
        expand_image_tokens(f"{BOI_TOKEN} and {BOI_TOKEN}", [0])
    with pytest.raises(ValueError, match="0 <start_of_image> placeholders"):
        expand_image_tokens("text only", [1])
