"""Configs of the two pipeline commands: `clipsift embed` (shards in) and `clipsift score` (metadata in).

docs/pipeline.md explains every key; configs/pipeline/*.yaml (embed) and configs/pipeline/score/*.yaml
(score) are presets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clipsift.config import Count, Natural, NonNegative, Positive
from clipsift.eval.models import ModelSpec
from clipsift.pipeline.heads import HeadSpec

# Pixels an image may have to be decoded in full: 36 Mpx covers 8K frames and most camera photos,
# ~100x a DataComp image (img2dataset resized those to 512 px a side). Decoding costs time and
# memory in proportion (a 169 Mpx PNG: ~2 s of CPU and ~630 MiB per decode worker); a CLIP model
# sees 224-336 px a side.
MAX_IMAGE_PIXELS = 36_000_000


@dataclass
class RayConfig:
    """Where the pipeline runs and how it shares the machine."""

    address: str = ""  # a Ray cluster ("auto", "ray://host:10001"); "" = $RAY_ADDRESS, else a local Ray
    num_cpus: Natural = 0  # local Ray only: CPUs to use (0 = every core of this machine)
    model_actors: Natural = 0  # model-stage actors (0 = actors_per_gpu per GPU, or one on a CPU-only cluster)
    # model actors sharing each GPU (each gets 1/N of it and its own copy of the models): where the
    # actor's host-side work (nvJPEG's CPU part, Python, launches) bounds a GPU, N actors overlap it.
    # 0 = 2 with image_decode=device (ViT-B-32 on an H100: 2,450 -> 2,951 rows/s end to end), else 1
    actors_per_gpu: Natural = 0
    model_cpus: NonNegative = 1.0  # CPUs each model actor reserves; the rest decode (must leave some)
    # torch threads of a CPU model actor (0 = every core of its node: the model is the CPU job's
    # bound, decoding costs a small share beside it, and the OS shares the cores)
    model_threads: Natural = 0
    read_cpus: NonNegative = 0.0  # CPUs each read task reserves (reading is light; see read_tasks)
    # Reading a tar costs ~5% of decoding its images: one read task keeps ~20 decode tasks busy. The
    # cap also bounds the CPUs Ray Data sets aside for reading (uncapped, about a third of the machine).
    read_tasks: Natural = 0  # read tasks at most at once (0 = one per 8 CPUs, at least 2)
    decode_cpus: Positive = 1.0  # CPUs each decode task reserves; decode tasks fill every CPU the rest leave
    # decode actors (0 = as many as the CPUs left fit; with image_decode=device, where they only
    # tokenise, as many as read tasks)
    decode_actors: Natural = 0


@dataclass
class RunConfig:
    """What both modes share."""

    input: str = ""
    out: str = ""
    heads: dict[str, HeadSpec] = field(default_factory=dict)  # output column -> head, run in this order
    batch_size: Count = 256  # examples per model forward pass, and per decode chunk
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when the cluster has GPUs
    max_shards: Natural = 0  # stop after this many shards/files are written (0 = all); a partial run resumes
    progress: bool = True  # Ray's progress bars
    ray: RayConfig = field(default_factory=RayConfig)


def _world_models() -> dict[str, ModelSpec]:
    return {"b32": ModelSpec("world-rn-s", ""), "l14": ModelSpec("world-rn-l", "")}


def _clip_heads() -> dict[str, HeadSpec]:
    return {"clip_b32_similarity_score": HeadSpec("clip_score", "b32"),
            "clip_l14_similarity_score": HeadSpec("clip_score", "l14")}


@dataclass
class EmbedConfig(RunConfig):
    """Shard mode: img2dataset shards -> per-shard metadata parquet + embeddings npz."""

    input: str = ""  # folder of {:08d}.tar shards with their _stats.json
    out: str = "runs/pipeline/embed"
    # name -> open_clip model; its embeddings are stored as <name>_img / <name>_txt
    models: dict[str, ModelSpec] = field(default_factory=_world_models)
    heads: dict[str, HeadSpec] = field(default_factory=_clip_heads)
    allow_random_weights: bool = False  # a model without `pretrained` is random: refuse unless set (benchmarks)
    seed: int = 0  # torch seed before building each model (reproducible random weights)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # autocast dtype on cuda (cpu always runs fp32)
    # decode JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the model's input (PIL draft):
    # faster on large images, but pixels differ slightly from open_clip's own preprocessing
    jpeg_draft: bool = False
    # where JPEGs are decoded: "cpu" (decode tasks, PIL: exactly open_clip's preprocessing) or
    # "device" (the model stage, nvJPEG on a GPU: for GPU machines whose CPUs cannot keep up;
    # pixels differ from PIL's by rounding)
    image_decode: Literal["cpu", "device"] = "cpu"
    # an image with more pixels (from its header) is skipped as image_too_large, unless it is a JPEG
    # that decodes at 1/2, 1/4 or 1/8 scale within the limit (PIL draft); 0 = no limit but PIL's own
    # (2 x PIL.Image.MAX_IMAGE_PIXELS, ~179 Mpx, also an image_too_large skip)
    max_image_pixels: Natural = MAX_IMAGE_PIXELS
    normalize: bool = True  # store L2-normalised embeddings (scores are cosines either way)
    on_missing_stats: Literal["error", "process"] = "error"  # a shard without _stats.json may be incomplete

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models is empty: configure at least one embedding model")
        for name in self.models:
            if not name.isidentifier():
                raise ValueError(f"model name {name!r} must be an identifier (it names npz arrays {name}_img/_txt)")


@dataclass
class ScoreConfig(RunConfig):
    """Metadata mode: DataComp parquet + npz (no images) -> the same layout with score heads added."""

    input: str = ""  # folder of metadata .parquet files with row-aligned .npz embeddings
    out: str = "runs/pipeline/score"
    heads: dict[str, HeadSpec] = field(default_factory=_clip_heads)
