"""The layers of docs/ARCHITECTURE.md, checked: a module imports only its own layer and the ones below.

Read from the source (ast), so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import es_ray

PACKAGE = Path(es_ray.__file__).parent

# Top-level module or package -> its layer (docs/ARCHITECTURE.md, "Layers"); higher imports lower.
LAYERS = {
    "bench": 4, "demo": 4, "cli": 4, "client": 4,
    "stack": 3, "serve": 3, "lifecycle": 3,
    "train": 2, "improve": 2, "data": 2,
    "inference": 1, "store": 1,
    "config": 0, "logs": 0, "metrics": 0, "periodic": 0, "retries": 0, "console": 0, "priority": 0,
}

# A job's entry point belongs to the processes layer although it lives with the code it runs.
JOB_ENTRY_POINTS = {"train/__main__.py", "data/upsert.py"}


def es_ray_imports(path: Path) -> set[str]:
    """The top-level es_ray modules or packages that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "es_ray":
            names = node.module.split(".")[1:2] or [alias.name for alias in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("es_ray."))
    return found


def test_every_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} <= set(LAYERS), f"no layer for {sorted(tops - {'__init__'} - set(LAYERS))}"


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        top = relative.split("/")[0].removesuffix(".py")
        if top == "__init__":
            continue
        layer = 3 if relative in JOB_ENTRY_POINTS else LAYERS[top]
        upward += [f"{relative} imports es_ray.{name}" for name in es_ray_imports(path)
                   if LAYERS.get(name, -1) > layer]
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)
