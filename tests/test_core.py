"""Core: typed configs with clear errors, the CLI, and the DataComp formats every stage shares."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import pytest

from clipsift import config, formats
from clipsift.cli import COMMANDS, main


@dataclass
class Inner:
    lr: float = 1e-3
    layers: list[int] = field(default_factory=lambda: [1, 1])


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    path: Optional[str] = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_plus_overrides_into_typed_dataclass(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\ninner:\n  lr: 0.5\n")
    cfg = config.load(Outer, path, ["inner.layers=[2, 3]", "mode=b", "flag=true", "path=/data"])
    assert cfg == Outer(steps=5, mode="b", flag=True, path="/data", inner=Inner(lr=0.5, layers=[2, 3]))
    config.dump(cfg, tmp_path / "resolved.yaml")
    assert config.load(Outer, tmp_path / "resolved.yaml") == cfg
    assert isinstance(config.load(Outer, None, ["inner.lr=1"]).inner.lr, float)  # ints widen to floats
    assert config.load(Outer, None, ["inner.lr=4e-3"]).inner.lr == 0.004  # YAML 1.1 reads this as a string


@pytest.mark.parametrize("override, message", [
    (["stepz=3"], "unknown key stepz"),
    (["inner.lrr=3"], "unknown key inner.lrr"),
    (["steps=ten"], "steps: expected an integer"),
    (["steps=1.5"], "steps: expected an integer"),
    (["inner.lr=fast"], "inner.lr: expected a number"),
    (["mode=c"], "mode: 'c' is not one of"),
    (["flag=3"], "flag: expected true or false"),
    (["inner.layers=3"], "inner.layers: expected a list"),
    (["inner.layers=[1, x]"], r"inner.layers\[1\]: expected an integer"),
    (["steps"], "not of the form key=value"),
])
def test_bad_keys_and_types_are_errors_naming_the_key(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(Outer, None, override)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(config.ConfigError, match="known presets: .*ci"):
        config.preset_path("world", "nope")


def test_cli_help_lists_every_command_and_bad_config_exits_cleanly(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["world", "--preset", "ci", "pool_sise=10"]) == 2
    assert capsys.readouterr().err.startswith("clipsift world: error: unknown key pool_sise")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and f"clipsift {command}" in capsys.readouterr().out


def test_python_dash_m_equivalent():
    out = subprocess.run([sys.executable, "-m", "clipsift", "--help"], capture_output=True, text=True, check=True)
    assert "world" in out.stdout


def test_uids_round_trip_through_u8u8_and_subset_files(tmp_path):
    rng = np.random.default_rng(0)
    uids = formats.random_uids(rng, 100)
    assert all(formats.is_uid(u) for u in uids) and len(set(uids)) == 100
    assert formats.u8u8_to_uids(formats.uids_to_u8u8(uids)) == uids
    repeated = uids[:10] + uids[:3]
    arr = formats.write_subset(tmp_path / "s.npy", repeated)
    loaded = np.load(tmp_path / "s.npy")  # the way DataComp's resharder reads it
    assert loaded.dtype == np.dtype("u8,u8") and len(loaded) == 13
    assert np.array_equal(loaded, np.sort(loaded, order=["f0", "f1"])) and np.array_equal(loaded, arr)
    assert sorted(formats.u8u8_to_uids(formats.read_subset(tmp_path / "s.npy"))) == sorted(repeated)


def test_foreign_subset_files_are_validated(tmp_path):
    np.save(tmp_path / "wrong_dtype.npy", np.arange(5, dtype=np.uint64))
    with pytest.raises(formats.FormatError, match="dtype"):
        formats.read_subset(tmp_path / "wrong_dtype.npy")
    unsorted = np.array([(2, 0), (1, 5)], dtype="u8,u8")
    np.save(tmp_path / "unsorted.npy", unsorted)
    with pytest.raises(formats.FormatError, match="not sorted .* index 1"):
        formats.read_subset(tmp_path / "unsorted.npy")
    with pytest.raises(formats.FormatError, match="32 lowercase hex"):
        formats.uids_to_u8u8(["XYZ"])


_REALLOCATE = """
import resource, torch
from clipsift.runtime import keep_freed_memory
on = keep_freed_memory()
for _ in range(10):  # the heap settles at its high-water mark
    torch.empty(1 << 24).fill_(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # what training steps do with their big buffers: free, allocate the same size again
    torch.empty(1 << 24).fill_(0)
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_refaulting_reallocated_tensors():
    import os

    def run(flag: str) -> tuple[str, int]:
        env = {**os.environ, "CLIPSIFT_KEEP_FREED_MEMORY": flag}
        out = subprocess.run([sys.executable, "-c", _REALLOCATE], env=env, capture_output=True, text=True, check=True)
        on, faults = out.stdout.split()
        return on, int(faults)

    (on, kept), (off, default) = run("1"), run("0")
    assert (on, off) == ("True", "False")
    pages = (1 << 24) * 4 // 4096  # one 64 MiB allocation
    assert default > 5 * pages  # glibc unmaps the block on free and faults it in again each time
    assert kept < pages // 10  # reused from the heap: its pages stay mapped
