"""The package's import graph: no cycles, imports only go down the layer table, no `_private` name
crosses a module boundary, and stages import one another only along the edges declared here.

Every module under src/nexus is parsed with `ast` (nothing is imported), relative imports are
resolved, and imports inside functions count like top-level ones. The layer table is the one
docs/design.md ("Architecture") shows; a module missing from it fails the test, so a new module
is placed on purpose. The checker itself is tested on synthetic graphs and on a tmp package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nexus"

# Lowest first. A module may import modules of its own layer or of a lower one, never of a higher one.
# Keys are module names relative to the package ("" is the package itself); a key ending in ".*"
# matches a package and everything under it, and the longest matching key wins.
LAYERS = (
    # no torch model code: errors, files, progress, flags, the adapter config type, the command lines printed
    # after Ctrl-C, torch.distributed
    ("foundation", ("errors", "version", "fsutil", "defaults", "progress", "rerun", "dist", "demo_data", "flags",
                    "config")),
    # models and data: MoE discovery, the shared expert, adapters, the frozen base, datasets, the data stream
    ("core", ("", "families", "moe", "routing", "shared", "adapter", "base.*", "data", "packing", "device",
              "stream", "forward", "sharding")),
    # one package per stage: its logic, without argument parsing
    ("stages", ("stats.*", "convert.*", "teacher.*", "train.*", "validate.*", "plan.*", "chat.*")),
    # one module per verb (`nexus.verbs` lists them): flags, checks, messages; the logic is below; `launch`
    # relaunches a verb under torchrun
    ("verbs", ("verbs", "launch", "stats.cli.*", "convert.cli", "teacher.cli", "train.cli.*", "validate.cli",
               "plan.cli", "chat.cli")),
    # runs verbs: the pipeline, and the demo built on it
    ("orchestration", ("pipeline.*", "demo.*")),
    # the console script
    ("entry", ("cli", "__main__")),
)

# Stages are independent of one another except where one is built on the other, in one direction.
STAGES = ("stats", "convert", "teacher", "train", "validate", "plan", "chat")
STAGE_EDGES = {("train", "teacher"),  # train reads the teacher cache format (teacher.cache)
               ("convert", "stats"),  # convert --hidden-sample reads collect's raw sample (stats.reservoir)
               ("plan", "stats"),  # plan --keep-raw sizes collect's raw sample by its layout (stats.reservoir)
               ("plan", "teacher"),  # plan sizes precompute-teacher's cache by its format (teacher.cache)
               ("validate", "chat")}  # `validate --chat` opens a chat session on the validated model


def module_name(path: Path, root: Path) -> str:
    """src/nexus/train/cli.py -> "train.cli"; a package's __init__ is the package ("train", "" for nexus)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_package(root: Path) -> dict[str, tuple[bool, ast.Module]]:
    """{module name: (is a package, syntax tree)} for every .py file under `root`."""
    return {module_name(p, root): (p.name == "__init__.py", ast.parse(p.read_text(), str(p)))
            for p in sorted(root.rglob("*.py"))}


