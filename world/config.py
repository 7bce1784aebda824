"""The world's knobs. docs/world.md says why each default is what it is."""
from __future__ import annotations

from dataclasses import dataclass, field

from clipsift.config import Count, Fraction, NonNegative, check


@dataclass
class NoiseRates:
    """Fraction of pool examples of each kind; the rest are clean. Chosen before any strategy ran."""

    misaligned: Fraction = 0.18   # caption of another image in the crawl
    junk: Fraction = 0.07         # "IMG_0412", "click here", empty
    foreign: Fraction = 0.07      # a true caption in German, French or Spanish
    partial: Fraction = 0.08      # one attribute of the caption wrong (colour, shape or count)
    off_task: Fraction = 0.14     # letters and bare patterns, well captioned, asked about by no task
    near_duplicate: Fraction = 0.08  # re-encoded, shifted copies of a few popular images
    exact_duplicate: Fraction = 0.02  # byte-identical copies with the same caption, new uid and url
    corrupt: Fraction = 0.005     # truncated JPEG, missing caption, malformed json


@dataclass
class SizeNoise:
    """original_width/height in the metadata (what basic_filter reads)."""

    small: Fraction = 0.06        # min side < 200 px for ordinary examples
    small_junk: Fraction = 0.30   # ... for junk and off-task examples (icons, thumbnails)
    extreme_aspect: Fraction = 0.04  # aspect ratio above 3


@dataclass
class WorldConfig:
    out: str = "runs/world/tiny"
    seed: int = 0
    image_size: int = 32
    pool_size: Count = 60_000
    samples_per_shard: Count = 10_000
    curated_size: Count = 20_000
    train_per_class: Count = 20   # downstream train split (what learned filters may use)
    test_per_class: Count = 50    # downstream test split of the 10-class tasks
    fine_test_per_class: Count = 10  # colour_shape has 80 classes
    retrieval_size: Count = 500
    task_shard_size: Count = 1_000
    duplicate_sources: Count = 60  # distinct popular images behind all duplicates
    shape_zipf: NonNegative = 1.0  # long tail over shapes: p(k) ∝ 1 / (k+1)^s
    colour_zipf: NonNegative = 0.5
    outline_rate: Fraction = 0.10  # pool shapes drawn as outlines (the shift task is all outlines)
    languages: list[str] = field(default_factory=lambda: ["de", "fr", "es"])
    noise: NoiseRates = field(default_factory=NoiseRates)
    sizes: SizeNoise = field(default_factory=SizeNoise)
    workers: Count = 2            # processes for pool and curated shards; output is the same for any value

    def __post_init__(self) -> None:
        check(self)  # each rate in [0, 1] and sizes in range by their types, for configs built in Python too
        rates = vars(self.noise)
        if sum(rates.values()) > 1:
            raise ValueError(f"noise rates must sum to at most 1, got {rates}")
        if self.image_size < 16:
            raise ValueError("image_size must be at least 16")
