"""`clipsift subset`: inspect, validate and convert DataComp subset files.

    clipsift subset action=info input=subset.npy                 counts, repeats, validity
    clipsift subset action=to_text input=subset.npy output=uids.txt
    clipsift subset action=from_text input=uids.txt output=subset.npy

A subset is a .npy of dtype u8,u8 (f0 = first 16 hex digits of the uid, f1 = last 16), sorted; a
repeated uid means "use this sample that many times". Reading a file from another tool checks
dtype, shape and order and says how to fix a file that breaks them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipsift import config, formats
from clipsift.runlog import atomic_write_text

GROUP = "subset"
HELP = __doc__


@dataclass
class SubsetConfig:
    action: Literal["info", "to_text", "from_text"] = "info"
    input: str = ""
    output: str = ""


CONFIG = SubsetConfig


def info(arr: np.ndarray) -> dict[str, Any]:
    """Rows, distinct uids and repeat counts of a (validated) subset array."""
    if len(arr) == 0:
        return {"rows": 0, "unique_uids": 0, "max_repeats": 0, "repeated_uids": 0}
    same = (arr["f0"][1:] == arr["f0"][:-1]) & (arr["f1"][1:] == arr["f1"][:-1])
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    repeats = np.diff(np.append(starts, len(arr)))
    return {"rows": int(len(arr)), "unique_uids": int(len(starts)), "max_repeats": int(repeats.max()),
            "repeated_uids": int((repeats > 1).sum())}


def to_text(src: str | Path, dst: str | Path) -> int:
    uids = formats.u8u8_to_uids(formats.read_subset(src))
    atomic_write_text(dst, "".join(f"{u}\n" for u in uids))
    return len(uids)


def from_text(src: str | Path, dst: str | Path) -> int:
    return len(formats.write_subset(dst, formats.read_uid_text(src)))


def main(cfg: SubsetConfig, args: argparse.Namespace) -> int:
    if not cfg.input:
        raise config.ConfigError("set input=<file>")
    if cfg.action != "info" and not cfg.output:
        raise config.ConfigError(f"action={cfg.action} needs output=<file>")
    if cfg.action == "info":  # bad input raises; clipsift.cli prints it as one line
        print(info(formats.read_subset(cfg.input)))
    elif cfg.action == "to_text":
        print(f"wrote {to_text(cfg.input, cfg.output)} uids to {cfg.output}")
    else:
        print(f"wrote {from_text(cfg.input, cfg.output)} uids to {cfg.output}")
    return 0
