"""A bare ONNX Runtime loop over an exported decoder (no runtime package): what the exporter tests drive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


class Steps:
    def __init__(self, folder: Path, graph: str = "decoder", global_capacity: int = 1024):
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self.io = self.manifest[graph]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(folder / self.io["file"]), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        model = self.manifest["model"]
        self.cache = {}
        for layer in self.io["layers"]:
            rows = layer["capacity"] or global_capacity
            for kind in ("key", "value"):
                shape = (1, model["num_kv_heads"], rows, model["head_dim"])
                self.cache[layer[f"past_{kind}"]] = np.zeros(shape, np.float32)
        self.past = 0
        self.folder, self.options, self.image_session = folder, options, None

    def __call__(self, ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """Feed ids (1, S) after the tokens fed so far; returns the logits the graph gives. With image_features
        (the step's soft-token rows), the manifest's image_decoder runs the step on the same caches."""
        past = [self.past] if self.io.get("batch") else self.past  # batch graphs: one length per sequence
        feeds = {"input_ids": ids.astype(np.int64), "past_len": np.array(past, np.int64), **self.cache}
        session = self.session
        if image_features is not None:
            if self.image_session is None:
                file = self.folder / self.manifest["image_decoder"]["file"]
                self.image_session = ort.InferenceSession(str(file), self.options, providers=["CPUExecutionProvider"])
            session, feeds["image_features"] = self.image_session, image_features.astype(np.float32)
        if session is self.session and self.io.get("logits_count"):  # the generation graph: last position only
            feeds[self.io["logits_count"]] = np.array(1, np.int64)
        result = dict(zip(self.outputs, session.run(self.outputs, feeds)))
        for layer in self.io["layers"]:
            for kind in ("key", "value"):
                present = result[layer[f"present_{kind}"]]
                assert present.shape == self.cache[layer[f"past_{kind}"]].shape  # in-place compatible
                self.cache[layer[f"past_{kind}"]] = present
        self.past += ids.shape[1]
        return result["logits"]
