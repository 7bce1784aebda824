"""The `clipsift compare` config: a world (or data), a training scale, and a list of strategies.

A strategy is a composition of scores, filters and a sampler:
    filter:  a filter tree (filters/base.py FilterSpec) over the pool metadata -> kept rows
    sample:  a sampler over one score column, among the kept rows (or the whole pool)
At least one of the two is given. The scale fixes the training compute; a strategy only changes
the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from clipsift.filters.base import FilterSpec
from clipsift.filters.sample_cli import SampleConfig


@dataclass
class StrategySpec:
    name: str = ""
    filter: Optional[FilterSpec] = None
    sample: Optional[SampleConfig] = None  # `metadata` and `out` are filled in by compare
    seeds: Optional[list[int]] = None  # this strategy's training seeds (default: the run's seeds)


@dataclass
class LearnedSpec:
    """The learned scorers, trained once per compare run (only when a strategy uses their score)."""

    flyt_preset: str = "ci"  # configs/flyt/<preset>.yaml
    flyt_overrides: list[str] = field(default_factory=list)
    mflyt_preset: str = "ci"  # configs/mflyt/<preset>.yaml
    mflyt_overrides: list[str] = field(default_factory=list)
    # score columns M-FLYT mixes (flyt_score is joined from the FLYT run when listed)
    mflyt_columns: list[str] = field(default_factory=lambda: ["clip_b32_similarity_score", "clip_l14_similarity_score",
                                                               "normsim_score", "flyt_score"])


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
    downstream_model: Literal["b32", "l14"] = "l14"  # embeds the task train images (image_based, NormSim)
    only: list[str] = field(default_factory=list)  # run just these strategies (default: all)
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
        unknown = set(self.only) - set(names)
        if unknown:
            raise ValueError(f"only names unknown strategies {sorted(unknown)}; known: {names}")
        if not self.seeds:
            raise ValueError("seeds is empty")
