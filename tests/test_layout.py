"""The folders are the map: imports run one way (cli on top; bus and scoring at the bottom),
no module imports itself in a circle, and ``linewatch --help`` never loads torch."""

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
