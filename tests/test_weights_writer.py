"""The weight writer: row-chunked float tables and two writer threads give exactly the bytes of a plain write."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from gemma3.exporter import weights
from gemma3.exporter.weights import Stored, WeightPlan
from gemma3.graphs.loaders.checkpoint import Checkpoint


class _Tensors(Checkpoint):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._t, self.source = tensors, "test tensors"

    def names(self):
        return list(self._t)

    def shape(self, name):
        return tuple(self._t[name].shape)

    def tensor(self, name):
        return self._t[name].clone()


def _plan(graph: ir.Graph) -> WeightPlan:
    plan = WeightPlan("w.data")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    plan.add(graph, Stored("table", "table", bf16, (1000, 24), lambda w: w, rowwise=True))
    plan.add(graph, Stored("a.T", "a", np.float32, (24, 40), lambda w: w.T))
    plan.add(graph, Stored("ab.sum", ("a", "b"), np.float32, (24,), lambda w: w.sum(0)))
    plan.add(graph, Stored("norm", "norm", bf16, (24,), lambda w: w))
    return plan


def test_chunked_threaded_write_equals_plain_write(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tensors = {"table": torch.randn(1000, 24, generator=g).to(torch.bfloat16), "a": torch.randn(40, 24, generator=g),
               "b": torch.randn(8, 24, generator=g), "norm": torch.randn(24, generator=g)}
    checkpoint = _Tensors(tensors)
    files = []
    for chunk_bytes, workers in ((1 << 30, 1), (24 * 4 * 7, 2)):  # one chunk; 7 rows per chunk (1000 % 7 != 0)
        monkeypatch.setattr(weights, "ROW_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(weights, "ROWS_PER_CHUNK", 1)
        graph = ir.Graph([], [], nodes=[])
        plan = _plan(graph)
        size = plan.layout(graph, tmp_path)
        path = tmp_path / f"w{workers}.data"
        plan.write(checkpoint, path, size, workers=workers)
        files.append(path.read_bytes())
    assert files[0] == files[1]
    table = np.frombuffer(files[1][: 1000 * 24 * 2], dtype=ml_dtypes.bfloat16).reshape(1000, 24)
    assert np.array_equal(table.astype(np.float32), tensors["table"].float().numpy())
    offset = plan.entries["a.T"].offset
    a_t = np.frombuffer(files[1][offset: offset + 24 * 40 * 4], dtype=np.float32).reshape(24, 40)
    assert np.array_equal(a_t, tensors["a"].numpy().T)


def test_safetensors_row_chunks_read_slices(tmp_path):
    """The table is streamed from safetensors a slice of rows at a time, with the values of a whole read."""
    from gemma3.exporter.recipes import EMBED
    from gemma3.graphs import open_checkpoint
    from gemma3.graphs.config import tiny
    from tests.hf_reference import random_hf_model, save_hf

    checkpoint = open_checkpoint(save_hf(random_hf_model(tiny(), seed=1), tmp_path / "hf"))
    chunks = list(checkpoint.row_chunks(EMBED, 7))
    whole = checkpoint.tensor(EMBED)
    assert [start for start, _ in chunks] == list(range(0, whole.shape[0], 7))
    assert torch.equal(torch.cat([rows for _, rows in chunks]), whole)


def test_progress_logs_every_tenth_without_a_terminal(monkeypatch):
    """Off a terminal (CI logs, pipes) a long stage still reports: a line per 10% of the work, and the total."""
    import io
    import logging

    from gemma3.exporter.progress import Progress, log

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal, even under pytest -s
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    level = log.level
    log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the logger's isEnabledFor cache
    log.addHandler(handler)
    try:
        progress = Progress("writing", 100 * 2**20)
        for _ in range(20):
            progress.update(5 * 2**20)
        progress.close()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    lines = [r.getMessage() for r in records]
    assert sum("%" in line for line in lines) == 10 and "100%" in lines[-2]
    assert lines[-1].startswith("writing: 0.10 GiB in")
