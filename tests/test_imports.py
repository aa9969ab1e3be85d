"""The import graph: no cycles, and no module imports from a layer above its own (in-function imports count)."""

import ast
from pathlib import Path

import softar

ROOT = Path(softar.__file__).parent

# lowest first; a module may import from its own layer or any layer below
LAYERS = [
    ["softar"],
    ["softar.device", "softar.data", "softar.tasks", "softar.checkpoint", "softar.distributed", "softar.config",
     "softar.hf_folder"],
    ["softar.model"],
    ["softar.losses"],
    ["softar.soft"],
    ["softar.rundir"],  # runs and checkpoints: below every evaluation
    ["softar.decode", "softar.evaluate", "softar.train", "softar.workloads"],
    ["softar.bench", "softar.faults", "softar.experiments", "softar.inspect", "softar.quickstart",
     "softar.rl"],
    ["softar.cli", "softar.__main__", "softar.inject", "softar.docs"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    best = max(((i, p) for i, ps in enumerate(LAYERS) for p in ps if name == p or name.startswith(p + ".")),
               key=lambda ip: len(ip[1]))
    return best[0]


def imports() -> dict[str, set[str]]:
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("softar"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names
                             if (ROOT.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("softar"))
        graph[name] = found
    return graph


def test_no_upward_imports():
    bad = [f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
           for mod, deps in imports().items() for dep in deps if dep != "softar" and layer(dep) > layer(mod)]
    assert not bad, "\n".join(bad)


def test_model_knows_nothing_of_the_algorithm():
    for mod, deps in imports().items():
        if mod.startswith("softar.model"):
            assert not any(d.startswith(("softar.soft", "softar.losses", "softar.decode")) for d in deps), mod


def test_no_import_cycles():
    graph = imports()
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                raise AssertionError("cycle: " + " -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])
