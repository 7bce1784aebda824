"""`clipsift compare`: strategies × (subset → fixed-compute training → zero-shot eval) → report."""
from __future__ import annotations

import argparse
import logging

from clipsift.compare.config import CompareConfig

CONFIG = CompareConfig
GROUP = "compare"
HELP = """Compare filtering strategies at a fixed training scale and report which data makes the
better CLIP. A config names a world (preset or folder), a scale (configs/train/<scale>.yaml) and
strategies, each a filter tree and/or a sampler over a score column (CLIP scores from the
pipeline, normsim_score, flyt_score, mflyt_score). Shared work (world, reference CLIPs, pipeline
embeddings, learned scorers) is computed once and cached in `out`; a killed compare resumes.
A strategy sampling by a learned score retrains its scorer per seed (scorer seed = training seed,
or the strategy's scorer_seeds), so its spread covers the scorer too. SCS draws the scale's
samples seen (sample.total=0), in rounds scaled to the pool as FLYT's 100k to 128M.
--seeds via seeds=[0,1,2]. Writes out/report/ (results.md/.csv/.json, plots, report.md).
Example: clipsift compare -p tiny   |   clipsift compare -p ci out=runs/compare/ci only=[basic]"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (overrides the config's seeds)")


def main(cfg: CompareConfig, args) -> int:
    from clipsift.compare.run import Compare

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "seeds", None):
        cfg.seeds = args.seeds
    Compare(cfg).run()
    report = f"{cfg.out}/report"
    print(open(f"{report}/results.md").read())
    print(f"report: {report}/report.md")
    return 0