def imports(modules: dict[str, tuple[bool, ast.Module]], top: str = "nexus") -> tuple[dict, list]:
    """(graph {module: {imported module}}, [(module, imported module, name)] for `_private` names).

    `from .x import y` counts as an import of module x.y when that is a module, else of x (y is a
    name defined there). Absolute `import nexus.x` / `from nexus.x import y` count the same way.
    """
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []

    def resolve(target: str) -> str | None:
        return target if target in modules else None

    for name, (is_pkg, tree) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module == top or (node.module or "").startswith(top + "."):
                    target = node.module[len(top) + 1:]
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    dest = resolve(sub) if sub in modules else resolve(target)
                    if dest is None:
                        continue
                    if dest != name:
                        graph[name].add(dest)
                    if dest == target and alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((name, dest, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == top or alias.name.startswith(top + "."):
                        dest = resolve(alias.name[len(top) + 1:])
                        if dest is not None and dest != name:
                            graph[name].add(dest)
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Index of the module's layer (the longest matching key wins), or None when the table omits it."""
    best, best_len = None, -1
    for index, (_, keys) in enumerate(layers):
        for key in keys:
            if key.endswith(".*"):
                prefix = key[:-2]
                hit = module == prefix or module.startswith(prefix + ".")
            else:
                hit = module == key
            if hit and len(key) > best_len:
                best, best_len = index, len(key)
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Each import of a higher layer than the importer's, as a readable line."""
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            lm, lt = layer_of(module, layers), layer_of(target, layers)
            if lm is not None and lt is not None and lt > lm:
                out.append(f"{module or 'nexus'} ({layers[lm][0]}) imports {target} ({layers[lt][0]})")
    return out


def stage_of(module: str) -> str | None:
    head = module.split(".")[0]
    return head if head in STAGES else None


def cross_stage_imports(graph: dict[str, set[str]], edges=STAGE_EDGES, layers=LAYERS) -> list[str]:
    """Imports from one stage's logic into another's that `edges` does not declare (verb modules are
    above every stage and may use any of them)."""
    stage_layer = [name for name, _ in layers].index("stages")
    out = []
    for module, targets in sorted(graph.items()):
        if layer_of(module, layers) != stage_layer:
            continue
        for target in sorted(targets):
            a, b = stage_of(module), stage_of(target)
            if a and b and a != b and (a, b) not in edges:
                out.append(f"{module} imports {target} (stage {a} -> stage {b} is not a declared edge)")
    return out


# ---- the package ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package():
    modules = parse_package(SRC)
    graph, private = imports(modules)
    return modules, graph, private


def test_the_checker_sees_the_package(package):
    modules, graph, _ = package
    assert {"cli", "train.recipe", "teacher.precompute", "stream"} <= set(modules)
    assert "teacher.cache" in graph["train.build"]  # a function-local import counts
    assert "errors" in graph["train.recipe"]


def test_every_module_has_a_layer(package):
    modules, _, _ = package
    missing = sorted(m for m in modules if layer_of(m) is None)
    assert not missing, f"modules missing from the layer table in tests/test_layering.py: {missing}"


def test_no_import_cycles(package):
    _, graph, _ = package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(m or "nexus" for m in cycle)


def test_imports_only_go_down_the_layers(package):
    _, graph, _ = package
    assert upward_imports(graph) == []


def test_stages_import_each_other_only_along_declared_edges(package):
    _, graph, _ = package
    assert cross_stage_imports(graph) == []


def verb_modules(modules: dict[str, tuple[bool, ast.Module]]) -> dict[str, str]:
    """{verb: module name} from the `VERBS` table of verbs.py, read from its syntax tree."""
    for node in modules["verbs"][1].body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and "VERBS" in [
                t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]:
            return {verb: module.lstrip(".") for verb, module in ast.literal_eval(node.value).items()}
    raise AssertionError("verbs.py defines no VERBS table")


def test_verbs_are_cli_modules_and_import_no_other_verb(package):
    """Every verb is a `cli` module (its logic lives below it), and no verb module imports another."""
    modules, graph, _ = package
    verbs = verb_modules(modules)
    assert set(verbs.values()) <= set(modules), "a VERBS entry names no module"
    not_cli = sorted(m for m in verbs.values() if "cli" not in m.split("."))
    assert not_cli == [], f"verb modules outside a cli module: {not_cli}"
    verb_set = set(verbs.values())
    crossing = sorted(f"{m} imports {t}" for m in verb_set for t in graph[m] if t in verb_set)
    assert crossing == []


def test_no_private_name_crosses_a_module_boundary(package):
    _, _, private = package
    assert private == [], "\n".join(f"{m} imports {name} from {t}" for m, t, name in private)


def test_no_private_attribute_of_another_module_is_used(package):
    """`mod._name` where `mod` is a nexus module imported under that name (`from . import dist`)."""
    modules, graph, _ = package
    found = []
    for name, (is_pkg, tree) in modules.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name}: {node.value.id}.{node.attr}")
    assert found == []


# ---- the checker, on graphs made to fail ----------------------------------------------------------

def test_find_cycle_reports_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_upward_and_cross_stage_imports_are_reported():
    graph = {"errors": {"train.recipe"}, "train.recipe": {"errors", "teacher.cache"},
             "teacher.precompute": {"train.stream"}, "cli": {"train.cli"}, "train.cli": {"train.recipe"}}
    assert upward_imports(graph) == ["errors (foundation) imports train.recipe (stages)"]
    assert cross_stage_imports(graph) == [
        "teacher.precompute imports train.stream (stage teacher -> stage train is not a declared edge)"]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_in_a_package_on_disk_is_found(tmp_path):
    """A deliberately introduced cycle through a relative and a function-local import."""
    _write(tmp_path, {"__init__.py": "", "train/__init__.py": "",
                      "train/stream.py": "from ..teacher import precompute\n",
                      "teacher/__init__.py": "",
                      "teacher/precompute.py": "def f():\n    from ..train.stream import build\n",
                      "errors.py": "from .train.stream import x\n"})
    graph, _ = imports(parse_package(tmp_path))
    assert graph["teacher.precompute"] == {"train.stream"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"train.stream", "teacher.precompute"}
    assert "errors (foundation) imports train.stream (stages)" in upward_imports(graph)


def test_private_names_are_found(tmp_path):
    _write(tmp_path, {"__init__.py": "__version__ = '0'\n", "a.py": "def _hidden(): pass\n",
                      "b.py": "from .a import _hidden\nfrom . import __version__\nfrom nexus.a import _hidden as h\n"})
    _, private = imports(parse_package(tmp_path))
    assert private == [("b", "a", "_hidden"), ("b", "a", "_hidden")]


def test_the_architecture_doc_shows_this_layer_table():
    doc = (SRC.parents[1] / "docs" / "design.md").read_text()
    section = doc.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [row.split("|")[1].strip() for row in rows[::-1]] == [name for name, _ in LAYERS]
