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


def test_an_installed_wheel_carries_every_config_preset(tmp_path):
    """A non-editable install has no source tree beside it: the presets must travel in the wheel,
    where clipsift.config finds them as clipsift/configs."""
    import shutil
    import subprocess
    import sys
    import zipfile

    had_build = (REPO / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    if not had_build:  # setuptools builds in the source tree; leave it as it was
        shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("clipsift-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
    assert len(presets) > 20
    assert [p for p in presets if f"clipsift/{p}" not in shipped] == []
