"""The attention kernel compiled ahead of time to PTX for sm_80, sm_89 and sm_90a on this GPU-less machine, and
its `.entry` parameter list checked against the AOT plugin ABI (input pointers, int32 scalars, output pointers,
then Triton 3.5's two hidden scratch pointers, which must not be needed: global scratch size 0).

Compiling runs in a subprocess: the rest of the suite runs Triton's interpreter, which patches triton.language.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from gemma3.plugins import attention_launch as launch
from gemma3.plugins.attention_aot import ARCHS, expected_params

CONFIGS = {
    # 1B / 4B / 12B-like local layer, bf16 (head_dim 256, GQA 4 keeps the widest tiles)
    "bf16-256-local": ["--head-dim", "256", "--heads", "4", "--kv-heads", "1", "--window", "512"],
    # 27B global layer with an fp8 cache (head_dim 128, GQA 2): Ada and Hopper only
    "fp8-128-global": ["--head-dim", "128", "--heads", "32", "--kv-heads", "16", "--window", "0", "--fp8-cache"],
    "fp16-128-global": ["--head-dim", "128", "--heads", "8", "--kv-heads", "4", "--window", "0", "--dtype", "float16",
                        "--arch", "sm_80"],
}


def _compile(out, args):
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "gemma3.plugins.attention_aot", "--out", str(out), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "index.json").read_text())


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_ptx_for_every_arch_has_the_plugin_abi(config, tmp_path):
    index = _compile(tmp_path, CONFIGS[config])
    fp8 = "--fp8-cache" in CONFIGS[config]
    want_archs = {"sm_80"} if "--arch" in CONFIGS[config] else ({"sm_89", "sm_90a"} if fp8 else set(ARCHS))
    assert {e["arch"] for e in index} == want_archs
    assert len(index) == len(want_archs) * len(launch.TACTICS)
    for entry in index:
        ptx = (tmp_path / entry["file"]).read_text()
        assert re.search(rf"^\.target {entry['arch']}\b", ptx, re.M), entry["file"]
        params = re.findall(r"\.param\s+\.(\w+)", ptx[ptx.index(".entry"):ptx.index(")", ptx.index(".entry"))])
        assert tuple(params) == expected_params(), entry["file"]
        assert entry["name"] in ptx
        assert entry["shared"] <= 227 * 1024  # fits an sm_90 block's shared memory


def test_fp8_caches_are_refused_before_sm_89(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "gemma3.plugins.attention_aot", "--out", str(tmp_path),
                          "--fp8-cache", "--arch", "sm_80", "--head-dim", "64", "--heads", "1", "--window", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "fp8 caches need sm_89" in run.stderr


def test_the_abi_check_reads_the_entry():
    from gemma3.plugins.attention_aot import entry_params

    ptx = ".visible .entry k(\n .param .u64 .ptr .global .align 1 k_param_0,\n .param .u32 k_param_1\n)\n{}"
    assert entry_params(ptx) == ("u64", "u32")
    assert entry_params(ptx) != expected_params()
