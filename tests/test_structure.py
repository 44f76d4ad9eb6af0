"""The shape of the code: a torch-free config, a bad flag refused before the heavy imports, no import cycles.

These run the interpreter in a subprocess (a fresh ``sys.modules``) or read the sources with ``ast``; none imports
torch itself, so the whole file takes a few seconds.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipeline.names import CONDITIONING_MODES, PROJECT_ROOT, SAMPLER_NAMES

HEAVY = ("torch", "diffusers", "datasets", "accelerate")
PACKAGE = PROJECT_ROOT / "pipeline"
MAX_MODULE_LINES = 400


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """``python -c code args`` in the project root, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_config_loads_without_torch() -> None:
    """``import pipeline.config`` and loading a shipped config touch none of torch, diffusers, datasets, accelerate."""
    result = run_python(f"""
        import json, sys
        heavy = {HEAVY!r}
        import pipeline.config
        after_import = [name for name in heavy if name in sys.modules]
        pipeline.config.load_config("configs/cifar10-cpu.yaml")
        after_load = [name for name in heavy if name in sys.modules]
        print(json.dumps([after_import, after_load]))
    """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [[], []]


def test_bad_flag_is_refused_before_torch_is_imported() -> None:
    """train.py's own rule: the arguments are checked before the heavy imports."""
    result = run_python(f"""
        import json, sys
        from pipeline.train import main
        status = main(sys.argv[1:])
        print(json.dumps([status, [name for name in {HEAVY!r} if name in sys.modules]]))
    """, "--bogus.key", "1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [2, []]


def test_bad_flag_on_the_command_line_is_one_error_line_within_two_seconds() -> None:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(PACKAGE / "train.py"), "--bogus.key", "1"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown config section 'bogus'; valid: model, diffusion, data, train, sample, distill"]
    assert result.stderr.startswith(errors[0])  # the error first; then the usage line and where --help is
    assert seconds < 2.0, f"refusing a bad flag took {seconds:.1f} s"


def module_name(path: Path) -> str:
    """pipeline/training/loop.py -> pipeline.training.loop; pipeline/training/__init__.py -> pipeline.training."""
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (``source``) imports anywhere: at the top, in functions,
    under TYPE_CHECKING. ``from package import name`` counts as importing ``package.name`` where that is a module,
    else ``package``; relative imports are resolved against the importing module's package."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            source_module = ".".join(part for part in (base, node.module) if part)
            for alias in node.names:
                submodule = f"{source_module}.{alias.name}"
                found.add(submodule if submodule in modules else source_module)
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    """Every module of pipeline/ -> the modules of pipeline/ it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path.read_text(), module_name(path), path.name == "__init__.py", modules)
            for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_every_kind_of_import() -> None:
    modules = {"pipeline", "pipeline.config", "pipeline.data", "pipeline.errors", "pipeline.models", "pipeline.models.unet",
               "pipeline.names", "pipeline.training", "pipeline.training.loop", "pipeline.training.state"}
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        import torch
        import pipeline.names
        from . import state
        from ..models import unet
        from .. import errors, load_config
        if TYPE_CHECKING:
            from pipeline.config import Config
        def later():
            from pipeline.data import load_image_data
    """)
    assert imported_modules(source, "pipeline.training.loop", False, modules) == {
        "pipeline", "pipeline.config", "pipeline.data", "pipeline.errors", "pipeline.models.unet", "pipeline.names",
        "pipeline.training.state"}
    assert imported_modules("from .loop import train\nfrom . import state", "pipeline.training", True, modules) == {
        "pipeline.training.loop", "pipeline.training.state"}
    assert "pipeline.names" in import_graph()["pipeline.config"]


def test_pipeline_has_no_import_cycle() -> None:
    """Typing-only and function-level imports count: a cycle among them is a tangle of jobs, not only a crash."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_is_over_400_lines() -> None:
    long = {str(path.relative_to(PROJECT_ROOT)): lines for path in sorted(PACKAGE.rglob("*.py"))
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


ARCHITECTURE = PROJECT_ROOT / "docs" / "architecture.md"


def short_name(module: str) -> str:
    """pipeline.training.loop -> training.loop; the package itself stays ``pipeline``."""
    return module.removeprefix("pipeline.")


def test_architecture_doc_orders_every_module_by_its_imports() -> None:
    """docs/architecture.md's "Who imports whom" lists every module once, each importing only from rows above it."""
    section = ARCHITECTURE.read_text().split("## Who imports whom", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    row_of: dict[str, int] = {}
    for number, cell in rows:
        for name in re.findall(r"`([\w.]+)`", cell):
            assert name not in row_of, f"{name} is listed twice"
            row_of[name] = int(number)
    graph = {short_name(module): {short_name(target) for target in targets} for module, targets in import_graph().items()}
    assert set(row_of) == set(graph), f"missing: {sorted(set(graph) - set(row_of))}; not modules: {sorted(set(row_of) - set(graph))}"
    upward = [f"{module} (row {row_of[module]}) imports {target} (row {row_of[target]})"
              for module, targets in graph.items() for target in targets if row_of[target] >= row_of[module]]
    assert not upward, "; ".join(upward)


def defined_names() -> set[str]:
    """Every module, function, class, assignment target and dataclass field in pipeline/, tests/ and bench/, and the
    choices names.py lists (``multiply``, ``dpmsolver++``)."""
    paths = [*PACKAGE.rglob("*.py"), *(PROJECT_ROOT / "tests").glob("*.py"), *(PROJECT_ROOT / "bench").glob("*.py")]
    names = {path.stem for path in paths} | set(CONDITIONING_MODES) | set(SAMPLER_NAMES)
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


# Names the worked examples give that are not this project's code: the examples' own new names, and libraries'.
NOT_OURS = {"concat", "heun", "HeunDiscreteScheduler", "Literal", "ClassLabel"}


def test_architecture_doc_names_what_exists() -> None:
    """The worked examples' files exist, and every code name they give (``SAMPLERS``, ``Evaluator.extracted``,
    ``model.embed_after_norm``: its last part) is defined somewhere in the code, so a rename cannot leave them stale."""
    text = ARCHITECTURE.read_text()
    examples = text.split("## Adding things", 1)[1].split("\n## ", 1)[0]
    for path in re.findall(r"`((?:pipeline|tests|configs)/[\w/.-]+\.(?:py|yaml))`", text):
        if "overlays/concat" not in path:  # the example's own new file
            assert (PROJECT_ROOT / path).exists(), f"docs/architecture.md names {path}, which does not exist"
    defined = defined_names()
    names = [token for token in re.findall(r"`([A-Za-z_][\w.]*)`", examples) if not token.endswith((".py", ".yaml"))]
    missing = [token for token in names if token.split(".")[-1] not in defined | NOT_OURS]
    assert not missing, f"docs/architecture.md's worked examples name what the code does not define: {missing}"
