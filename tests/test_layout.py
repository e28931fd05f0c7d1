"""The folders are the map: imports run one way (cli on top; bus and scoring at the bottom),
no module imports itself in a circle, and ``linewatch --help`` never loads torch. Inside
scoring, a folder per method (``scoring/methods/<name>/``): no method imports another, and
``scoring/components/`` holds only parts that two or more methods use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Higher imports lower, never the reverse; folders of one rank do not import each other.
RANKS = {"cli": 5, "bench": 4, "console": 4, "pipeline": 3, "offline": 3, "ingest": 2, "workers": 2, "sinks": 2, "bus": 1,
         "ops": 1, "scoring": 1, "testing": 2,
         "synthetic": 3}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["linewatch", *parts[1 if parts[0] == "linewatch" else 0:]])


def folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "linewatch" else None


def sources(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for folder in [*RANKS, "linewatch"]:
        for path in sorted((root / folder).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The linewatch modules ``module`` imports, anywhere in the file (lazy imports count)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.startswith("linewatch")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("linewatch"):
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m != module}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = sources(root)
    known = set(found)
    return {m: {t for t in imports(m, p, known) if t in known} for m, p in found.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        here = folder_of(source)
        for target in targets:
            there = folder_of(target)
            if source == "linewatch.__main__" or there is None or here == there:
                continue  # the package root (its version) is anyone's; __main__ is the command
            if here is None or RANKS[there] >= RANKS[here]:
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


METHODS_PACKAGE = "linewatch.scoring.methods"
COMPONENTS = "linewatch.scoring.components"


def method_folders(root: Path = ROOT) -> set[str]:
    """The method folders: the packages in ``scoring/methods/`` (``base.py`` is a module, not one)."""
    methods = root / "scoring" / "methods"
    return {path.parent.name for path in methods.glob("*/__init__.py")}


def method_of(module: str, folders: set[str]) -> str | None:
    """The method folder ``module`` belongs to (``aaclip`` for ``...methods.aaclip.model``), or None."""
    parts = module.split(".")
    inside = parts[:3] == METHODS_PACKAGE.split(".") and len(parts) > 3 and parts[3] in folders
    return parts[3] if inside else None


def is_component(module: str) -> bool:
    return module == COMPONENTS or module.startswith(COMPONENTS + ".")


def cross_method_imports(edges: dict[str, set[str]], folders: set[str]) -> list[str]:
    """Imports from one method folder into another's, or from ``scoring/components/`` into any:
    what methods share goes to the components (or ``methods/base.py``), never method to method."""
    bad = []
    for source, targets in edges.items():
        here = method_of(source, folders)
        if here is None and not is_component(source):
            continue
        bad += [f"{source} -> {target}" for target in targets if method_of(target, folders) not in (None, here)]
    return sorted(bad)


def lone_components(edges: dict[str, set[str]], folders: set[str]) -> list[str]:
    """Modules of ``scoring/components/`` that fewer than two method folders import (a part with
    one user lives in that method's folder)."""
    users: dict[str, set[str]] = {m: set() for m in edges if is_component(m) and m != COMPONENTS}
    for source, targets in edges.items():
        here = method_of(source, folders)
        for target in targets & users.keys() if here else ():
            users[target].add(here)
    return sorted(f"{m} (used by {', '.join(sorted(u)) or 'no method'})" for m, u in users.items() if len(u) < 2)


def test_imports_run_one_way():
    assert upward(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """A deliberate upward import and a deliberate circle are found (so the tests above can fail)."""
    for folder, text in {"bus": "from ..workers import worker\n", "workers": "from . import worker\n",
                         "workers/worker.py": "from . import other\n", "workers/other.py": "from . import worker\n",
                         "scoring": ""}.items():
        target = tmp_path / (folder if folder.endswith(".py") else f"{folder}/__init__.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    edges = graph(tmp_path)
    assert upward(edges) == ["linewatch.bus -> linewatch.workers.worker"]
    assert cycles(edges) == [["linewatch.workers.other", "linewatch.workers.worker"]]


def test_no_method_imports_another():
    assert cross_method_imports(graph(), method_folders()) == []


def test_components_have_two_or_more_method_users():
    folders = method_folders()
    assert len(folders) >= 7, sorted(folders)
    assert lone_components(graph(), folders) == []


def test_the_method_checks_catch_what_they_look_for(tmp_path):
    """A method importing another, a component importing a method and a component with one
    user are found (so the two tests above can fail)."""
    files = {"scoring/__init__.py": "", "scoring/methods/__init__.py": "from . import one, two\n",
             "scoring/methods/base.py": "", "scoring/methods/one/__init__.py": "from .method import x\n",
             "scoring/methods/one/method.py": "from ..base import y\nfrom ...components.shared import z\n"
                                              "from ...components.lone import w\nfrom ..two.model import v\n",
             "scoring/methods/two/__init__.py": "",
             "scoring/methods/two/model.py": "from ...components import shared\n",
             "scoring/components/__init__.py": "", "scoring/components/shared.py": "",
             "scoring/components/lone.py": "from ..methods.two import model\n"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges, folders = graph(tmp_path), method_folders(tmp_path)
    assert folders == {"one", "two"}
    assert cross_method_imports(edges, folders) == [
        "linewatch.scoring.components.lone -> linewatch.scoring.methods.two.model",
        "linewatch.scoring.methods.one.method -> linewatch.scoring.methods.two.model"]
    assert lone_components(edges, folders) == ["linewatch.scoring.components.lone (used by one)"]


def test_each_bundled_method_has_its_folder_and_its_page():
    """``scoring/methods/<name without hyphens>/`` holds the method (``scoring.preset`` finds its
    presets there), and the documentation page ``docs/methods/<name>.md`` is its README."""
    from linewatch.scoring.methods import METHODS

    folders = method_folders()
    for name, cls in METHODS.items():
        folder = name.replace("-", "")
        assert cls.__module__ == f"{METHODS_PACKAGE}.{folder}.method", (name, cls.__module__)
        readme = ROOT / "scoring" / "methods" / folder / "README.md"
        assert readme.is_file(), readme
        assert (ROOT / "docs" / "methods" / f"{name}.md").resolve() == readme.resolve(), name
    assert folders == {name.replace("-", "") for name in METHODS}


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from linewatch.cli import build_parser\n"
            "parser = build_parser()\n"
            "for argv in [['--help'], *[[name, '--help'] for name in "
            "['eval', 'train', 'methods', 'run', 'ingest', 'worker', 'sink', 'replay', 'demo', 'bench', 'console', 'report']]]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        parser.parse_args(argv)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'cv2', 'kafka', 'numpy'))\n"
            "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout[:500]


def test_every_subpackage_is_installed_and_copied_into_the_image():
    """A new top-level folder must reach pyproject's package-dir and the Dockerfile's COPY lines."""
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    assert folders == {*RANKS, "linewatch"}
    copied = set(re.findall(r"^COPY (\S+) \./\1$", (ROOT / "deploy/Dockerfile").read_text(), re.M))
    assert folders <= copied, sorted(folders - copied)


def test_every_package_and_method_data_reach_the_wheel():
    """``packages`` is an explicit list: every folder with an ``__init__.py`` must be on it, and a
    method folder's presets in its package data (else a wheel ships a method without them)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {module_name(path) for folder in RANKS for path in (ROOT / folder).rglob("__init__.py")}
    assert found - {"linewatch"} <= listed, sorted(found - listed)
    for folder in sorted(method_folders()):
        if (ROOT / "scoring" / "methods" / folder / "presets").is_dir():
            assert "presets/*.json" in setuptools["package-data"].get(f"{METHODS_PACKAGE}.{folder}", []), folder
