"""Dependencies point one way: the import graph of `skindual/`, read from the source with `ast`.

Every import counts, at the top of a module or inside a function.  The layers, ground up, are in
`LAYERS` (docs/architecture.md draws them); a module may import its own layer or those below, and
the graph has no cycle.  The stages and the model never import the demo world.  No module, job,
bench script or test imports a ``_private`` name from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "skindual"

LAYERS: dict[str, int] = {
    "skindual": 1, "errors": 1, "cli": 1, "cluster": 1, "prompts": 1, "storage": 1, "fingerprint": 1,
    "data": 2, "images": 2, "jpeg": 2, "quality": 2, "mask_stats": 2, "fidelity": 2, "downstream": 2,
    "base_models": 3, "model": 3, "dual_pipeline": 3, "sd2": 3, "sampling_speed": 3, "controlnet": 3,
    "guidance": 3,
    "losses": 4, "shard_format": 4, "shard_store": 4, "shard_reader": 4, "run_files": 4, "shards": 4, "report": 4,
    "pairs": 4,
    "mask_source": 4, "card": 4,
    "finetune": 5, "finetune_config": 5, "joint_trainer": 5, "controlnet_trainer": 5, "finetune_worker": 5,
    "generate": 5, "generate_config": 5, "generate_model": 5, "redraw": 5,
    "generate_actors": 5, "evaluate": 5, "evaluate_plan": 5, "evaluate_features": 5, "evaluate_downstream": 5,
    "export": 5, "prepare": 5, "qc_model": 5, "preview": 5,
    "demo": 6, "demo.render": 6, "demo.world": 6,
    "demo.chain": 7,
}
"""Module (under skindual/, the demo subpackage's as ``demo.<name>``) → its layer: 1 errors, CLI, cluster,
prompts, storage, the settings' fingerprint; 2 data and the pure measures; 3 the model (its sampling, and the module that
resolves what a --base-model names, SD-2's architecture built in code, the sampling speed levers, the ControlNet
branch and its segmenter guidance); 4 losses,
the shard format, writer and scans, run files and reader, report, the pair-dataset reader; 5 the stages (and
generation's config, model, redraws and Ray stages, fine-tuning's config, trainers and worker loop, and a dataset's
preview); 6 the demo world (skindual/demo/); 7 the demo chain."""

NEVER_DEMO = {"model", "dual_pipeline", "controlnet", "guidance", "controlnet_trainer", "losses", "base_models", "sd2", "sampling_speed", "pairs", "mask_source", "finetune", "generate", "evaluate", "export", "prepare",
              "qc_model", "finetune_config", "joint_trainer", "finetune_worker", "generate_config", "generate_model", "redraw", "generate_actors", "evaluate_plan",
              "evaluate_features", "evaluate_downstream", "preview"}


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join(parts) or "skindual"


def _target(parts: list[str]) -> str:
    """The module a dotted import names, ``skindual`` and anything within a module stripped: demo.world, model."""
    if len(parts) > 1 and (PACKAGE / parts[0]).is_dir():
        return ".".join(parts[:2]) if (PACKAGE / parts[0] / f"{parts[1]}.py").exists() else parts[0]
    if parts and ((PACKAGE / f"{parts[0]}.py").exists() or (PACKAGE / parts[0]).is_dir()):
        return parts[0]
    return "skindual"  # a name of the package itself (__version__)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(skindual module imported, line) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(_target(a.name.split(".")[1:]), node.lineno)
                      for a in node.names if a.name.split(".")[0] == "skindual"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "skindual":
                continue
            for alias in node.names:  # from skindual.demo import render: the name may be a module
                found.append((_target(parts[1:] + [alias.name]), node.lineno))
    return found


def graph() -> dict[str, dict[str, int]]:
    """module → {imported module: first line}."""
    edges: dict[str, dict[str, int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        edges[name] = {}
        for target, line in imports_of(path):
            if target != name:
                edges[name].setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert sorted(set(graph()) - set(LAYERS)) == []


def test_no_module_imports_a_layer_above_it():
    upward = [f"skindual/{m}:{line} imports {t} (layer {LAYERS.get(t)} > {LAYERS[m]})"
              for m, targets in graph().items() for t, line in targets.items()
              if m in LAYERS and LAYERS.get(t, 0) > LAYERS[m]]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_stages_and_the_model_never_import_the_demo():
    reaching = [f"skindual/{m}:{line} imports {t}" for m, targets in graph().items() if m in NEVER_DEMO
                for t, line in targets.items() if t.startswith("demo")]
    assert reaching == []


def private_imports(path: Path) -> list[str]:
    """`from skindual.x import _y`, and `x._y` on a module imported from skindual, in one file."""
    tree = ast.parse(path.read_text(), str(path))
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "skindual":
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{alias.name}")
                if node.module == "skindual":
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("skindual")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_nothing_imports_a_private_name_from_another_module():
    files = [p for folder in ("skindual", "jobs", "bench", "lab", "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert [line for path in files for line in private_imports(path)] == []


def test_the_layer_test_sees_an_upward_import_inside_a_function(tmp_path):
    source = tmp_path / "finetune.py"
    source.write_text("def resolve():\n    from skindual.demo.world import prepare_demo_world\n")
    assert imports_of(source) == [("demo.world", 2)]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
