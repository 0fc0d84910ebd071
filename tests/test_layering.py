"""The import rules of the code base, read from the source with ``ast`` (nothing is imported or executed):

* ``ccd_sampler/`` imports only torch and the standard library (the ComfyUI nodes and the web-UI glue load it
  inside the UIs' own environments);
* ``nodes/`` and the web-UI glue (``scripts/``, ``codi_webui/``) never import ``trainer/``, and ``trainer/`` never
  imports them (the node pack and the extension load without diffusers, accelerate or bitsandbytes); the ComfyUI nodes
  and the web-UI glue never import each other (each runs inside its own host);
* inside ``trainer/`` the sub-packages form layers -- ``errors``, ``disk`` < ``models`` < ``adapters``, ``data`` <
  ``evaluation`` < ``training`` < the entry scripts -- and a module imports only from its own sub-package or a
  lower layer (``adapters`` and ``data`` do not import each other);
* there is no import cycle among ``trainer/`` modules, counting imports inside functions too, so a lazy import
  cannot hide one.

Run on the repository, and on planted violations to show that each rule bites.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TRAINER_LAYERS = {"errors": 0, "disk": 0, "models": 1, "adapters": 2, "data": 2, "evaluation": 3, "training": 4,
                  "train": 5, "quality_report": 5, "__init__": 5}
GLUE_PACKAGES = ("nodes", "scripts", "codi_webui")
CCD_ALLOWED = {"torch"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, anywhere in the file (absolute names; relative imports resolved), with the
    line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # ``from pkg import x``: the sub-module ``pkg.x`` when there is one, else ``pkg`` (decided by the caller)
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return found


def python_files(root: Path, top: str) -> list[Path]:
    folder = root / top
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts) if folder.is_dir() else []


def trainer_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in python_files(root, "trainer")}


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return key, TRAINER_LAYERS.get(key, 5)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import): Tarjan's algorithm."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layering_violations(root: Path) -> list[str]:
    """Every broken rule in the tree at ``root``, one line each."""
    problems = []
    for path in python_files(root, "ccd_sampler"):
        for name, line in imports_of(path, root):
            top = name.split(".")[0]
            if top not in CCD_ALLOWED and top != "ccd_sampler" and top not in sys.stdlib_module_names:
                problems.append(f"{path.relative_to(root)}:{line}: ccd_sampler imports {name}")
    for glue in GLUE_PACKAGES:
        for path in python_files(root, glue):
            for name, line in imports_of(path, root):
                top = name.split(".")[0]
                if top == "trainer":
                    problems.append(f"{path.relative_to(root)}:{line}: {glue}/ imports the trainer ({name})")
                elif top in GLUE_PACKAGES and (top == "nodes") != (glue == "nodes"):
                    problems.append(f"{path.relative_to(root)}:{line}: {glue}/ imports {top}/ ({name}): the ComfyUI "
                                    "nodes and the web-UI glue are separate")
    modules = trainer_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, line in imports_of(path, root):
            top = name.split(".")[0]
            if top in GLUE_PACKAGES:
                problems.append(f"{path.relative_to(root)}:{line}: the trainer imports {top}/ ({name})")
            if top != "trainer":
                continue
            target = name if name in modules else name.rsplit(".", 1)[0]
            if target not in modules or target == module:
                continue
            graph[module].add(target)
            (mine, my_rank), (theirs, their_rank) = _layer(module), _layer(target)
            if mine != theirs and their_rank >= my_rank and target != "trainer":
                problems.append(f"{path.relative_to(root)}:{line}: trainer.{mine} (layer {my_rank}) imports "
                                f"{target} (trainer.{theirs}, layer {their_rank}): only lower layers may be imported")
    for cycle in import_cycles(graph):
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def test_the_repository_keeps_the_rules():
    assert layering_violations(REPO) == []


def test_every_trainer_module_is_in_a_layer():
    unknown = {m for m in trainer_modules(REPO) if _layer(m)[0] not in TRAINER_LAYERS}
    assert not unknown, f"put these in a layer of TRAINER_LAYERS: {sorted(unknown)}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_planted_violations_are_found(tmp_path):
    """A copy of the rules on a small planted tree: a lazy import that closes a cycle, an upward import, a trainer
    import from the nodes, a nodes import from the web-UI glue, and a non-torch dependency of ccd_sampler are each
    reported."""
    _write(tmp_path, {
        "ccd_sampler/__init__.py": "import torch\nimport numpy\n",
        "nodes/__init__.py": "from trainer.models import base\n",
        "codi_webui/panel.py": "from nodes.codi_info import CoDiInfo\n",
        "trainer/__init__.py": "",
        "trainer/errors.py": "",
        "trainer/models/__init__.py": "",
        "trainer/models/base.py": "from trainer.models import single_file\n",
        "trainer/models/single_file.py": "def load():\n    from trainer.models.base import X\n",
        "trainer/data/__init__.py": "",
        "trainer/data/dataset.py": "from trainer.training.loop import step\n",
        "trainer/training/__init__.py": "",
        "trainer/training/loop.py": "from trainer.data.dataset import D\nfrom ..models import base\n",
    })
    problems = "\n".join(layering_violations(tmp_path))
    assert "ccd_sampler imports numpy" in problems
    assert "nodes/ imports the trainer (trainer.models.base)" in problems
    assert "codi_webui/ imports nodes/ (nodes.codi_info.CoDiInfo)" in problems
    assert "import cycle: trainer.models.base -> trainer.models.single_file" in problems
    assert "trainer.data (layer 2) imports trainer.training.loop" in problems
    assert "import cycle: trainer.data.dataset -> trainer.training.loop" in problems
    # relative imports resolve, and an import from a lower layer is fine
    assert "trainer.training (layer 4) imports" not in problems
