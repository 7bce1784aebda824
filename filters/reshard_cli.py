"""`clipsift reshard`: pool shards + a subset file -> new img2dataset shards of just that subset.

    clipsift reshard shards=WORLD/pool/shards subset=RUN/subset.npy out=RUN/shards

Each subset uid is written once per repeat (keys f"{uid}-{j}"), in input order, into shards of
samples_per_shard (default 10,000) with their _stats.json, plus sample_ids.npy (the subset file,
sorted u8,u8, as DataComp's resharder writes it), written_ids.npy (the uid of every written sample,
in output order), meta.json, stats.json and config.yaml. Unusable images are dropped and counted by
reason (decode_check=quick by default: header and end-of-image marker; draft or full decodes; off
as DataComp). A uid found in several input samples is written for every copy, as DataComp does,
and counted (duplicate_uid_copies).
Parallel over shards (workers=N) and resumable: rerun the same command after an interruption; only
shards this run finished (out/done/ markers) are kept. `out` must be a new or empty folder (or this
run's) outside the input folder. Input shards without a stats file, or unreadable, stop the run
unless on_missing_stats=skip / on_unreadable_shard=skip (skips are listed in meta.json).
"""
from __future__ import annotations

import argparse

from clipsift.filters.reshard import ReshardConfig, reshard

GROUP = "reshard"
HELP = __doc__
CONFIG = ReshardConfig


def main(cfg: ReshardConfig, args: argparse.Namespace) -> int:
    reshard(cfg)  # bad input raises ReshardError; clipsift.cli prints it as one line
    return 0
