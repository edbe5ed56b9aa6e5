"""The shape docs/architecture.md describes, checked on the source code itself (AST only: nothing is imported or
run). Every import counts, function-local ones included, so a lazy import cannot hide a layering violation or a
cycle. Each rule is also shown to catch a violation planted in a scratch package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "neoxray"
MAX_LINES = 600

INFERENCE = ["neoxray.platform.inference"]
"""The inference engine: plain PyTorch, so that GPU machines without Ray (and `--no-ray`) run it."""
TRAIN_ENGINE = [
    "neoxray.platform.train.engine",
    "neoxray.platform.train.pipe",
    "neoxray.platform.train.distributed",
    "neoxray.platform.train.checkpointing",
    "neoxray.platform.train.worker",
    "neoxray.platform.train.local",
    "neoxray.platform.train.run_plan",
    "neoxray.platform.train.preflight",
    "neoxray.platform.train.resume",
    "neoxray.platform.train.data",
]
"""The training engine and loop: DeepSpeed and torch.distributed, never Ray (torchrun and GPU benchmarks)."""
SHARED_PLATFORM = [
    "neoxray.platform.checkpoint",
    "neoxray.platform.lora_checkpoint",
    "neoxray.platform.model_loading",
    "neoxray.platform.export",
]
"""Used by training, serving and evaluation alike, so they belong to none of them."""
BELOW_THE_LAYERS = ["neoxray.errors", "neoxray.paths", "neoxray.ray_connection"]
"""Used by the layers alike (one error type, one way to tell a URI from a local path, one way to connect to
Ray), so they know none of them."""

RULES: list[tuple[list[str], list[str], str]] = [
    (
        ["neoxray.model"],
        ["neoxray.pipelines", "neoxray.platform", "neoxray.cli"],
        "the model knows neither data formats nor the platform",
    ),
    (["neoxray.model"], ["ray", "deepspeed", "pyarrow", "fastapi", "uvicorn"], "the model is plain PyTorch"),
    (["neoxray.pipelines"], ["neoxray.platform", "neoxray.cli"], "pipelines know no platform"),
    (["neoxray.pipelines"], ["deepspeed", "fastapi"], "pipelines are data only"),
    (
        ["neoxray.platform.serve"],
        ["neoxray.platform.train", "neoxray.platform.eval"],
        "serving imports no training or evaluation module",
    ),
    (["neoxray.platform.train"], ["neoxray.platform.serve"], "training imports no serving module"),
    (
        ["neoxray.platform.eval"],
        ["neoxray.platform.serve", "neoxray.platform.train"],
        "evaluation runs on the inference engine, not on the server or the trainer",
    ),
    (
        INFERENCE,
        ["neoxray.platform.serve", "neoxray.platform.train", "neoxray.platform.eval"],
        "the inference engine is used by serving and evaluation and knows neither",
    ),
    (
        SHARED_PLATFORM,
        ["neoxray.platform.train", "neoxray.platform.serve"],
        "checkpoint reading and model loading are shared by training and serving",
    ),
    (
        BELOW_THE_LAYERS,
        ["neoxray.model", "neoxray.pipelines", "neoxray.platform", "neoxray.cli"],
        "errors, paths and the Ray connection sit below every layer that uses them",
    ),
    (
        [
            "neoxray.platform.checkpoint",
            "neoxray.platform.lora_checkpoint",
            "neoxray.platform.model_loading",
            "neoxray.platform.export",
        ],
        ["ray", "deepspeed"],
        "reading (and exporting) a checkpoint needs neither Ray nor DeepSpeed",
    ),
    (INFERENCE, ["ray", "fastapi", "deepspeed", "uvicorn"], "the inference engine runs without Ray"),
    (TRAIN_ENGINE, ["ray"], "the training engine runs without Ray"),
    (
        [
            "neoxray.model",
            "neoxray.pipelines",
            "neoxray.platform.serve",
            "neoxray.platform.train",
            "neoxray.platform.eval",
        ],
        ["llguidance", "xgrammar"],
        "structured output's grammar library stays inside the inference engine",
    ),
    (["neoxray.model", "neoxray.pipelines", "neoxray.platform"], ["neoxray.cli"], "only the entry point is the CLI"),
]


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path) -> dict[str, set[str]]:
    """Every module under the package at `root` -> the modules it imports anywhere in its body: absolute names,
    relative imports resolved, `from pkg import submodule` counted as importing the submodule."""
    files = {module_name(root, f): f for f in sorted(root.rglob("*.py"))}
    packages = {m for m, f in files.items() if f.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for mod, file in files.items():
        here = mod if mod in packages else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), str(file))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
                found.update(subs)
                if len(subs) < len(node.names):
                    found.add(target)
        graph[mod] = found
    return graph


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, set[str]], rules=RULES) -> list[str]:
    out = []
    for importers, forbidden, why in rules:
        for mod, targets in sorted(graph.items()):
            if _under(mod, importers):
                out += [f"{mod} imports {t} ({why})" for t in sorted(targets) if _under(t, forbidden)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), Tarjan's way."""
    edges = {m: sorted(t for t in ts if t in graph) for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_layering_rules_hold():
    graph = imports_of(ROOT / PACKAGE)
    assert len(graph) > 40
    assert violations(graph) == []


def test_no_import_cycles_counting_function_local_imports():
    assert cycles(imports_of(ROOT / PACKAGE)) == []


def test_every_module_the_rules_name_exists():
    graph = imports_of(ROOT / PACKAGE)
    named = {m for importers, _, _ in RULES for m in importers if m.startswith(PACKAGE)}
    assert sorted(m for m in named if m not in graph) == []


def test_no_source_file_is_over_600_lines():
    long = []
    for folder in ("neoxray", "tests", "benchmarks", "tools"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            n = len(f.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                long.append(f"{f.relative_to(ROOT)}: {n} lines")
    assert long == []


def test_the_checker_catches_planted_violations_and_cycles(tmp_path):
    pkg = tmp_path / "neoxray"
    files = {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/a.py": "def f():\n    from neoxray.platform.train import engine\n",  # layering, function-local
        "model/b.py": "from . import c\n",  # relative: b -> c
        "model/c.py": "def g():\n    from neoxray.model import b\n",  # c -> b: a cycle, hidden in a function
        "platform/__init__.py": "",
        "platform/serve/__init__.py": "",
        "platform/inference/engine.py": "import ray\nfrom ..train.engine import X\n",
        "platform/train/__init__.py": "",
        "platform/train/engine.py": "X = 1\n",
        "ray_connection.py": "def connect():\n    from neoxray.pipelines import reader\n",  # below the pipelines
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = imports_of(pkg)
    assert graph["neoxray.model.b"] == {"neoxray.model.c"}
    found = violations(graph)
    assert any(v.startswith("neoxray.model.a imports neoxray.platform.train.engine") for v in found)
    assert any(v.startswith("neoxray.platform.inference.engine imports neoxray.platform.train.engine") for v in found)
    assert any(v.startswith("neoxray.platform.inference.engine imports ray ") for v in found)
    assert any(v.startswith("neoxray.ray_connection imports neoxray.pipelines ") for v in found)
    assert cycles(graph) == [["neoxray.model.b", "neoxray.model.c"]]


def test_architecture_doc_names_every_module():
    """docs/architecture.md is the truth about the structure: every module of the package is named in it
    (as `neoxray.x.y`), and it names no module that does not exist."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    graph = imports_of(ROOT / PACKAGE)
    assert [m for m in sorted(graph) if m != PACKAGE and f"`{m}`" not in text] == []
    named = set(re.findall(r"`(neoxray(?:\.[a-z_]+)+)`", text))  # modules, or a module's attribute
    assert sorted(n for n in named if n not in graph and n.rpartition(".")[0] not in graph) == []
