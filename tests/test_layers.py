"""The house's layers (docs/design.md): every package of src/ imports only packages of lower layers,
so there is no import cycle, and the portable model knows nothing of the CPU backend.

Run alone: python -m pytest -q tests/test_layers.py (reads the source, imports nothing).
"""
import ast
import os

from conftest import ROOT

SRC = os.path.join(ROOT, "src")
# Lower number = lower layer. A module may import its own package and packages of lower layers.
LAYERS = {
    "config": 0, "geometry": 0,
    "utils": 1,
    "model": 2, "data": 2,
    "ops": 3, "inference": 3,
    "engine": 4, "evaluation": 4, "deploy": 4,
    "launch": 5,
    "builder": 6,
}


def package_imports():
    """{(importing package, imported package): [module paths]} over src/, by reading the source."""
    found = {}
    for folder, _, files in os.walk(SRC):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = os.path.relpath(path, SRC).split(os.sep)
            package = parts[0] if len(parts) > 1 else parts[0][:-3]
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                for module in modules:
                    if module.startswith("src.") and module.split(".")[1] != package:
                        found.setdefault((package, module.split(".")[1]), []).append(os.path.relpath(path, ROOT))
    return found


def test_every_package_has_a_layer():
    packages = {name[:-3] if name.endswith(".py") else name for name in os.listdir(SRC)
                if name != "__init__.py" and not name.startswith("__") and (name.endswith(".py") or
                                                                            os.path.isdir(os.path.join(SRC, name)))}
    assert packages == set(LAYERS), sorted(packages ^ set(LAYERS))


def test_imports_only_look_down():
    """Mutation caught: inference importing deploy (the cycle engine -> inference -> deploy -> engine)."""
    upward = {f"{a} -> {b}": paths for (a, b), paths in package_imports().items() if LAYERS[b] >= LAYERS[a]}
    assert not upward, upward


def test_the_model_knows_nothing_of_the_backend():
    assert not [pair for pair in package_imports() if pair == ("model", "ops")]


def test_preprocess_imports_no_mindspore():
    """preprocess.py runs where only the exported model's contract is needed (no MindSpore)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, preprocess; "
                           "print([m for m in sys.modules if m.split('.')[0] == 'mindspore'])"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
