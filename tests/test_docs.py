"""The docs: every shell block is either run by the tour's test or marked not runnable with why;
the README's links resolve; the generated CLI reference is what ``--help`` prints."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

from docblocks import ROOT, blocks, doc_files

TESTED = {ROOT / "README.md", ROOT / "docs" / "getting-started.md"}  # tests/test_quickstart.py runs these


def test_every_shell_block_is_run_or_says_why_not():
    unmarked, stray = [], []
    for path in doc_files():
        for block in blocks(path):
            if not block.marked:
                unmarked.append(block.where())
            elif block.runnable and path not in TESTED:
                stray.append(block.where())
            elif not block.runnable and len(block.why.strip()) < 10:
                unmarked.append(f"{block.where()} (a reason, please)")
    assert not unmarked, ("shell blocks with neither <!-- runnable --> nor <!-- not-runnable: why -->: "
                          + ", ".join(unmarked))
    assert not stray, f"marked runnable where no test runs them: {', '.join(stray)}"


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert text.count("\n") <= 250
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def load_hook():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_what_help_prints():
    hook = load_hook()
    page = hook.render()
    paths = [path for path, _ in hook.commands()]
    assert {("run",), ("sink",), ("console",), ("report",)} <= set(paths)
    env = {**os.environ, "COLUMNS": hook.COLUMNS}
    for path in paths:
        printed = subprocess.run([sys.executable, "-m", "linewatch", *path, "--help"], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert printed.returncode == 0, printed.stderr
        assert f"```text\n{printed.stdout.rstrip()}\n```" in page, f"`{' '.join(('linewatch', *path))} --help` differs"
    assert hook.MARKER in (ROOT / "docs" / "cli.md").read_text()
