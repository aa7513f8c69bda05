"""The package's shape, checked: every module sits in a layer, no import points to a higher layer, the import
graph has no cycle, every module imports on its own, imports sit at the top of files (lazy ones say why), and no
code outside the kind registry branches on a kind or lists method names (docs/architecture.md).

The layer table is read from docs/architecture.md (its "Layers" table), so the page and the rule are one thing.
A layer holds whole top-level modules and packages: a submodule cannot sit below its package (that is how
train/freeze.py once let the kinds import upward from train/)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "customgen"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
METHOD_NAMES = ("lora_style", "dreambooth_style", "textual_inversion", "dreambooth_lora_subject", "lora_anime_kohya")
KIND_NAMES = ("lora", "dreambooth", "textual_inversion", "merged")
# customgen.formats' names for what a file is (its report's `format`) and LyCORIS's algorithms (the layout names
# "kohya" and "diffusers" are left out: data layouts and export formats use those words for other things)
FORMAT_NAMES = ("locon", "loha", "lokr", "dora", "diffusers-lora", "embedding", "checkpoint", "hypernetwork")


def layer_table(text: str) -> dict[str, int]:
    """{module: layer} from the "## Layers" table of docs/architecture.md: `| N | `a`, `b` (comment) |` rows, names
    relative to customgen (`customgen` itself is the package root). Only top-level modules and packages."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    table = {}
    for number, cells in re.findall(r"^\|\s*(\d+)\s*\|(.*)\|\s*$", section, flags=re.M):
        for name in re.findall(r"`([^`]+)`", cells.split("(")[0]):
            if "." in name:
                raise ValueError(f"layer {number} lists {name}: a layer holds whole top-level modules and packages")
            if name in {m.split(".")[-1] for m in table} or name == "customgen" and "customgen" in table:
                raise ValueError(f"{name} is listed in two layers")
            table["customgen" if name == "customgen" else f"customgen.{name}"] = int(number)
    return table


def module_names(src: Path) -> dict[str, Path]:
    """{dotted name: file} of every module under src/customgen."""
    def name(path: Path) -> str:
        parts = path.relative_to(src).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return {name(p): p for p in sorted((src / "customgen").rglob("*.py"))}


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, ast.AST, bool]]:
    """(customgen module imported, node, inside a function?) for every import in a file (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    me = next(m for m, p in modules.items() if p == path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import z, relative to this module's package
                package = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out += [(n, node, id(node) in nested) for n in names if n.split(".")[0] == "customgen"]
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(p, modules) if t != m} for m, p in modules.items()}


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """A module's layer: its own entry, else its top-level package's (the root `customgen` covers only itself)."""
    top = ".".join(module.split(".")[:2])
    return table.get(module, table.get(top) if top != "customgen" else None)


def layering_problems(graph: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    """Every module without a layer and every import that points to a higher layer, one line each."""
    problems = [f"{m} is in no layer: add it to the Layers table of docs/architecture.md"
                for m in sorted(graph) if layer_of(m, table) is None]
    problems += [f"{m} (layer {layer_of(m, table)}) imports {t} (layer {layer_of(t, table)})"
                 for m in sorted(graph) for t in sorted(graph[m])
                 if None not in (layer_of(m, table), layer_of(t, table)) and layer_of(t, table) > layer_of(m, table)]
    return problems


MODULES = module_names(SRC)
LAYERS = layer_table(ARCHITECTURE.read_text())


def fixture_package(root: Path, files: dict[str, str]) -> Path:
    """A throwaway src/ tree: customgen/<path> → source text (every folder gets an __init__.py)."""
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / "customgen" / rel
        for folder in [path.parent, *path.parent.parents]:
            if folder == root:
                break
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "__init__.py").touch()
        path.write_text(text)
    return root


def test_every_module_has_a_layer_and_no_import_points_up():
    assert layering_problems(import_graph(MODULES), LAYERS) == []


def test_every_layer_entry_names_a_module_that_exists():
    assert [m for m in LAYERS if m not in MODULES] == []


def test_the_rule_fails_on_the_old_layout(tmp_path):
    """The layout before train/freeze.py moved under kinds/: kinds imported train.freeze while train imports kinds.
    With whole packages per layer that arrow points up, and the check says so."""
    src = fixture_package(tmp_path, {
        "kinds/lora.py": "from customgen.train.freeze import freeze\n",
        "train/freeze.py": "import torch\n",
        "train/build.py": "from customgen.kinds import lora\nfrom customgen.train.freeze import freeze\n",
    })
    modules = module_names(src)
    assert layering_problems(import_graph(modules), LAYERS) == [
        "customgen.kinds.lora (layer 5) imports customgen.train.freeze (layer 6)"]
    with pytest.raises(ValueError, match="layer 4 lists train.freeze"):  # the carve-out that hid it is refused too
        layer_table("\n## Layers\n| 4 | `data`, `train.freeze` |\n| 5 | `kinds` |\n| 6 | `train` |\n")


def test_the_rule_reads_relative_and_lazy_imports(tmp_path):
    src = fixture_package(tmp_path, {
        "models/__init__.py": "from ..demo import app\n",
        "data/scan.py": "def f():\n    from customgen.inference import stylize  # lazy: test\n",
        "demo.py": "app = 1\n",
    })
    assert layering_problems(import_graph(module_names(src)), LAYERS) == [
        "customgen.data.scan (layer 4) imports customgen.inference (layer 6)",
        "customgen.models (layer 3) imports customgen.demo (layer 8)"]


def test_a_new_module_without_a_layer_fails(tmp_path):
    """A new top-level module is in no layer until the table names it (the root `customgen` does not cover it);
    a new module inside a package takes the package's layer."""
    src = fixture_package(tmp_path, {"newthing.py": "from customgen.errors import UserError\n",
                                     "kinds/extra.py": "from customgen.models import Components\n"})
    assert layering_problems(import_graph(module_names(src)), LAYERS) == [
        "customgen.newthing is in no layer: add it to the Layers table of docs/architecture.md"]


