"""`clipsift flyt` and `clipsift mflyt`: train a FLYT scorer / M-FLYT mixer, then score the pool.

The two commands share the training loop (train.py) and this `main`; each has its own config
class, so `flyt` is this module and `mflyt` is mflyt_cli.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

from clipsift.config import ConfigError
from clipsift.training.flyt.config import FlytConfig, MFlytConfig

CONFIG = FlytConfig
GROUP = "flyt"
HELP = """Train FLYT's learned data scorer, then score the pool (flyt_score).

A GLU head q_φ on Ψ = [image emb; text emb] of a frozen CLIP (the pipeline's <scorer.embeddings>_img/_txt
arrays in metadata=DIR) is trained so that one AdamW step of a reference CLIP on the pool batch,
weighted by softmax(q_φ(Ψ)), lowers the zero-shot loss on the downstream tasks' training splits
(first-order bilevel, hypergradient with torch.func). world=DIR fills pool=DIR/pool/shards,
downstream.tasks=DIR/tasks.yaml and reference.pretrained=DIR/models/b32.

Writes out/scorer.pt (a pipeline score head: kind clipsift.training.flyt.heads:ScorerHead,
checkpoint=out), out/scores/<stem>.parquet (uid, flyt_score), out/stats.json (losses over time,
timings, counts), out/config.yaml and out/checkpoints/latest.pt (resume=latest continues a run).

example: clipsift flyt -p ci world=runs/world/ci metadata=runs/pipeline/ci/metadata out=runs/flyt/ci
"""


def main(cfg, args: argparse.Namespace) -> int:
    from clipsift.training.flyt.train import run

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("clipsift").setLevel(logging.INFO)
    command = "mflyt" if isinstance(cfg, MFlytConfig) else "flyt"
    try:
        out = run(cfg)
    except ValueError as e:  # FLYT's checks of its inputs: a user error, printed by clipsift.cli
        raise ConfigError(str(e)) from e
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    stats = json.loads((out / "stats.json").read_text())
    final = stats.get("final") or {}
    print(f"{command}: {stats['steps']}/{stats['steps_total']} steps, {stats['seconds_per_step']} s/step, "
          f"final up_loss {final.get('up_loss')} down_loss {final.get('down_loss')}")
    if "mixer_weights" in stats:
        print("mixer weights (standardised inputs):")
        for name, weight in stats["mixer_weights"].items():
            print(f"  {name:<40} {weight:+.4f}")
    if "scored" in stats:
        print(f"scores: {stats['scored']['folder']} ({stats['scored']['rows']} rows, column {stats['scored']['column']})")
    print(f"run: {out}")
    return 0
