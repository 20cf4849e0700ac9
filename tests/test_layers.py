"""The layers hold: every module of every package imports only its own layer or the ones below, no private name
crosses a module, there is no import cycle (function-level imports counted), and a function-level import only
defers a heavy optional dependency. Read from the source, the way a reviewer would."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"earlyfusion": "earlyfusion", "tokenizer": "earlyfusion.tokenizer", "model": "earlyfusion.model",
           "training": "earlyfusion.training", "sampling": "earlyfusion.sampling"}

# Lowest first. model and tokenizer share a floor and may not import each other; the trainers draw their sample
# sheets with the sampling loop, so sampling sits below training and never imports it.
LAYERS = [
    ("core", ("earlyfusion.core",)),
    ("model", ("earlyfusion.model",)),
    ("tokenizer", ("earlyfusion.tokenizer",)),
    ("data", ("earlyfusion.training.data",)),
    ("sampling", ("earlyfusion.sampling",)),
    ("training", ("earlyfusion.training",)),
    ("application", ("earlyfusion",)),
]
RANK = {"core": 0, "model": 1, "tokenizer": 1, "data": 2, "sampling": 3, "training": 4, "application": 5}
OPTIONAL = ("transformers", "peft", "torch.utils.tensorboard", "sklearn")


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module}: in no layer")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found[name] = path
    return found


MODULES = modules()


def imports(path: Path, name: str) -> list[tuple[str, list[str], bool, int]]:
    """(module imported, names taken from it, inside a function, line) for each import of an earlyfusion module
    (relative imports resolved); other imports as (module, [], inside a function, line)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        nested = getattr(node, "col_offset", 0) > 0
        if isinstance(node, ast.Import):
            out += [(a.name, [], nested, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            names = [a.name for a in node.names]
            submodules = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            out.append((mod, [n for n in names if f"{mod}.{n}" not in MODULES], nested, node.lineno))
            out += [(s, [], nested, node.lineno) for s in submodules]
    return out


def test_every_module_is_in_a_layer():
    assert len(MODULES) > 50
    for name in MODULES:
        layer_of(name)


def test_no_module_imports_a_layer_above_it_or_a_peer_floor():
    bad = []
    for name, path in MODULES.items():
        mine = layer_of(name)
        for mod, _, _, line in imports(path, name):
            if not mod.startswith("earlyfusion"):
                continue
            theirs = layer_of(mod)
            if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine):
                bad.append(f"{path.relative_to(REPO)}:{line} ({mine}) imports {mod} ({theirs})")
    assert not bad, bad


def test_no_private_name_crosses_a_module():
    bad = [f"{path.relative_to(REPO)}:{line} takes {n} from {mod}"
           for name, path in MODULES.items() for mod, names, _, line in imports(path, name)
           for n in names if mod.startswith("earlyfusion") and mod != name and n.startswith("_")]
    assert not bad, bad


def test_function_level_imports_only_defer_optional_dependencies():
    bad = [f"{path.relative_to(REPO)}:{line} imports {mod} inside a function"
           for name, path in MODULES.items() for mod, _, nested, line in imports(path, name)
           if nested and not mod.startswith(OPTIONAL)]
    assert not bad, bad


def test_no_import_cycle():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for mod, _, _, _ in imports(path, name):
            if mod in MODULES and mod != name:
                graph[name].add(mod)
    # a module that imports a package depends on the package's __init__, which is in the graph itself
    done: set[str] = set()
    for start in sorted(graph):
        stack, on_path = [(start, iter(sorted(graph[start])))], [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
                continue
            if child in on_path:
                pytest.fail("import cycle: " + " -> ".join(on_path[on_path.index(child):] + [child]))
            if child not in done:
                stack.append((child, iter(sorted(graph[child]))))
                on_path.append(child)


@pytest.mark.parametrize("source,target,expect", [
    ("earlyfusion.tokenizer.vocab", "earlyfusion.training.data", "tokenizer"),
    ("earlyfusion.model.decoder", "earlyfusion.tokenizer.vocab", "model"),
    ("earlyfusion.sampling.generate", "earlyfusion.training.lm_train", "sampling"),
    ("earlyfusion.core.checkpoint", "earlyfusion.model.decoder", "core"),
])
def test_the_layer_rule_catches_an_upward_import(source, target, expect):
    """The rule above is not vacuous: each of these imports would break it."""
    mine, theirs = layer_of(source), layer_of(target)
    assert mine == expect
    assert RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine)
