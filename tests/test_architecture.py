"""The package's shape, checked: the import graph has no cycle and never points up a layer, every module
imports on its own, imports sit at the top of files (lazy ones say why), and no code outside the kind
registry branches on a kind or lists method names (docs/architecture.md)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "customgen"

# Lower layers never import higher ones (docs/architecture.md shows the same table).
LAYERS = {
    "customgen": 0, "customgen.errors": 0, "customgen.network": 0, "customgen.lock": 0,
    "customgen.request": 1, "customgen.limits": 1, "customgen.config": 1,
    "customgen.memory": 2, "customgen.peak": 2, "customgen.budget": 2,
    "customgen.models": 3,
    "customgen.data": 4, "customgen.metrics": 4, "customgen.train.freeze": 4, "customgen.train.losses": 4,
    "customgen.kinds": 5,
    "customgen.train": 6, "customgen.inference": 6,
    "customgen.evaluate": 7, "customgen.bench": 7, "customgen.export": 7,
    "customgen.demo": 8,
    "customgen.cli": 9, "customgen.__main__": 10,
}
METHOD_NAMES = ("lora_style", "dreambooth_style", "textual_inversion", "dreambooth_lora_subject", "lora_anime_kohya")
KIND_NAMES = ("lora", "dreambooth", "textual_inversion")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    """The layer of the longest registered prefix of `module`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(customgen module imported, node, inside a function?) for every import in a file."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        out += [(n, node, id(node) in nested) for n in names if n.split(".")[0] == "customgen"]
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(p) if t != m} for m, p in MODULES.items()}


def test_every_module_has_a_layer_and_no_import_points_up():
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in graph().items() for t in targets if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_import_graph_has_no_cycle():
    g, state, cycles = graph(), {}, []

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
