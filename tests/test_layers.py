"""The package's layers: no module imports from a layer above its own, and no import circles
(docs/architecture.md).

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside
functions do (they run when the function does).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

#: lowest first; a module belongs to the first entry that is its name or a package above it
LAYERS: list[tuple[str, ...]] = [
    # dpzo.masks.settings: MaskSettings and Mask, torch-free (the methods and the Snakefile read it)
    ("dpzo.fileio", "dpzo.integrity", "dpzo.progress", "dpzo.provenance", "dpzo.methods", "dpzo.masks.settings"),
    ("dpzo.privacy", "dpzo.data"),
    ("dpzo.models", "dpzo.zo"),
    ("dpzo.masks", "dpzo.baselines"),
    # dpzo.bench: the benchmark and its reference step (dpzo.bench.official); dpzo.cliargs: what
    # every subcommand's parser shares
    ("dpzo.pipeline", "dpzo.report", "dpzo.demo", "dpzo.bench", "dpzo.cli", "dpzo.cliargs", "dpzo.__main__", "dpzo"),
]

#: import circles known when this test was written, each the set of its modules; a circle is
#: allowed only while it is exactly one of these (one that grows or a new one fails the test)
KNOWN_CYCLES: set[frozenset[str]] = set()


def layer_of(module: str) -> int:
    best = None
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (level, name)
    assert best is not None, module
    return best[0]


def runtime_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every dpzo import outside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpzo"):
            for alias in node.names:  # "from dpzo.zo import flat" imports the module dpzo.zo.flat
                full = f"{node.module}.{alias.name}"
                found.append((node.lineno, full if (SRC / (full.replace(".", "/") + ".py")).exists() else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("dpzo")]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """module -> the dpzo modules it imports at run time (top level or inside functions)."""
    graph = {module_name(p): set() for p in sorted((SRC / "dpzo").rglob("*.py"))}
    for path in sorted((SRC / "dpzo").rglob("*.py")):
        imported = {m for _, m in runtime_imports(ast.parse(path.read_text()))}
        graph[module_name(path)] = {m for m in imported if m in graph}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with a circle in them (Tarjan's algorithm): every
    module of one reaches every other through run-time imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1 or v in graph[v]:
                cycles.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def describe_cycle(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    """The modules of a circle and the imports between them."""
    edges = [f"{a} -> {b}" for a in sorted(component) for b in sorted(graph[a] & component)]
    return f"{{{', '.join(sorted(component))}}}: " + "; ".join(edges)


def test_no_import_circles():
    graph = import_graph()
    cycles = [c for c in import_cycles(graph) if c not in KNOWN_CYCLES]
    assert not cycles, "import circles:\n" + "\n".join(describe_cycle(c, graph) for c in cycles)


def test_the_cycle_finder_reports_each_circle_with_its_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": {"a"}}
    assert sorted(import_cycles(graph), key=sorted) == [frozenset("abc"), frozenset("d")]
    assert describe_cycle(frozenset("abc"), graph) == "{a, b, c}: a -> b; b -> c; c -> a"


def test_the_known_cycles_are_still_there():
    """An entry of KNOWN_CYCLES whose circle is gone must be removed (so it cannot hide a new one)."""
    assert KNOWN_CYCLES <= set(import_cycles(import_graph()))


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for path in sorted((SRC / "dpzo").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        own = layer_of(module)
        for line, imported in runtime_imports(ast.parse(path.read_text())):
            if layer_of(imported) > own:
                wrong.append(f"{module}:{line} imports {imported} (layer {layer_of(imported)} > {own})")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer():
    for path in (SRC / "dpzo").rglob("*.py"):
        layer_of(".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"))


def test_data_reads_its_sources_one_way():
    """``data/``: a task draws its own splits (tasks -> splits, hf_tasks -> hf_data -> splits);
    splits, inputs and hf_data name the task classes for annotations only."""
    graph = import_graph()
    assert {"dpzo.data.hf_data", "dpzo.data.task"} <= graph["dpzo.data.hf_tasks"]
    assert "dpzo.data.splits" in graph["dpzo.data.hf_data"]
    for reader in ("dpzo.data.splits", "dpzo.data.hf_data", "dpzo.data.inputs"):
        assert not graph[reader] & {"dpzo.data.tasks", "dpzo.data.hf_tasks"}, reader


def code_lines(node: ast.AST, text: list[str]) -> int:
    """Lines of a function that hold code: not blank, not only a comment, not its docstring."""
    skip = set()
    if ast.get_docstring(node) is not None:
        skip = set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return sum(
        1
        for n in range(node.lineno, node.end_lineno + 1)
        if n not in skip and text[n - 1].strip() and not text[n - 1].strip().startswith("#")
    )


def test_no_function_in_the_package_is_over_80_code_lines():
    """One function per algorithm step: a longer one is cut into named steps."""
    long = []
    for path in sorted((SRC / "dpzo").rglob("*.py")):
        text = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(text))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node, text) > 80:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {code_lines(node, text)} code lines")
    assert not long, "\n".join(long)


def test_no_hasattr_steers_the_package():
    """Objects say what they are through their classes and protocols (``zo.store.ParameterStore``,
    ``data.task.Task``, ``Method`` properties), not by probing for attributes."""
    found = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in sorted((SRC / "dpzo").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "hasattr(" in line
    ]
    assert not found, "\n".join(found)
