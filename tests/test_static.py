"""Static check of every module: an undefined name (a lost import after a refactor) fails here in
seconds instead of deep inside a slow end-to-end run."""
from __future__ import annotations

from pathlib import Path

from pyflakes import api, reporter

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["clipsift", "world", "pipeline", "filters", "training", "eval", "compare", "benchmarks", "tests"]
FATAL = ("undefined name", "undefined local", "referenced before assignment", "syntax", "invalid syntax")


class _Collect(reporter.Reporter):
    def __init__(self):
        self.problems: list[str] = []

    def unexpectedError(self, filename, msg):
        self.problems.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.problems.append(f"{filename}:{lineno}: syntax error: {msg}")

    def flake(self, message):
        text = str(message)
        if any(f in text for f in FATAL):
            self.problems.append(text)


def test_no_undefined_names_anywhere():
    collect = _Collect()
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 50
    for path in files:
        api.checkPath(str(path), collect)
    assert not collect.problems, "\n".join(collect.problems)
