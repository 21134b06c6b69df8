"""The runtime's one-way dependency rule: nothing under runtime/ needs torch, transformers, onnx or the exporter.

A serving box installs only numpy, onnxruntime, sentencepiece and pillow (the `runtime` extra). Every module is
imported in a fresh interpreter where those packages are blocked, and every import statement (top-level or
lazy, inside a function) is checked against the allowed list.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

RUNTIME = Path(__file__).resolve().parent.parent / "runtime"
MODULES = sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__")
BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "gemma3.graphs", "gemma3.exporter")
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "sentencepiece", "PIL"}
ALLOWED_FIRST_PARTY = ("gemma3.runtime", "gemma3.plugins")


def test_every_runtime_module_imports_with_torch_blocked():
    code = "\n".join([
        "import importlib, sys",
        *[f"sys.modules[{name!r}] = None" for name in BLOCKED],  # `import torch` now raises ImportError
        f"for name in {MODULES!r}:",
        "    importlib.import_module('gemma3.runtime.' + name)",
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'onnx', 'google'}"
        " and sys.modules[m] is not None)",
        "assert not bad, bad",
        "print('ok', len(sys.modules))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("module", MODULES)
def test_imports_are_on_the_allowed_list(module):
    tree = ast.parse((RUNTIME / f"{module}.py").read_text())
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            ok = top in stdlib or top == "__future__" or top in ALLOWED_THIRD_PARTY or name.startswith(
                ALLOWED_FIRST_PARTY)
            assert ok, f"runtime/{module}.py imports {name} (line {node.lineno})"
