"""open_clip-format checkpoints that also carry everything an exact resume needs.

<run>/checkpoints/epoch_latest.pt is a dict with open_clip's keys ("state_dict", "optimizer",
"epoch", "name") plus "step", "samples_seen", "config", "rng", "data_state", "log" and
"train_seconds". Everything in it loads with torch.load(weights_only=True), so
`open_clip.create_model_and_transforms(arch, pretrained=path)` reads it as it is.

Beside it, for processes that never import clipsift (clip_benchmark, DataComp's evaluate.py) and so
do not know the world's architecture names: open_clip_config.json ({"model_cfg": the architecture's
open_clip config}) and open_clip_pytorch_model.bin, a relative link to epoch_latest.pt (the weights
file name open_clip looks for first), so `open_clip.create_model_and_transforms("local-dir:<run>/checkpoints")`
builds the architecture and loads the latest weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clipsift.runlog import atomic_path, atomic_write_text

LATEST = "epoch_latest.pt"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"  # first in open_clip's list of weight file names


def latest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / LATEST


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a killed job leaves the previous checkpoint intact, never half a file.
    An open_clip model checkpoint (its "state_dict" and architecture "name") also gets open_clip's
    local-dir files beside it."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    if "state_dict" in payload and "name" in payload:
        write_open_clip_dir(path, payload["name"])


def write_open_clip_dir(path: Path, arch: str) -> None:
    """open_clip_config.json and the weights link beside checkpoint `path` (see the module doc)."""
    import open_clip

    from clipsift.training.models import register_model_configs

    register_model_configs()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"{arch!r} is not an open_clip architecture; cannot describe {path} for open_clip")
    atomic_write_text(path.parent / OPEN_CLIP_CONFIG, json.dumps({"model_cfg": model_cfg}, indent=2, sort_keys=True) + "\n")
    with atomic_path(path.parent / OPEN_CLIP_WEIGHTS) as tmp:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path.name)  # relative, so the run folder can move


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not a clipsift training checkpoint, or whose weights do
    not fit the architecture asked for."""


# What a resume needs from a checkpoint (save() writes them all).
RESUME_KEYS = ("state_dict", "optimizer", "step", "config", "rng", "data_state", "log", "train_seconds")


def load(path: Path, resume: bool = False) -> dict[str, Any]:
    """A checkpoint's contents, or a CheckpointError naming the file (torch says "PytorchStreamReader
    failed ...", "KeyError: 101" or "Weights only load failed" for a truncated or foreign file).
    With `resume`, also checks that it holds what a resume needs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise  # the path is the problem, and the error names it
    except Exception as e:  # every way torch fails to parse a file (a short one: OSError EINVAL)
        raise CheckpointError(f"{path}: not a readable torch checkpoint, truncated or another kind of file "
                              f"({_first_line(e)}); copy it again, or delete it to start over") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in RESUME_KEYS if k not in state] if resume else []
    if missing:
        raise CheckpointError(f"{path}: not a clipsift training checkpoint (no {', '.join(missing)}); resume "
                              "from the epoch_latest.pt of a `clipsift train` run")
    return state


def explain_load_failure(path: str | Path, arch: str, error: Exception) -> CheckpointError:
    """Why open_clip could not load checkpoint `path` into `arch`: the file is unreadable (load's
    error), or its weights belong to another architecture ("pos_embed width changed!", size mismatches)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            return CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)}); copy it again")
        trained_as = ""
    else:
        try:
            trained_as = load(path).get("name", "")
        except CheckpointError as e:
            return e
    hint = f"it was trained as {trained_as!r}" if isinstance(trained_as, str) and trained_as else \
        "pass the architecture it was trained with"
    return CheckpointError(f"{path}: its weights do not fit architecture {arch!r} ({_first_line(error)}); {hint}")


def _first_line(e: BaseException) -> str:
    """The exception's first sentence: torch's load errors go on for a paragraph."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text.split('. ')[0][:160]}".rstrip(": ")


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
