"""`clipsift train`: fixed-compute CLIP training on shards (+ a DataComp subset)."""
from __future__ import annotations

import argparse
import json
import logging

from clipsift.training.config import TrainConfig

CONFIG = TrainConfig
GROUP = "train"
HELP = """Train a CLIP with fixed compute (samples seen, batch, lr, schedule and model fixed by the
preset) on img2dataset webdataset shards, optionally restricted to a DataComp subset file (.npy of
u8,u8 uids; a uid listed k times is seen k times as often). Writes <out>/checkpoints/epoch_latest.pt
(open_clip format), config.yaml, stats.json (samples seen, skips by reason, timings) and train.log.
Presets: ci, tiny, gpu (the synthetic worlds), small, medium (DataComp's scales), reference_s,
reference_l (the world's reference CLIPs). Multi-GPU / multi-process: torchrun --nproc_per_node N
-m clipsift train ...

Examples:
  clipsift train -p tiny data.shards=runs/world/tiny/pool data.subset=subset.npy out=runs/train/x
  clipsift train -p tiny ... out=runs/train/x --resume latest     (continue a killed run)
  clipsift train --reference-models runs/world/tiny               (the world's two reference CLIPs)
  clipsift train --dfn-model runs/world/tiny                      (its DFN-style model, from b32)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", metavar="latest|PATH", help="continue from a checkpoint (same as resume=...)")
    parser.add_argument("--reference-models", metavar="WORLD_DIR",
                        help="train (or reuse) the world's reference CLIPs into WORLD_DIR/models/{b32,l14}; "
                             "key=value overrides apply to both")
    parser.add_argument("--dfn-model", metavar="WORLD_DIR",
                        help="fine-tune (or reuse) the world's DFN-style model from its b32 reference into "
                             "WORLD_DIR/models/dfn (preset reference_dfn; key=value overrides apply to it)")


def main(cfg: TrainConfig, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.reference_models:
        from clipsift.training.reference import ensure_reference_models

        models = ensure_reference_models(args.reference_models, overrides=args.overrides, progress=cfg.progress)
        print(json.dumps({m.name: describe(m) for m in models}, indent=1))
        return 0
    if args.dfn_model:
        from clipsift.training.reference import ensure_dfn_model

        m = ensure_dfn_model(args.dfn_model, overrides=args.overrides, progress=cfg.progress)
        print(json.dumps({m.name: describe(m)}, indent=1))
        return 0
    if args.resume:
        cfg.resume = args.resume
    from clipsift.training.loop import train

    run = train(cfg)
    print(f"run written to {run}")
    return 0


def describe(m) -> dict:
    """A reference model for the user: where it is, and its learned logit scale (negclip's logit_scale)."""
    from clipsift.training.reference import logit_scale

    return {"arch": m.arch, "checkpoint": str(m.checkpoint), "logit_scale": round(logit_scale(m.checkpoint), 4)}
