"""`clipsift embed`: img2dataset shards -> DataComp metadata, embeddings and scores (Ray, resumable)."""
from __future__ import annotations

import argparse
import logging

from clipsift.pipeline.config import EmbedConfig

CONFIG = EmbedConfig
GROUP = "pipeline"
HELP = """Shard mode of the pipeline. Streams the img2dataset shards in `input` through Ray: CPU tasks
decode and preprocess images and tokenise captions; ONE model stage (an actor per GPU, or one CPU
actor) runs every model in `models` and every score head in `heads`. Per input shard it writes
out/metadata/<shard>.parquet (uid, url, text, original_width, original_height, face_bboxes, sha256 +
one float32 column per head) and out/metadata/<shard>.npz (float16 <model>_img / <model>_txt),
then out/done/<shard>.json. Re-running skips finished shards; a killed run resumes to the same
bytes. Every skipped sample is counted by reason in out/stats.json and the printed table.
Ray: a local one with this machine's cores, or the cluster in ray.address / $RAY_ADDRESS.

example: clipsift embed -p world input=runs/world/tiny/pool/shards out=runs/pipeline/tiny
         clipsift embed -p datacomp input=/data/shards out=/data/embed ray.address=auto
"""


def main(cfg: EmbedConfig, args: argparse.Namespace) -> int:
    from clipsift.pipeline.embed import run_embed

    if not logging.getLogger().handlers:  # open_clip logs chatty INFO lines to the root logger
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_embed(cfg)  # bad input raises; clipsift.cli prints it as one line
    return 0
