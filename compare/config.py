"""The `clipsift compare` config: a world (or data), a training scale, and a list of strategies.

A strategy is a composition of scores, filters and a sampler:
    filter:  a filter tree (filters/base.py FilterSpec) over the pool metadata -> kept rows
    sample:  a sampler over one score column, among the kept rows (or the whole pool)
At least one of the two is given. The scale fixes the training compute; a strategy only changes
the data.

A strategy that samples by a learned score (SEEDED_SCORES) trains its scorer once per seed: the
run with training seed s uses the scorer trained with seed s (or scorer_seeds[i] for seeds[i]),
so its seed-to-seed spread holds both the scorer's and the training run's variance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from clipsift.config import Count
from clipsift.filters.base import FilterSpec
from clipsift.filters.sample_cli import SampleConfig

# Score columns a compare run learns itself, by the learned run that writes them; each is trained
# once per scorer seed (an M-FLYT run mixes the FLYT score of its own scorer seed).
SEEDED_SCORES = {"flyt_score": "flyt", "mflyt_score": "mflyt"}


def filter_columns(spec: FilterSpec) -> set[str]:
    """Every string argument of a filter tree (lists of strings included): the score columns it
    reads are among them."""
    mine = {v for v in spec.args.values() if isinstance(v, str)}
    mine |= {x for v in spec.args.values() if isinstance(v, list) for x in v if isinstance(x, str)}
    return mine.union(*(filter_columns(child) for child in spec.of))


@dataclass
class StrategySpec:
    name: str = ""
    filter: Optional[FilterSpec] = None
    sample: Optional[SampleConfig] = None  # `metadata` and `out` are filled in by compare
    seeds: Optional[list[int]] = None  # this strategy's training seeds (default: the run's seeds)
    # learned score only: the scorer seed of each training seed, in order (default: the training seed
    # itself); e.g. [0, 0] holds the scorer fixed to measure the training seed's spread alone
    scorer_seeds: Optional[list[int]] = None

    @property
    def learned(self) -> bool:
        """Does this strategy sample by a score the compare run learns (one scorer per seed)?"""
        return self.sample is not None and self.sample.score in SEEDED_SCORES


@dataclass
class LearnedSpec:
    """The learned scorers, trained once per compare run (only when a strategy uses their score)."""

    flyt_preset: str = "ci"  # configs/flyt/<preset>.yaml
    flyt_overrides: list[str] = field(default_factory=list)
    mflyt_preset: str = "ci"  # configs/mflyt/<preset>.yaml
    mflyt_overrides: list[str] = field(default_factory=list)
    # score columns M-FLYT mixes (flyt_score is joined from the FLYT run of the same scorer seed). Also
    # computed on demand: negclip_score, clip_dfn_similarity_score, linear_classifier_score (docs/flyt.md)
    mflyt_columns: list[str] = field(default_factory=lambda: [
        "clip_b32_similarity_score",
        "clip_l14_similarity_score",
        "normsim_score",
        "flyt_score",
    ])


@dataclass
class CompareConfig:
    out: str = "runs/compare/tiny"
    world: str = "tiny"  # a world preset name (generated into out/world when missing) or a world folder
    scale: str = "tiny"  # configs/train/<scale>.yaml: the fixed training compute
    scale_overrides: list[str] = field(default_factory=list)  # e.g. ["samples_seen=51200"]
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds; mean ± std over them
    strategies: list[StrategySpec] = field(default_factory=list)
    learned: LearnedSpec = field(default_factory=LearnedSpec)
    reference_overrides: list[str] = field(default_factory=list)  # for the world's reference CLIPs
    # for the DFN-style model (configs/train/reference_dfn.yaml), trained only when clip_dfn_similarity_score is used
    dfn_overrides: list[str] = field(default_factory=list)
    downstream_model: Literal["b32", "l14"] = "l14"  # embeds the task train images (image_based, NormSim)
    only: list[str] = field(default_factory=list)  # run just these strategies (default: all)
    # Training runs at once, each in its own process (a learned scorer seed's scorers and runs in one).
    # Pays on a GPU, where a compare-scale step leaves it mostly idle; on a CPU the runs share its cores.
    workers: Count = 1
    progress: bool = True

    def __post_init__(self) -> None:
        names = [s.name for s in self.strategies]
        if any(not n or not n.replace("_", "").replace("-", "").isalnum() for n in names):
            raise ValueError(f"every strategy needs a name of letters, digits, '_' or '-'; got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"strategy names repeat: {names}")
        for s in self.strategies:
            if s.filter is None and s.sample is None:
                raise ValueError(f"strategy {s.name}: give a filter, a sample, or both")
            seeded = sorted(filter_columns(s.filter) & set(SEEDED_SCORES)) if s.filter else []
            if seeded:
                raise ValueError(f"strategy {s.name}: a filter cannot use {seeded} (learned once per scorer seed); "
                                 "sample by it instead (sample: {score: ...})")
            if s.scorer_seeds is not None:
                if not s.learned:
                    raise ValueError(f"strategy {s.name}: scorer_seeds applies only to a sample by a learned score "
                                     f"({', '.join(SEEDED_SCORES)}); remove it")
                if len(s.scorer_seeds) != len(s.seeds or self.seeds):
                    raise ValueError(f"strategy {s.name}: scorer_seeds {s.scorer_seeds} needs one entry per training "
                                     f"seed {s.seeds or self.seeds}")
        unknown = set(self.only) - set(names)
        if unknown:
            raise ValueError(f"only names unknown strategies {sorted(unknown)}; known: {names}")
        if not self.seeds:
            raise ValueError("seeds is empty")
        for key in ("flyt_overrides", "mflyt_overrides"):
            given = {o.split("=", 1)[0].strip() for o in getattr(self.learned, key)}
            if "seed" in given:
                raise ValueError(f"learned.{key}: compare sets the scorer seed per run; remove seed= and give the "
                                 "strategy scorer_seeds instead")
            if given & {"mixer.columns", "mixer.extra_metadata"}:  # compare would replace them
                raise ValueError(f"learned.{key}: compare sets the mixer's inputs; remove mixer.columns= / "
                                 "mixer.extra_metadata= and give learned.mflyt_columns instead")
