"""The house rules of DESIGN section 2, checked on the code itself: imports only run downhill
(launch -> cluster -> training -> shards), `ray` only in cluster/, test machinery out of the product, and
module names that do not collide."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"shards": 0, "training": 1, "cluster": 2, "launch": 3}


def _modules() -> list[Path]:
    return sorted(path for package in LEVELS for path in (REPO_ROOT / package).rglob("*.py"))


def _imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file (or `source` placed at `path`), inside functions too,
    relative ones resolved against the file's package."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = list(path.relative_to(REPO_ROOT).parts[:-1])  # the package the module (or __init__) belongs to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def test_imports_only_run_downhill() -> None:
    uphill = []
    for path in _modules():
        level = LEVELS[path.relative_to(REPO_ROOT).parts[0]]
        for line, module in _imported(path):
            target = LEVELS.get(module.split(".")[0])
            if target is not None and target > level:
                uphill.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module}")
    assert not uphill, "imports that run uphill:\n" + "\n".join(uphill)


def test_the_walker_sees_every_kind_of_import() -> None:
    """The rule above can fail: an uphill import in a function body or a relative form is found."""
    body = "def f():\n    from training.model import fusion\n    import cluster.cli\n"
    assert [module for _, module in _imported(REPO_ROOT / "shards" / "probe.py", body)] == [
        "training.model",
        "cluster.cli",
    ]
    relative = _imported(REPO_ROOT / "training" / "evaluation" / "probe.py", "from ..model import weights\n")
    assert [module for _, module in relative] == ["training.model"]


def test_only_cluster_imports_ray() -> None:
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line}"
        for path in _modules()
        if path.relative_to(REPO_ROOT).parts[0] in ("shards", "training")
        for line, module in _imported(path)
        if module.split(".")[0] == "ray"
    ]
    assert not offenders, f"ray imported outside cluster/ and launch/: {offenders}"


def test_no_fault_injection_in_the_product() -> None:
    """Recovery tests kill workers from outside (by the pid in metrics.jsonl); no product code kills itself."""
    hits = [
        str(path.relative_to(REPO_ROOT))
        for path in _modules()
        if path.stem == "faults"
        or "os.kill(os.getpid()" in path.read_text()
        or any(module.split(".")[-1] == "faults" for _, module in _imported(path))
    ]
    assert not hits, f"fault hooks in the product: {hits}"


def test_no_two_modules_share_a_basename_across_packages() -> None:
    """A shared name must be the same concept in each place: a package's `config.py` (its config section), a
    plug-in package's `base.py`, or one retrieval method's module across model/, objectives/ and methods/."""
    per_method = {path.name for path in (REPO_ROOT / "training" / "evaluation" / "methods").glob("*.py")}
    allowed = {"__init__.py", "config.py", "base.py"} | per_method
    places = defaultdict(list)
    for path in _modules():
        if path.name not in allowed:
            places[path.name].append(str(path.relative_to(REPO_ROOT)))
    shared = {name: paths for name, paths in places.items() if len(paths) > 1}
    assert not shared, shared


def test_entry_scripts_stay_thin() -> None:
    long = [path.name for path in (REPO_ROOT / "launch").glob("*.py") if len(path.read_text().splitlines()) > 110]
    assert not long, f"entry scripts over ~100 lines: {long}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (at the top or inside functions). `from package import name`
    points at the submodule `package.name` when there is one, else at the package."""
    known = {_module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets |= {f"{source}.{alias.name}" for alias in node.names} | {source}
        graph[module] = {target for target in targets if target in known and target != module}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_circles() -> None:
    circles = _circles(_import_graph(_modules()))
    assert not circles, "modules that import each other (directly or round a loop):\n" + "\n".join(
        " <-> ".join(circle) for circle in circles
    )


def test_the_circle_finder_finds_a_loop() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


MAX_MODULES_PER_FOLDER = 12


def test_no_package_folder_holds_more_than_twelve_modules() -> None:
    """DESIGN section 2: a folder of more than ~12 modules is several concepts; group them in sub-packages.
    launch/ is the flat list of user commands (`python launch/<name>.py`) and is not a package."""
    crowded = {}
    for package in ("cluster", "training", "shards"):
        for folder in [REPO_ROOT / package, *(path for path in (REPO_ROOT / package).rglob("*") if path.is_dir())]:
            modules = [path.name for path in folder.glob("*.py") if path.name != "__init__.py"]
            if len(modules) > MAX_MODULES_PER_FOLDER:
                crowded[str(folder.relative_to(REPO_ROOT))] = len(modules)
    assert not crowded, f"folders over {MAX_MODULES_PER_FOLDER} modules: {crowded}"


def test_the_runtime_of_cluster_imports_no_job() -> None:
    """cluster/runtime/ (how Ray is reached) is below the jobs, benchmarks and server that run on it."""
    graph = _import_graph(_modules())
    above = ("cluster.jobs", "cluster.bench", "cluster.serving")
    uphill = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith("cluster.runtime")
        for target in targets
        if target.startswith(above)
    )
    assert not uphill, uphill
