"""Images for Gemma 3's vision tower: loading, Pan & Scan, preprocessing, and the prompt text around each image.

Reproduces transformers 5.23's `Gemma3ImageProcessorPil` (what `Gemma3ImageProcessor` resolves to without
torchvision; `image_processing_pil_gemma3.py`, `image_transforms.py`) and `Gemma3Processor`'s text expansion
(`processing_gemma3.py`), pixel for pixel and character for character:

- any PIL mode becomes RGB, transparency composited onto white (`image_transforms.convert_to_rgb`);
- Pan & Scan cuts a long image into 2..max crops along its long side (`pan_and_scan`);
- the image, then its crops, each resized to 896x896 by PIL bilinear on uint8, scaled by 1/255 in float64,
  cast to float32, normalised with mean = std = 0.5, channels first.

Only numpy and Pillow are imported: this module loads on a serving box without torch or transformers.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

import numpy as np
from PIL import Image

IMAGE_SIZE = 896  # preprocessor_config.json of google/gemma-3-{4b,12b,27b}: size 896x896 (SigLIP at patch 14)
TOKENS_PER_IMAGE = 256  # processor_config.json image_seq_length = config mm_tokens_per_image (64x64 patches pooled 4x4)
RESCALE = 1 / 255  # preprocessor_config.json rescale_factor 0.00392156862745098
IMAGE_MEAN = IMAGE_STD = 0.5  # preprocessor_config.json image_mean / image_std: [0.5, 0.5, 0.5]
# Pan & Scan (off by default): Gemma3Processor.images_kwargs (the checkpoints' preprocessor_config leaves them null).
PAN_AND_SCAN_MIN_CROP_SIZE = 256
PAN_AND_SCAN_MAX_CROPS = 4
PAN_AND_SCAN_MIN_RATIO = 1.2

# The token strings the processor writes into the prompt; their ids live with the tokenizer and the config
# (graphs/config.py: boi 255999, eoi 256000, image soft token 262144).
BOI_TOKEN = "<start_of_image>"  # what the user (or the chat template) writes where an image goes
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"  # one per vision feature; replaced by the projected features in the decoder

ImageLike = Image.Image | np.ndarray  # a PIL image of any mode, or an (H, W, 3) uint8 RGB array
Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive, clipped to the image


class ImageError(ValueError):
    """An image file that cannot be used: missing, unreadable, truncated, not an image, or too large."""


# --- loading ---------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as a new RGB image, exactly as transformers' `convert_to_rgb` does for PIL input.

    Modes with an alpha band (RGBA, LA, PA, ...) and images carrying a `transparency` entry (P, L or RGB with
    a tRNS chunk) are composited onto opaque white; everything else (L, 1, P, CMYK, I;16, I, F, ...) goes
    through Pillow's own `convert("RGB")`.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode and convert an image file to RGB; raises `ImageError` naming the file on any failure.

    The conversion is the processor's (`to_rgb`), i.e. what `Gemma3ImageProcessor` does with
    `Image.open(path)`. Like the processor given a PIL image, the EXIF orientation is not applied.
    (transformers' own `load_image`, used when the processor is handed a path or URL, differs: it applies
    `exif_transpose` and then a plain `convert("RGB")`, which drops alpha instead of compositing on white.)
    Pillow's decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`) is an error here at both of its levels.
    """
    name = os.fspath(path)
    if not os.path.exists(name):  # clearer than Pillow's FileNotFoundError / IsADirectoryError
        raise ImageError(f"image {name!r} does not exist")
    if os.path.isdir(name):
        raise ImageError(f"image {name!r} is a folder, not an image file")
    return decode_image(name, name)


def decode_image(source: str | IO[bytes], name: str) -> Image.Image:
    """`load_image` for a path or an open binary file (an uploaded image's bytes); errors name it `name`."""
    try:
        # The warning level of the guard would only print: make it raise, for this call only.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on damaged metadata: not the CLI's line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()  # decode now, so a truncated file fails here and not later in a resize
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image {name!r} is too large to decode safely ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS "
            f"(now {Image.MAX_IMAGE_PIXELS}) if the file is trusted"
        ) from exc
    except Image.UnidentifiedImageError:  # Pillow's message would name the file a second time
        raise ImageError(f"cannot read image {name!r}: not an image format Pillow knows (or its header is "
                         "corrupt)") from None
    except Exception as exc:  # Pillow fails with OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise ImageError(f"cannot read image {name!r}: {type(exc).__name__}: {exc}") from exc


