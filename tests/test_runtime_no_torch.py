"""The runtime's one-way dependency rule: nothing under runtime/ needs torch, transformers, onnx or the exporter.

A serving box installs only numpy, onnxruntime, sentencepiece and pillow (the `runtime` extra). Every module is
imported in a fresh interpreter where those packages are blocked, and every import statement (top-level or
lazy, inside a function; absolute or relative, resolved against the module's package) is checked against the
allowed list. First-party modules outside runtime/ that the runtime imports (gemma3.plugins...) are followed
too: what they import when loaded (their top-level imports) must be on the list as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"gemma3.runtime": ROOT / "runtime", "gemma3.plugins": ROOT / "plugins"}  # pyproject's package-dir
RUNTIME_MODULES = sorted(
    "gemma3.runtime." + ".".join(p.relative_to(ROOT / "runtime").with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "runtime").rglob("*.py") if p.name != "__init__.py"
)
BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "gemma3.graphs", "gemma3.exporter")
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "sentencepiece", "PIL"}
# The optional TensorRT backend's own packages: only runtime/tensorrt may import them, and only inside functions
# (when a tensorrt folder is loaded), so an ort serving box never needs them.
OPTIONAL_LAZY = {"tensorrt", "cuda"}
ALLOWED_FIRST_PARTY = tuple(PACKAGES)


def module_file(name: str) -> Path | None:
    """The source file of a first-party module name, or None if it is not one of ours (or not a module)."""
    for package, folder in PACKAGES.items():
        if name == package or name.startswith(package + "."):
            base = folder.joinpath(*name[len(package):].lstrip(".").split(".")) if name != package else folder
            for path in (base.with_suffix(".py"), base / "__init__.py"):
                if path.is_file():
                    return path
    return None


def imports(tree: ast.Module, module: str, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """(absolute module name, line, lazy) of every import in `tree`; relative imports resolved against `module`'s
    package, `from X import y` also yielding X.y (y may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # `from . import x`, `from ..graphs import y`: what they name, absolutely
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - child.level + 1])
                    base = f"{anchor}.{base}" if base else anchor
                if base != "__future__":
                    found.append((base, child.lineno, lazy))
                    found.extend((f"{base}.{alias.name}", child.lineno, lazy) for alias in child.names
                                 if module_file(f"{base}.{alias.name}") is not None)
            visit(child, inner)

    visit(tree, False)
    return found


def problems(module: str, source: str, path: Path | None = None, top_level_only: bool = False) -> list[str]:
    is_package = path is not None and path.name == "__init__.py"
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for name, line, lazy in imports(ast.parse(source), module, is_package):
        if top_level_only and lazy:
            continue
        top = name.split(".")[0]
        ok = (top in stdlib or top in ALLOWED_THIRD_PARTY or name.startswith(ALLOWED_FIRST_PARTY)
              or (top in OPTIONAL_LAZY and lazy and module.startswith("gemma3.runtime.tensorrt")))
        if not ok:
            bad.append(f"{module} imports {name} (line {line})")
    return bad


def reachable() -> dict[str, bool]:
    """Every first-party module the runtime can import -> whether it lies under runtime/ (checked fully)."""
    seen = {m: True for m in RUNTIME_MODULES}
    todo = list(RUNTIME_MODULES)
    while todo:
        module = todo.pop()
        path = module_file(module)
        for name, _, lazy in imports(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if (lazy and not seen[module]) or name in seen or module_file(name) is None:
                continue  # outside runtime/ only what runs at import time is followed
            seen[name] = name.startswith("gemma3.runtime")
            todo.append(name)
    return seen


REACHABLE = reachable()


def test_every_runtime_module_imports_with_torch_blocked():
    code = "\n".join([
        "import importlib, sys",
        *[f"sys.modules[{name!r}] = None" for name in BLOCKED],  # `import torch` now raises ImportError
        f"for name in {RUNTIME_MODULES!r}:",
        "    importlib.import_module(name)",
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'onnx', 'google'}"
        " and sys.modules[m] is not None)",
        "assert not bad, bad",
        "print('ok', len(sys.modules))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.parametrize("module", sorted(REACHABLE))
def test_imports_are_on_the_allowed_list(module):
    path = module_file(module)
    assert not problems(module, path.read_text(), path, top_level_only=not REACHABLE[module])


def test_the_check_follows_relative_and_submodule_imports():
    assert "gemma3.runtime.tensorrt.engines" in REACHABLE and "gemma3.plugins.attention_aot" in REACHABLE
    assert "gemma3.plugins.attention_launch" in REACHABLE  # followed from attention_aot, outside runtime/
    module = "gemma3.runtime.api"
    assert problems(module, "from . import sampling\nfrom .tokenizer import Tokenizer\n") == []
    assert problems(module, "from ..graphs import config\n") == [f"{module} imports gemma3.graphs (line 1)"]
    assert problems(module, "def f():\n    from ..exporter.export import export\n") == [
        f"{module} imports gemma3.exporter.export (line 2)"]
    assert problems(module, "def f():\n    import tensorrt\n")  # lazily, but outside runtime/tensorrt
    assert not problems("gemma3.runtime.tensorrt.engines", "def f():\n    import tensorrt\n")
    assert problems("gemma3.runtime.tensorrt.engines", "import tensorrt\n")  # at import time: never
