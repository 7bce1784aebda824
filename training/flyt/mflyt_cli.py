"""`clipsift mflyt`: M-FLYT, a linear mix of existing score columns trained with the FLYT loop."""
from __future__ import annotations

from clipsift.training.flyt.cli import main  # noqa: F401  (one main for both commands)
from clipsift.training.flyt.config import MFlytConfig

CONFIG = MFlytConfig
GROUP = "mflyt"
HELP = """Train M-FLYT: s = Σ_k a_k z_k + b over score columns z (mixer.columns, standardised with the pool's
mean and std, saved in the scorer), with exactly FLYT's loop and hypergradient. Columns come from
metadata=DIR (the pipeline's OUT/metadata) and mixer.extra_metadata folders joined by uid (e.g. a
FLYT run's scores/ folder for flyt_score). Prints and writes the learned weights
(out/mixer_weights.json), then scores the pool into out/scores/<stem>.parquet (uid, mflyt_score).

example: clipsift mflyt -p ci world=runs/world/ci metadata=runs/pipeline/ci/metadata \\
             'mixer.extra_metadata=[runs/flyt/ci/scores]' 'mixer.columns=[clip_b32_similarity_score,flyt_score]'
"""
