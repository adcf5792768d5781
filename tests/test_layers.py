"""The code's layers, checked from its imports (README: "How the code is laid out").

1. ground, `linguadiff/`: config, run folder, ranks, the models, generation;
2. training, `lightning_modules/`, `datamodules/`, `callbacks/`: siblings that never import
   each other;
3. entry points and tools: train.py, generate.py, evaluate.py, `evaluation/`, `scripts/`,
   `benchmarks/`.

Each module may import only from its own layer's package or the layers below, and never a
private (underscored) name from another module. Imports inside functions count too: a lazy
import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GROUND, TRAINING, TOOLS = 1, 2, 3
PACKAGE_LAYERS = {
    "linguadiff": GROUND,
    "lightning_modules": TRAINING,
    "datamodules": TRAINING,
    "callbacks": TRAINING,
    "evaluation": TOOLS,
    "scripts": TOOLS,
    "benchmarks": TOOLS,
    "train": TOOLS,
    "generate": TOOLS,
    "evaluate": TOOLS,
}
# Benchmark and script files import each other by bare name (their folder is on sys.path).
BARE_TOOL_MODULES = {"bench_stage1", "bench_stage2", "timing", "cache_features", "make_demo_base", "make_demo_llm"}


def project_files(root: Path) -> list[Path]:
    files = [root / f"{name}.py" for name, layer in PACKAGE_LAYERS.items() if (root / f"{name}.py").is_file()]
    for name in PACKAGE_LAYERS:
        if (root / name).is_dir():
            files += sorted((root / name).rglob("*.py"))
    return files


def package_of(module: str) -> str | None:
    top = module.split(".")[0]
    if top in PACKAGE_LAYERS:
        return top
    return "benchmarks" if top in BARE_TOOL_MODULES else None


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def layer_violations(root: Path) -> list[str]:
    problems = []
    for path in project_files(root):
        rel = path.relative_to(root)
        own = package_of(rel.with_suffix("").as_posix().replace("/", "."))
        for line, module, names in imports_of(path):
            target = package_of(module)
            if target is None:
                continue  # the standard library and third parties
            where = f"{rel}:{line} imports {module}"
            if PACKAGE_LAYERS[target] > PACKAGE_LAYERS[own]:
                problems.append(f"{where}: layer {PACKAGE_LAYERS[own]} ({own}) reaches up to layer {PACKAGE_LAYERS[target]} ({target})")
            elif PACKAGE_LAYERS[own] == PACKAGE_LAYERS[target] == TRAINING and target != own:
                problems.append(f"{where}: training packages are siblings ({own} -> {target})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{where}: private name(s) {private} used across modules")
    return problems


def test_the_project_keeps_its_layers():
    problems = layer_violations(ROOT)
    assert not problems, "\n".join(problems)


def test_every_project_file_belongs_to_a_layer():
    """A new top-level package or script must be given its layer here, or it goes unchecked."""
    known = set(PACKAGE_LAYERS) | {"tests", "assets", "configs", "build"}
    loose = [p.name for p in ROOT.iterdir() if (p.suffix == ".py" and p.stem not in known)
             or (p.is_dir() and not p.name.startswith(".") and (p / "__init__.py").is_file() and p.name not in known)]
    assert not loose, f"not assigned to a layer in tests/test_layers.py: {loose}"


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("linguadiff/models/bad.py", "import torch\n\ndef f():\n    from datamodules import x\n", "reaches up to layer 2"),
        ("linguadiff/config.py", "from evaluation.runner import run\n", "reaches up to layer 3"),
        ("callbacks/progress.py", "from datamodules.sources import count_samples\n", "training packages are siblings"),
        ("lightning_modules/base.py", "import callbacks.export\n", "training packages are siblings"),
        ("evaluation/runner.py", "from linguadiff.models.losses import _helper\n", "private name(s) ['_helper']"),
        ("linguadiff/run.py", "from bench_stage1 import synthetic_prompts\n", "reaches up to layer 3"),
    ],
)
def test_the_check_fails_on_each_kind_of_violation(tmp_path, path, source, expected):
    for package in ("linguadiff/models", "datamodules", "callbacks", "lightning_modules", "evaluation"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(source, encoding="utf-8")
    problems = layer_violations(tmp_path)
    assert len(problems) == 1 and expected in problems[0] and path in problems[0], problems


def test_the_check_accepts_imports_downward_and_within_a_package(tmp_path):
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "callbacks" / "export.py").write_text(
        "import torch\nfrom callbacks.progress import x\nfrom linguadiff.export import stamped\n", encoding="utf-8")
    (tmp_path / "train.py").write_text("from callbacks import build_callbacks\nfrom datamodules import build_datamodule\n",
                                       encoding="utf-8")
    assert layer_violations(tmp_path) == []