def test_import_graph_has_no_cycle():
    g, state, cycles = import_graph(MODULES), {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(g.get(m, ())):
            if state.get(t) == "open":
                cycles.append(" → ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_imports_sit_at_the_top_unless_marked_lazy():
    """An import inside a function is allowed only for an optional or heavy dependency, and says so."""
    unmarked = []
    for m, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and "lazy" not in lines[node.lineno - 1]:
                    unmarked.append(f"{path.relative_to(SRC)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unmarked, "imports inside functions without a `# lazy: why` comment:\n" + "\n".join(unmarked)


def test_no_kind_branches_or_method_lists_outside_the_registry():
    """Only customgen/kinds/ may compare with a kind's name or write a recipe (method) name."""
    names = "|".join(KIND_NAMES)
    kind_branch = re.compile(rf"(==|!=|\bin)\s*[(\[{{]?\s*[\"']({names})[\"']|[\"']({names})[\"']\s*(==|!=)")
    recipe_literal = re.compile(r"[\"'](" + "|".join(METHOD_NAMES) + r")[\"']")
    found = []
    for m, path in MODULES.items():
        if m.startswith("customgen.kinds"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if kind_branch.search(code) or recipe_literal.search(code):
                found.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_no_format_branches_outside_formats():
    """Only customgen/formats/ may compare with a file format's or a LyCORIS algorithm's name: every other stage asks
    an Adapter what to change."""
    names = "|".join(FORMAT_NAMES)
    branch = re.compile(rf"(==|!=|\bin)\s*[(\[{{]?\s*[\"']({names})[\"']|[\"']({names})[\"']\s*(==|!=)")
    found = [f"{path.relative_to(SRC)}:{i}: {line.strip()}" for m, path in MODULES.items()
             if not m.startswith("customgen.formats")
             for i, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line.split("#")[0])]
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_every_module_imports_in_isolation():
    """Each module imported first in a fresh customgen namespace (third-party libraries preloaded, then one
    fork per module), so an import that only works after another module was loaded is caught."""
    script = f"""
import importlib, os, sys
sys.path.insert(0, {str(SRC)!r})
import torch, torchvision, diffusers, transformers, peft, accelerate, matplotlib, pandas, safetensors  # noqa
import gradio, torchmetrics, lpips, open_clip, scipy, yaml, tqdm.auto  # noqa: preloaded once, then forked
failed = []
for name in {sorted(m for m in MODULES if m != "customgen.__main__")!r}:  # __main__ runs the CLI
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as err:
            print(f"{{name}}: {{type(err).__name__}}: {{err}}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