def _rgb_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) uint8 pixels: a PIL image converted by `to_rgb`, or an array checked to be RGB uint8."""
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image))
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ImageError(f"an image array must be (height, width, 3) uint8 RGB, got {array.shape} {array.dtype}")
    if not array.shape[0] or not array.shape[1]:  # PIL cannot resize an empty image
        raise ImageError(f"an image needs at least one pixel, got {array.shape[1]}x{array.shape[0]}")
    return array


IMAGE_TYPES = (str, os.PathLike, Image.Image, np.ndarray)  # what one image may be


def as_image_list(images: object) -> list:
    """A prompt's images as a list: one path (str / PathLike), PIL image or RGB array, or an iterable of them
    (None or an empty list: no images). Anything else is an `ImageError` saying what was given."""
    if images is None:
        return []
    if isinstance(images, IMAGE_TYPES):
        return [images]  # a single path must not be iterated character by character
    if isinstance(images, (bytes, bytearray, Mapping)) or not isinstance(images, Iterable):
        raise ImageError(f"images must be a file path, a PIL image, an RGB array or a list of them, "
                         f"got {type(images).__name__}")
    listed = list(images)
    for i, image in enumerate(listed):
        if not isinstance(image, IMAGE_TYPES):
            raise ImageError(f"image {i + 1} of {len(listed)} has type {type(image).__name__}: give a file path, "
                             "a PIL image or an RGB array")
    return listed


# --- Pan & Scan ------------------------------------------------------------------------------------------


def pan_and_scan_boxes(
    width: int,
    height: int,
    min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
    max_num_crops: int = PAN_AND_SCAN_MAX_CROPS,
    activation_ratio: float = PAN_AND_SCAN_MIN_RATIO,
) -> list[Box]:
    """The crops Pan & Scan takes from a `width` x `height` image, in row-major order; [] when it stays whole.

    Same arithmetic as transformers' `Gemma3ImageProcessor.pan_and_scan` (Python floats, floor / ceil): the
    number of crops along the long side is the aspect ratio rounded half up, capped by how many
    `min_crop_size` crops fit, then clamped to [2, max_num_crops]. Crops are ceil(side / n) long, so the last
    one is cut short at the border. No crops when the ratio is under `activation_ratio` or a crop would be
    shorter than `min_crop_size` on either side.
    """
    if min(width, height) < 1:
        raise ImageError(f"an image needs at least one pixel, got {width}x{height}")
    if min_crop_size < 1 or max_num_crops < 1:  # both divide or bound the crop count
        raise ValueError(f"Pan & Scan needs min_crop_size >= 1 and max_num_crops >= 1, got {min_crop_size} and "
                         f"{max_num_crops}")
    if width >= height:  # square or landscape: crops side by side
        if width / height < activation_ratio:
            return []
        num_w = int(math.floor(width / height + 0.5))  # half rounds up
        num_w = min(int(math.floor(width / min_crop_size)), num_w)
        num_w = min(max_num_crops, max(2, num_w))
        num_h = 1
    else:  # portrait: crops stacked
        if height / width < activation_ratio:
            return []
        num_h = int(math.floor(height / width + 0.5))
        num_h = min(int(math.floor(height / min_crop_size)), num_h)
        num_h = min(max_num_crops, max(2, num_h))
        num_w = 1
    crop_w = int(math.ceil(width / num_w))
    crop_h = int(math.ceil(height / num_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [
        (x, y, min(x + crop_w, width), min(y + crop_h, height))  # numpy slicing clips the same way
        for y in range(0, num_h * crop_h, crop_h)
        for x in range(0, num_w * crop_w, crop_w)
    ]


def pan_and_scan(
    image: ImageLike,
    min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
    max_num_crops: int = PAN_AND_SCAN_MAX_CROPS,
    activation_ratio: float = PAN_AND_SCAN_MIN_RATIO,
) -> list[np.ndarray]:
    """Pan & Scan crops of `image` as (h, w, 3) uint8 views of its RGB pixels (none for a near-square image).

    transformers crops its channels-first array with the same slices; the pixels are identical.
    """
    pixels = _rgb_array(image)
    height, width = pixels.shape[:2]
    boxes = pan_and_scan_boxes(width, height, min_crop_size, max_num_crops, activation_ratio)
    return [pixels[top:bottom, left:right] for left, top, right, bottom in boxes]


# --- pixel values ----------------------------------------------------------------------------------------


def preprocess(image: ImageLike, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (or crop) as the vision tower's input: float32 [3, size, size].

    The steps and dtypes of transformers' PIL backend: resize the uint8 RGB image with PIL bilinear
    (no reducing gap), multiply by 1/255 in float64 and cast to float32, then (x - 0.5) / 0.5 in float32.
    """
    pixels = _rgb_array(image)
    resized = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    scaled = (resized.astype(np.float64) * RESCALE).astype(np.float32)
    normalised = (scaled - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def prepare_images(
    images: ImageLike | str | os.PathLike | Iterable[ImageLike | str | os.PathLike],
    pan_and_scan: bool = False,
    max_crops: int = PAN_AND_SCAN_MAX_CROPS,
    min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE,
    activation_ratio: float = PAN_AND_SCAN_MIN_RATIO,
    size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, list[int]]:
    """The pixel values of a prompt's images and how many Pan & Scan crops each one got.

    Returns (pixel_values float32 [N, 3, size, size], crops_per_image): each image contributes itself first,
    then its crops in row-major order, as transformers lays them out; N = len(images) + sum(crops_per_image).
    Paths are read with `load_image`; a single image or path may be passed instead of a sequence.
    """
    images = as_image_list(images)
    pieces: list[list[np.ndarray]] = []  # per image: the whole image, then its crops
    for image in images:
        pixels = _rgb_array(load_image(image) if isinstance(image, (str, os.PathLike)) else image)
        crops: list[np.ndarray] = []
        if pan_and_scan:
            height, width = pixels.shape[:2]
            boxes = pan_and_scan_boxes(width, height, min_crop_size, max_crops, activation_ratio)
            crops = [pixels[top:bottom, left:right] for left, top, right, bottom in boxes]
        pieces.append([pixels, *crops])
    flat = [piece for group in pieces for piece in group]
    pixel_values = np.empty((len(flat), 3, size, size), dtype=np.float32)  # filled in place: ~9.6 MB per piece
    for i, piece in enumerate(flat):
        pixel_values[i] = preprocess(piece, size)
    return pixel_values, [len(group) - 1 for group in pieces]


# --- prompt text -----------------------------------------------------------------------------------------


def image_sequence(num_crops: int = 0, tokens_per_image: int = TOKENS_PER_IMAGE) -> str:
    """The text one image becomes in the prompt (`Gemma3Processor.replace_image_token`).

    Without crops: `"\\n\\n<start_of_image>" + "<image_soft_token>" x 256 + "<end_of_image>\\n\\n"`. With Pan & Scan
    crops the original is introduced by a sentence and each crop follows as the same sequence, space-separated.
    """
    full = f"\n\n{BOI_TOKEN}{IMAGE_TOKEN * tokens_per_image}{EOI_TOKEN}\n\n"
    if not num_crops:
        return full
    return (
        f"Here is the original image {full} and here are some crops to help you see better "
        + " ".join([full] * num_crops)
    )


def expand_image_tokens(text: str, crops_per_image: Sequence[int], tokens_per_image: int = TOKENS_PER_IMAGE) -> str:
    """`text` with its i-th `<start_of_image>` replaced by `image_sequence(crops_per_image[i])`.

    Replacements are made in one pass over the original text (the inserted sequences contain
    `<start_of_image>` themselves), and the number of placeholders must equal the number of images,
    as `Gemma3Processor` checks.
    """
    parts = text.split(BOI_TOKEN)
    if len(parts) - 1 != len(crops_per_image):
        raise ValueError(
            f"the text has {len(parts) - 1} {BOI_TOKEN} placeholders for {len(crops_per_image)} images; "
            f"write one {BOI_TOKEN} where each image goes"
        )
    out = [parts[0]]
    for crops, part in zip(crops_per_image, parts[1:]):
        out += [image_sequence(crops, tokens_per_image), part]
    return "".join(out)
