"""`engines/vision.engine`: pixel values -> image features, with OrtVision's interface (runtime/vision.py).

One image (or Pan & Scan crop) per run, as OrtVision does, so the seconds per image are measured and activation
memory stays at one image's. Element types are the engine's own (pixel_values and image_features may be bf16 in
a bf16 build): the host side converts float32 to and from them. Runs on the decoder's stream and TensorRT
runtime, so image features are ready before the prefill that uses them.
"""

from __future__ import annotations

import time

import numpy as np

from gemma3.runtime.manifest import Manifest, ManifestError
from gemma3.runtime.tensorrt import cuda
from gemma3.runtime.tensorrt.engines import ENGINES_FILE, EngineSpec, TrtEngineView, deserialize


class TensorRTVision:
    """pixel values [N, 3, S, S] (float32) -> features [N * tokens, hidden] (float32), one image per run."""

    def __init__(self, manifest: Manifest, engines: EngineSpec, trt, runtime, stream: cuda.Stream) -> None:
        if manifest.vision is None:
            raise ValueError(f"the {manifest.model.name} export is text-only: it takes no images")
        if engines.vision is None:
            raise ManifestError(f"{engines.root / ENGINES_FILE} names no vision engine: rebuild with "
                                f"`gemma3-build {manifest.root} --force` to take images")
        self.spec, self.stream = manifest.vision, stream
        _, self.engine = deserialize(trt, engines.vision, "vision engine", runtime)
        view = TrtEngineView(trt, self.engine)
        pixels, features = self.spec.pixel_values, self.spec.image_features
        names = set(view.names())
        if names != {pixels, features} or view.io(pixels) != "input" or view.io(features) != "output":
            raise ManifestError(f"{engines.vision.name} has tensors {sorted(names)}, not the manifest's input "
                                f"{pixels} and output {features}")
        size = self.spec.image_size
        self.pixel_shape = (1, 3, size, size)
        low, _, high = view.profile(pixels, 0) if -1 in view.shape(pixels) else ((), (), ())
        if low and not all(lo <= s <= hi for lo, s, hi in zip(low, self.pixel_shape, high)):
            raise ManifestError(f"{engines.vision.name} takes {pixels} from {low} to {high}, not {self.pixel_shape}")
        self.pixel_dtype, self.feature_dtype = view.dtype(pixels), view.dtype(features)
        self.context = self.engine.create_execution_context()  # its own activation memory: runs before prefill
        if self.context is None or not self.context.set_input_shape(pixels, self.pixel_shape):
            raise RuntimeError(f"TensorRT could not set up {engines.vision.name} for {self.pixel_shape}")
        out_shape = tuple(self.context.get_tensor_shape(features))  # [1, tokens, hidden] once the input is set
        if len(out_shape) != 3 or out_shape[:2] != (1, self.spec.tokens_per_image):
            raise ManifestError(f"{engines.vision.name} gives {features} {out_shape}, not "
                                f"[1, {self.spec.tokens_per_image}, hidden]")
        self.rows, self.hidden = out_shape[1], out_shape[2]
        self._pixels = cuda.DeviceBuffer(int(np.prod(self.pixel_shape)) * cuda.ITEMSIZE[self.pixel_dtype])
        self._features = cuda.DeviceBuffer(self.rows * self.hidden * cuda.ITEMSIZE[self.feature_dtype])
        self._out = np.empty((self.rows, self.hidden), cuda.host_storage(self.feature_dtype))
        for name, buffer in ((pixels, self._pixels), (features, self._features)):
            if not self.context.set_tensor_address(name, buffer.ptr):
                raise RuntimeError(f"TensorRT refused the address of {name}")

    def __call__(self, pixel_values: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """Features [N * tokens, hidden] in order, and the seconds each image took (copies included)."""
        rows, seconds = [], []
        for image in pixel_values:
            start = time.perf_counter()
            host = cuda.to_device_dtype(np.asarray(image, np.float32)[None], self.pixel_dtype)
            self._pixels.upload(host, self.stream)  # pageable memory: staged before the call returns
            if not self.context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT could not run the vision engine (its log says why)")
            self._features.download(self._out, self.stream)
            self.stream.synchronize()
            rows.append(cuda.from_device_dtype(self._out, self.feature_dtype))  # a new array each time
            seconds.append(time.perf_counter() - start)
        return np.concatenate(rows), seconds

    def close(self) -> None:
        self.context = None
        for buffer in (self._pixels, self._features):
            buffer.free()
