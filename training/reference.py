"""The world's two reference CLIPs: stand-ins for the OpenAI B/32 and L/14 that DataComp's pool
metadata scores come from ("web-pretrained": trained on the world's clean curated split).

    ensure_reference_models(world_dir) -> [ReferenceModel(name="b32", ...), ReferenceModel(name="l14", ...)]

trains them with `train` (presets reference_s / reference_l, data = DIR/curated/shards) into
DIR/models/{b32,l14}/ and reuses them on later calls: a finished run whose config matches is
skipped, an interrupted one resumes, one trained with another config is retrained.
CLI: `clipsift train --reference-models DIR [key=value ...]`.

    ensure_dfn_model(world_dir) -> ReferenceModel(name="dfn", ...)

the world's DFN-style filtering network (Fang et al.'s DFN: a CLIP trained on high-quality pairs
only, whose CLIP score filters the pool): the b32 reference fine-tuned on a high-quality set,
by default the world's curated split (preset reference_dfn: a quarter of reference_s's samples
at a quarter of its peak lr), into DIR/models/dfn. On this world the reference CLIPs already saw
only the curated split, so the DFN-style model differs from b32 by the extra high-quality budget,
not by its data; give data.shards=<another high-quality set> to change that. On real data a
released DFN checkpoint (e.g. hf-hub:apple/DFN2B-CLIP-ViT-B-16) is simply another pipeline model.
CLI: `clipsift train --dfn-model DIR [key=value ...]` (after --reference-models).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from clipsift import config
from clipsift.eval.models import file_sha256
from clipsift.runlog import read_json, write_json
from clipsift.training import checkpoint
from clipsift.training.config import TrainConfig, config_differences
from clipsift.training.models import WORLD_MODELS

log = logging.getLogger("clipsift.training")

REFERENCE_PRESETS = {"b32": "reference_s", "l14": "reference_l"}
DFN_PRESET = "reference_dfn"
DFN_INIT = "init.json"  # in the dfn run folder: the b32 checkpoint it was fine-tuned from (sha256)


@dataclass(frozen=True)
class ReferenceModel:
    name: str  # b32 | l14: which DataComp score column it stands in for
    arch: str  # open_clip architecture (registered by importing clipsift.training)
    checkpoint: Path  # <run>/checkpoints/epoch_latest.pt


def reference_config(world_dir: str | Path, name: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """The resolved training config of reference model `name` (b32 | l14 | dfn) for this world."""
    world = Path(world_dir).resolve()  # one world, one config: relative and absolute paths name the same run
    preset = DFN_PRESET if name == "dfn" else REFERENCE_PRESETS[name]
    init = [f"init={checkpoint.latest_path(world / 'models' / 'b32')}"] if name == "dfn" else []
    cfg = config.load(TrainConfig, config.preset_path("train", preset),
                      [f"data.shards={world / 'curated' / 'shards'}", f"out={world / 'models' / name}", *init,
                       *overrides])
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
    return [_ensure(world_dir, name, overrides, progress) for name in REFERENCE_PRESETS]


def ensure_dfn_model(world_dir: str | Path, overrides: Sequence[str] = (), progress: bool = False) -> ReferenceModel:
    """Fine-tune (or reuse) the DFN-style model from the trained b32 reference; retrained when b32 changed."""
    b32 = checkpoint.latest_path(Path(world_dir) / "models" / "b32")
    if not b32.is_file():
        raise FileNotFoundError(f"{b32} is missing: the DFN-style model is fine-tuned from the b32 reference; "
                                f"train it first with `clipsift train --reference-models {world_dir}`")
    return _ensure(world_dir, "dfn", overrides, progress)


def _ensure(world_dir: str | Path, name: str, overrides: Sequence[str], progress: bool) -> ReferenceModel:
    from clipsift.training.loop import train

    cfg = reference_config(world_dir, name, [f"progress={str(progress).lower()}", *overrides])
    run = Path(cfg.out)
    init = {"init": cfg.init, "sha256": file_sha256(Path(cfg.init))} if cfg.init else None
    state = _cached_state(run, cfg)
    if state != "absent" and init and (not (run / DFN_INIT).is_file() or read_json(run / DFN_INIT) != init):
        state = "stale"  # fine-tuned from other weights (b32 retrained since)
    if state == "done":
        log.info("reference model %s: reusing %s", name, run)
    else:
        if state == "stale":
            log.warning("reference model %s: %s was trained with another config or init; retraining", name, run)
            shutil.rmtree(run / "checkpoints", ignore_errors=True)
            (run / "stats.json").unlink(missing_ok=True)
        if init:
            run.mkdir(parents=True, exist_ok=True)
            write_json(run / DFN_INIT, init)
        cfg.resume = "latest"  # an interrupted run continues
        train(cfg)
    return ReferenceModel(name, cfg.model, checkpoint.latest_path(run))


def logit_scale(model_checkpoint: str | Path) -> float:
    """A trained CLIP's learned logit scale exp(t) = 1/τ (the teacher temperature negCLIPLoss needs)."""
    state = checkpoint.load(Path(model_checkpoint))
    return float(state["state_dict"]["logit_scale"].exp())


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
