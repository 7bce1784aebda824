"""The world's two reference CLIPs: stand-ins for the OpenAI B/32 and L/14 that DataComp's pool
metadata scores come from ("web-pretrained": trained on the world's clean curated split).

    ensure_reference_models(world_dir) -> [ReferenceModel(name="b32", ...), ReferenceModel(name="l14", ...)]

trains them with `train` (presets reference_s / reference_l, data = DIR/curated/shards) into
DIR/models/{b32,l14}/ and reuses them on later calls: a finished run whose config matches is
skipped, an interrupted one resumes, one trained with another config is retrained.
CLI: `clipsift train --reference-models DIR [key=value ...]`.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from clipsift import config
from clipsift.runlog import read_json
from clipsift.training import checkpoint
from clipsift.training.config import TrainConfig, config_differences
from clipsift.training.models import WORLD_MODELS

log = logging.getLogger("clipsift.training")

REFERENCE_PRESETS = {"b32": "reference_s", "l14": "reference_l"}


@dataclass(frozen=True)
class ReferenceModel:
    name: str  # b32 | l14: which DataComp score column it stands in for
    arch: str  # open_clip architecture (registered by importing clipsift.training)
    checkpoint: Path  # <run>/checkpoints/epoch_latest.pt


def reference_config(world_dir: str | Path, name: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """The resolved training config of reference model `name` (b32 | l14) for this world."""
    world = Path(world_dir)
    cfg = config.load(TrainConfig, config.preset_path("train", REFERENCE_PRESETS[name]),
                      [f"data.shards={world / 'curated' / 'shards'}", f"out={world / 'models' / name}", *overrides])
    size = _world_image_size(world)
    if size != 32 and not any(o.startswith("model=") for o in overrides):
        sized = f"{cfg.model}{size}"
        if sized not in WORLD_MODELS:
            raise ValueError(f"no {size}-px variant of {cfg.model} (have {', '.join(WORLD_MODELS)}); pass model=...")
        cfg.model = sized
    return cfg


def ensure_reference_models(world_dir: str | Path, overrides: Sequence[str] = (),
                            progress: bool = False) -> list[ReferenceModel]:
    """Train whichever reference model is missing or stale; return both."""
    from clipsift.training.loop import train

    models = []
    for name in REFERENCE_PRESETS:
        cfg = reference_config(world_dir, name, [f"progress={str(progress).lower()}", *overrides])
        run = Path(cfg.out)
        state = _cached_state(run, cfg)
        if state == "done":
            log.info("reference model %s: reusing %s", name, run)
        else:
            if state == "stale":
                log.warning("reference model %s: %s was trained with another config; retraining", name, run)
                shutil.rmtree(run / "checkpoints", ignore_errors=True)
                (run / "stats.json").unlink(missing_ok=True)
            cfg.resume = "latest"  # an interrupted run continues
            train(cfg)
        models.append(ReferenceModel(name, cfg.model, checkpoint.latest_path(run)))
    return models


def _cached_state(run: Path, cfg: TrainConfig) -> str:
    """done | partial | stale | absent."""
    saved_cfg = run / "config.yaml"
    if not saved_cfg.is_file() or not checkpoint.latest_path(run).is_file():
        return "absent"
    saved = yaml.safe_load(saved_cfg.read_text()) or {}
    if config_differences(saved, config.to_dict(cfg)):
        return "stale"
    stats = run / "stats.json"
    return "done" if stats.is_file() and read_json(stats).get("done") else "partial"


def _world_image_size(world: Path) -> int:
    meta = world / "world.yaml"
    if meta.is_file():
        return int((yaml.safe_load(meta.read_text()) or {}).get("image_size", 32))
    return 32
