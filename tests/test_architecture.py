"""The import graph of phitune: layered, without circles (docs/architecture.md).

Every `import` in every module counts, the ones inside functions too: a function-level import still makes the module
depend on the one it imports, it only hides it until the function runs. Layers, bottom up:

    base      errors, terminal, runlock, the package root, lora/
    config    config/
    speed     speed/
    models    models/
    data      data/
    library   tiny/ (the small models, on data's templates), after/ (evaluate, benchmarks, generate, rewards,
              metrics, merge, export, serve, hub, report: what runs from an output directory, and the scoring the
              recipes use)
    lifecycle run/ (plan, output directory, lifecycle, checkpoints, signals, NaN guard, Trainer hooks, console)
    recipes   recipes/ (one module per method; no recipe imports another)
    driver    train
    front     api, cli, __main__, demo, ui (the web page; imports gradio, the ui extra, only in ui.app)

A module may import from its own layer or below; `lora/` imports nothing of phitune but `errors`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import phitune

PACKAGE = Path(phitune.__file__).parent
LAYERS = [
    ("base", ("errors", "terminal", "runlock", "", "lora")),
    ("config", ("config",)),
    ("speed", ("speed",)),
    ("models", ("models",)),
    ("data", ("data",)),
    ("library", ("tiny", "after")),
    ("lifecycle", ("run",)),
    ("recipes", ("recipes",)),
    ("driver", ("train",)),
    ("front", ("api", "cli", "demo", "ui", "__main__")),
]


def module_files() -> dict[str, Path]:
    """phitune module name ("phitune.data.prepare", "phitune" for the root) -> its file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The phitune modules `name` imports anywhere in its file. `from a import b` names the module a.b when b is
    one (the package a only runs its __init__, which is a's own business), else the module a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(submodules or {base})
            if len(submodules) < len(node.names):  # some names are attributes of base itself
                found.add(base)
    return {module for module in found if module in modules and module != name}


def layer_of(name: str) -> int:
    """Index in LAYERS of the module's room: its first part below `phitune`."""
    room = name.split(".")[1] if "." in name else ""
    for index, (_, rooms) in enumerate(LAYERS):
        if room in rooms:
            return index
    raise AssertionError(f"{name} belongs to no layer: add its room to LAYERS in tests/test_architecture.py")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def file_of(name: str) -> str:
    return str(module_files()[name].relative_to(PACKAGE.parent))


def test_every_module_sits_in_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_import_goes_up_a_layer(graph):
    upward = [f"{file_of(name)} ({LAYERS[layer_of(name)][0]}) imports {file_of(dep)} ({LAYERS[layer_of(dep)][0]})"
              for name, deps in graph.items() for dep in sorted(deps) if layer_of(dep) > layer_of(name)]
    assert not upward, "upward imports: " + "; ".join(upward)


def test_no_import_closes_a_circle(graph):
    circles = []
    for name, deps in graph.items():
        for dep in deps:
            if reaches(graph, dep, name):
                circles.append(f"{file_of(name)} imports {file_of(dep)}, which leads back to it")
    assert not circles, "import circles: " + "; ".join(sorted(circles))


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module == goal:
            return True
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return False


def test_lora_depends_on_nothing_of_phitune_but_errors(graph):
    def in_lora(module: str) -> bool:
        return module == "phitune.lora" or module.startswith("phitune.lora.")

    outside = [f"{file_of(name)} imports {file_of(dep)}" for name, deps in graph.items() if in_lora(name)
               for dep in sorted(deps) if not (in_lora(dep) or dep == "phitune.errors")]
    assert not outside, "; ".join(outside)


def test_no_recipe_imports_another(graph):
    crossing = [f"{file_of(name)} imports {file_of(dep)}" for name, deps in graph.items()
                if name.startswith("phitune.recipes.") for dep in sorted(deps) if dep.startswith("phitune.recipes")]
    assert not crossing, "; ".join(crossing)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The reader must not miss what the layer test exists for: an import hidden in a function, a relative one."""
    modules = {"phitune.config.schema": tmp_path / "config.py", "phitune.train": tmp_path / "train.py",
               "phitune.data": tmp_path / "data" / "__init__.py", "phitune.data.prepare": tmp_path / "prepare.py"}
    source = tmp_path / "config.py"
    source.write_text("def check():\n    from phitune.train import run_training\n    from ..data import prepare\n")
    assert imported_modules("phitune.config.schema", source, modules) == {"phitune.train", "phitune.data.prepare"}


def test_every_method_has_a_recipe():
    """config_methods.METHODS (what a config may name) and the driver's RECIPES (what runs it) list the same
    methods."""
    from phitune.config.methods import METHODS
    from phitune.train import RECIPES

    assert set(RECIPES) == set(METHODS)


def test_the_layout_blocks_are_generated_from_the_tree():
    """README's and docs/architecture.md's Layout blocks list the packages and modules as they are (in layer order,
    with each docstring's first sentence): a moved, added or renamed module fails here until scripts/layout.py runs."""
    import importlib.util

    root = PACKAGE.parents[1]
    spec = importlib.util.spec_from_file_location("layout", root / "scripts" / "layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    for path, per_module in layout.TARGETS.items():
        text = path.read_text(encoding="utf-8")
        assert text == layout.with_layout(text, per_module), f"{path.name}'s layout is stale: python scripts/layout.py"


def test_the_repository_holds_no_training_output():
    """No run directory is committed (four stray runs once sat beside README.md, 96 files, optimizer states included):
    the files only a training run writes are nowhere in git's index. Runs from a checkout belong in outputs/ or runs/
    (.gitignore)."""
    import shutil
    import subprocess

    root = PACKAGE.parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    runs = {Path(name).parent.as_posix() for name in tracked
            if Path(name).name in ("phitune_complete", "optimizer.pt", "training_args.bin", "phitune_progress.jsonl")}
    assert not runs, f"training output committed: {sorted(runs)}"
