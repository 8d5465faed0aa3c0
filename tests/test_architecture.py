"""The package's import graph, read from the source (ast): no cycle between modules, and no
module importing from a layer above its own. Imports inside functions count; those under
``if TYPE_CHECKING:`` (never run) do not."""
import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "surm"

# Lowest first. A module may import its own layer and the ones below.
LAYERS = [
    ("base", ("surm.structured", "surm.metrics", "surm.cli", "surm.workdir", "surm.allocator",
              "surm.config_fields", "surm.sharding", "surm.defaults")),
    ("data", ("surm.data",)),
    ("models", ("surm.models",)),
    ("peft", ("surm.peft",)),
    ("tasks", ("surm.lm", "surm.predictions", "surm.tasks")),
    ("train", ("surm.train", "surm.optim", "surm.checkpointing", "surm.run_log", "surm.runs",
               "surm.config_args", "surm.timing", "surm.generate", "surm.inspect")),
    ("top", ("surm.sweep", "surm.study", "surm.interop", "surm.export", "surm.cka")),
]


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods]
                if len(targets) < len(subs):
                    targets.append(base)  # names defined in the package or module itself
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if m != "surm" and layer_of(m) is None)
    assert not missing, f"modules with no layer in LAYERS: {missing}"


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in import_graph().items() if a != "surm"
              for b in targets if b != "surm" and layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(
                    path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(modules()):
        if node not in state:
            visit(node)


def test_every_console_script_names_a_callable():
    import importlib
    import tomllib
    scripts = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"surm-train", "surm-sweep", "surm-export", "surm-generate"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
