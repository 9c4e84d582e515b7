"""The package's layers: no module imports from a layer above its own (docs/architecture.md).

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

#: lowest first; a module belongs to the first entry that is its name or a package above it
LAYERS: list[tuple[str, ...]] = [
    ("dpzo.fileio", "dpzo.integrity", "dpzo.progress", "dpzo.provenance", "dpzo.methods", "dpzo.masks.settings"),
    ("dpzo.privacy", "dpzo.data"),
    ("dpzo.models", "dpzo.zo"),
    ("dpzo.masks", "dpzo.baselines"),
    ("dpzo.pipeline", "dpzo.report", "dpzo.demo", "dpzo.bench", "dpzo.cli", "dpzo.cliargs", "dpzo.__main__", "dpzo"),
]


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
