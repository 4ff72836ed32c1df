"""The package's layers: core (numpy only) < runtime < tooling and front ends; nothing imports upward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "args_local"
HEAVY = ("llama_cpp", "onnxruntime", "tokenizers", "torch", "transformers", "optimum", "click")
# What each layer may import from the package itself.
ALLOWED = {
    "core": {"core"},
    "runtime": {"core", "runtime"},
    "tooling": {"core", "runtime", "tooling"},
}


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else "front"


def package_imports(path: Path) -> set[str]:
    """The first component under args_local of every import in ``path`` (lazy ones included)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]  # a package's __init__ counts as a module in it
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "args_local" and len(parts) > 1:
                found.add(parts[1] if parts[1] in ALLOWED else "front")
    return found


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) in ALLOWED), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_imports_upward(path):
    upward = package_imports(path) - ALLOWED[layer_of(path)]
    assert not upward, f"{path.relative_to(PACKAGE)} ({layer_of(path)}) imports from {sorted(upward)}"


def test_core_loads_none_of_the_heavy_packages():
    """In a fresh interpreter: importing every module under args_local.core brings numpy only."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import args_local.core as core\n"
        "for m in pkgutil.walk_packages(core.__path__, 'args_local.core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(' '.join(n for n in {HEAVY!r} if n in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_the_layer_check_sees_relative_and_lazy_imports():
    """The check can fail: it finds the runtime's relative imports and the CLI's lazy ones."""
    assert package_imports(PACKAGE / "runtime" / "engine.py") == {"core", "runtime"}
    assert {"core", "runtime", "tooling"} <= package_imports(PACKAGE / "cli.py")
