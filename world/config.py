"""The world's knobs. docs/world.md says why each default is what it is."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NoiseRates:
    """Fraction of pool examples of each kind; the rest are clean. Chosen before any strategy ran."""

    misaligned: float = 0.18      # caption of another image in the crawl
    junk: float = 0.07            # "IMG_0412", "click here", empty
    foreign: float = 0.07         # a true caption in German, French or Spanish
    partial: float = 0.08         # one attribute of the caption wrong (colour, shape or count)
    off_task: float = 0.14        # letters and bare patterns, well captioned, asked about by no task
    near_duplicate: float = 0.08  # re-encoded, shifted copies of a few popular images
    exact_duplicate: float = 0.02  # byte-identical copies with the same caption, new uid and url
    corrupt: float = 0.005        # truncated JPEG, missing caption, malformed json


@dataclass
class SizeNoise:
    """original_width/height in the metadata (what basic_filter reads)."""

    small: float = 0.06           # min side < 200 px for ordinary examples
    small_junk: float = 0.30      # ... for junk and off-task examples (icons, thumbnails)
    extreme_aspect: float = 0.04  # aspect ratio above 3


@dataclass
class WorldConfig:
    out: str = "runs/world/tiny"
    seed: int = 0
    image_size: int = 32
    pool_size: int = 60_000
    samples_per_shard: int = 10_000
    curated_size: int = 20_000
    train_per_class: int = 20       # downstream train split (what learned filters may use)
    test_per_class: int = 50        # downstream test split of the 10-class tasks
    fine_test_per_class: int = 10   # colour_shape has 80 classes
    retrieval_size: int = 500
    task_shard_size: int = 1_000
    duplicate_sources: int = 60     # distinct popular images behind all duplicates
    shape_zipf: float = 1.0         # long tail over shapes: p(k) ∝ 1 / (k+1)^s
    colour_zipf: float = 0.5
    outline_rate: float = 0.10      # pool shapes drawn as outlines (the shift task is all outlines)
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "es"])
    noise: NoiseRates = field(default_factory=NoiseRates)
    sizes: SizeNoise = field(default_factory=SizeNoise)
    workers: int = 2                # processes for pool and curated shards; output is the same for any value

    def __post_init__(self) -> None:
        rates = vars(self.noise)
        bad = {k: v for k, v in rates.items() if not 0 <= v <= 1}
        if bad or sum(rates.values()) > 1:
            raise ValueError(f"noise rates must be in [0, 1] and sum to at most 1, got {rates}")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16")
