"""open_clip-format checkpoints that also carry everything an exact resume needs.

<run>/checkpoints/epoch_latest.pt is a dict with open_clip's keys ("state_dict", "optimizer",
"epoch", "name") plus "step", "samples_seen", "config", "rng", "data_state", "log" and
"train_seconds". Everything in it loads with torch.load(weights_only=True), so
`open_clip.create_model_and_transforms(arch, pretrained=path)` reads it as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipsift.runlog import atomic_path

LATEST = "epoch_latest.pt"


def latest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / LATEST


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a killed job leaves the previous checkpoint intact, never half a file."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Temporary files of saves that a kill interrupted (atomic_path names them .<name>.<pid>.tmp)."""
    for tmp in (Path(run_dir) / "checkpoints").glob(f".{LATEST}.*.tmp"):
        tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`latest` -> this run's epoch_latest.pt when it exists (None: start fresh); a path -> that file."""
    if resume is None:
        return None
    if resume == "latest":
        path = latest_path(run_dir)
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}")
    return path
