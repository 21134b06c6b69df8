"""The vision graph on ONNX Runtime, and the prompt side of images: which ids stand for them and their rows.

`ImagePrompt` turns image files (or PIL images) into what a decoder step needs: pixel values through Pan & Scan
and preprocessing (`images.py`), features from `vision.onnx` one image or crop at a time (one 896x896 SigLIP
pass holds 16 heads x 4096^2 attention scores: about 1 GiB, so crops are not batched), and an encoder that
expands each `<start_of_image>` in the prompt text exactly as transformers' Gemma3Processor does.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from gemma3.runtime.images import (
    BOI_TOKEN,
    IMAGE_TOKEN,
    PAN_AND_SCAN_MAX_CROPS,
    PAN_AND_SCAN_MIN_CROP_SIZE,
    ImageError,
    ImageLike,
    as_image_list,
    expand_image_tokens,
    prepare_images,
)
from gemma3.runtime.manifest import MANIFEST_FILE, Manifest, ManifestError, require_file, weights_file
from gemma3.runtime.memory import PagesReleased
from gemma3.runtime.ort_decoder import check_arg, run_error

ImageInput = str | os.PathLike | ImageLike
Images = ImageInput | Iterable[ImageInput]  # one image, or several: a str is one path, never iterated
_SOFT_RUN = re.compile(f"((?:{re.escape(IMAGE_TOKEN)})+)")


class OrtVision:
    """`vision.onnx`: pixel values [N, 3, S, S] -> features [N, tokens, hidden], one image per run."""

    def __init__(self, manifest: Manifest, options: ort.SessionOptions) -> None:
        if manifest.vision is None or manifest.image_decoder is None:
            raise ValueError(f"the {manifest.model.name} export is text-only: it takes no images")
        self.spec = manifest.vision
        path = require_file(self.spec.file, "vision graph")
        try:
            with PagesReleased([weights_file(path)]):  # see runtime/memory.py
                self.session = ort.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise ManifestError(f"ONNX Runtime cannot load {path}: {e}".splitlines()[0]) from None
        # The graph against the manifest's vision section, so a mismatch is one line now, not ORT's at a run.
        args = {a.name: a for a in [*self.session.get_inputs(), *self.session.get_outputs()]}
        s, hidden = self.spec, manifest.model.hidden_size
        for name, shape in ((s.pixel_values, [None, 3, s.image_size, s.image_size]),
                            (s.image_features, [None, s.tokens_per_image, hidden])):
            if name not in args:
                raise ManifestError(f"{path.name} has no input/output {name!r}, which {MANIFEST_FILE} names")
            check_arg(path.name, args[name], shape, "float")

    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """Features [N * tokens, hidden] in order, and the seconds each image took."""
        rows, seconds = [], []
        for image in pixel_values:
            start = time.perf_counter()
            try:
                (features,) = self.session.run([self.spec.image_features], {self.spec.pixel_values: image[None]})
            except Exception as e:  # ORT's own exception types: one line of ours
                raise run_error(self.spec.file, e) from None
            seconds.append(time.perf_counter() - start)
            rows.append(features.reshape(-1, features.shape[-1]))
        return np.concatenate(rows), seconds


@dataclass
class ImagePrompt:
    """The images of one prompt, encoded: feature rows in prompt order and what it cost."""

    features: np.ndarray  # [images and crops x tokens, hidden]
    crops: list[int]  # Pan & Scan crops per image (0: the image alone)
    vision_seconds: list[float]  # per image, its crops included
    tokens_per_image: int
    image_token_id: int

    def encoder(self, tokenizer) -> ExpandingEncoder:
        """A tokenizer wrapper whose `encode` expands `<start_of_image>` markers, in order, for these images."""
        return ExpandingEncoder(tokenizer, self)


class ExpandingEncoder:
    """Encodes text like the tokenizer, giving each `<start_of_image>` the next image's full sequence: the text
    `Gemma3Processor` writes (with Pan & Scan crops), its soft tokens as `image_token_id`s."""

    def __init__(self, tokenizer, images: ImagePrompt) -> None:
        self.tokenizer, self.images = tokenizer, images
        self.pending = list(images.crops)  # crops of the images whose markers are not encoded yet

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        markers = text.count(BOI_TOKEN)
        if markers > len(self.pending):
            raise ValueError(f"the prompt has more {BOI_TOKEN} markers than the {len(self.images.crops)} images")
        crops, self.pending = self.pending[:markers], self.pending[markers:]
        text = expand_image_tokens(text, crops, self.images.tokens_per_image)
        ids = [self.tokenizer.bos_id] if add_bos else []
        for k, part in enumerate(_SOFT_RUN.split(text)):
            if k % 2:  # a run of soft tokens: not in the SentencePiece vocabulary, one id each
                ids += [self.images.image_token_id] * (len(part) // len(IMAGE_TOKEN))
            elif part:
                ids += self.tokenizer.encode(part)
        return ids

    def check_used(self) -> None:
        if self.pending:
            placed = len(self.images.crops) - len(self.pending)
            raise ValueError(f"{len(self.images.crops)} images given but the prompt has {placed} {BOI_TOKEN} markers")


def encode_images(vision: OrtVision, manifest: Manifest, images: Images, pan_and_scan: bool = False,
                  max_crops: int = PAN_AND_SCAN_MAX_CROPS, min_crop_size: int = PAN_AND_SCAN_MIN_CROP_SIZE
                  ) -> ImagePrompt:
    """Load, Pan & Scan, preprocess and encode `images` (one, or a list); raises `images.ImageError` naming a bad
    file, or saying what was given instead of an image."""
    listed = as_image_list(images)
    if not listed:
        raise ImageError("no images to encode")
    pixels, crops = prepare_images(listed, pan_and_scan=pan_and_scan, max_crops=max_crops,
                                   min_crop_size=min_crop_size, size=manifest.vision.image_size)
    features, seconds = vision(pixels)
    per_image, k = [], 0
    for n in crops:  # the image, then its crops
        per_image.append(sum(seconds[k:k + 1 + n]))
        k += 1 + n
    return ImagePrompt(features, crops, per_image, manifest.vision.tokens_per_image, manifest.model.image_token_id)
