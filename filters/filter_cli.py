"""`clipsift filter`: a filter config over pool metadata -> a DataComp subset file.

Writes into `out`: subset.npy (sorted u8,u8 uids), stats.json (kept / dropped by reason for the
whole filter and for each filter on its own, what pool-level filters learned, timings),
config.yaml (the resolved config), scores.parquet (uid + scores computed by filters such as
normsim, when any) and work/ (resumable state of pool-level filters such as semdedup).

    clipsift filter -p basic metadata=WORLD/pool/metadata out=runs/basic
    clipsift filter -p image_based_world_clip_l14_30 metadata=M out=O downstream.embeddings=train.npy
    clipsift filter -p text_based metadata=M out=O
    clipsift filter -p text_based_world metadata=M out=O downstream.concepts=WORLD
    clipsift filter filter.kind=clip_score filter.args.column=b32 filter.args.threshold=0.3 ...

Filter kinds: no_filter, english, basic, clip_score, laion2b, text_based, text_based_world,
image_based (DataComp's files), image_based_world, normsim, semdedup, negclip, linear_classifier
(the last two are M-FLYT inputs: docs/flyt.md); `all` / `any` groups combine them (filter.of: [...]). Language id:
each filter's DataComp identifier (fastText lid.176, cld3 for laion2b; docs/datacomp.md);
lang.fasttext_model=lid.176.bin for DataComp's full model, lang.backend=py3langid to force one.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsift import config, formats
from clipsift.config import Count
from clipsift.filters.base import Context, FilterSpec, build, run_filters
from clipsift.filters.baselines import load_concepts
from clipsift.filters.lang import LangConfig, Languages
from clipsift.filters.pool import MetadataPool
from clipsift.runlog import Timer, atomic_path, write_json

GROUP = "filters"
HELP = __doc__


@dataclass
class DownstreamConfig:
    embeddings: str = ""  # .npy of downstream training-image embeddings (image_based_world, normsim)
    concepts: str = ""  # class names for text_based_world: a file (one per line) or a world folder


@dataclass
class FilterRunConfig:
    metadata: str = ""  # folder of DataComp metadata parquets (+ row-aligned .npz embeddings)
    out: str = ""  # output folder
    filter: FilterSpec = field(default_factory=FilterSpec)
    lang: LangConfig = field(default_factory=LangConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    seed: int = 0
    batch_size: Count = 65536


CONFIG = FilterRunConfig


def run(cfg: FilterRunConfig, log=print) -> dict:
    """Run the filter; returns the stats written to out/stats.json."""
    if not cfg.metadata or not cfg.out:
        raise config.ConfigError("set metadata=<metadata folder> and out=<output folder>")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, out / "config.yaml")
    timer = Timer()
    with timer("setup"):
        ctx = Context(lang=Languages(cfg.lang), downstream_embeddings=cfg.downstream.embeddings,
                      concepts=load_concepts(cfg.downstream.concepts) if cfg.downstream.concepts else [],
                      work_dir=out / "work", seed=cfg.seed, batch_size=cfg.batch_size, log=log)
        tree = build(cfg.filter, ctx)
        pool = MetadataPool(cfg.metadata)
    result = run_filters(tree, pool, cfg.batch_size)
    with timer("write"):
        formats.write_subset(out / "subset.npy", result.uids)
        if result.scores:
            uids = np.concatenate([b.column("uid") for b in pool.batches({"uid"}, set(), cfg.batch_size)])
            table = pa.table({"uid": uids, **{f"{name}_score": pa.array(s, formats.SCORE_TYPE)
                                              for name, s in result.scores.items()}})
            with atomic_path(out / "scores.parquet") as tmp:
                pq.write_table(table, tmp)
    stats = result.stats()
    stats["seconds"].update(timer.as_dict())
    stats["language_id"] = dict(ctx.lang.used)  # identifiers actually used
    stats["pool"] = {"metadata": str(cfg.metadata), "rows": pool.num_rows}
    write_json(out / "stats.json", stats)
    c = result.counts
    log(f"kept {c.kept} of {c.seen} rows -> {out / 'subset.npy'}")
    for reason, n in sorted(c.dropped.items(), key=lambda kv: -kv[1]):
        log(f"  dropped {n:>10}  {reason}")
    return stats


def main(cfg: FilterRunConfig, args: argparse.Namespace) -> int:
    run(cfg)  # bad input raises; clipsift.cli prints it as one line
    return 0
