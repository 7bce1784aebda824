"""The `clipsift train` config. A scale preset (configs/train/*.yaml) fixes the compute; a
filtering strategy only changes `data` (which shards, which subset)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from clipsift.config import Count, Fraction, Natural, NonNegative, Positive, to_dict
from clipsift.pipeline.config import MAX_IMAGE_PIXELS


@dataclass
class DataConfig:
    # A folder of {:08d}.tar shards in img2dataset layout (a pool, a resharded subset, curated
    # shards), or a folder holding shards/ (e.g. WORLD/pool).
    shards: str = ""
    # Optional DataComp subset .npy (u8,u8 uids, sorted). Only listed uids are used; a uid listed
    # k times is seen k times as often. None: every readable sample once per pass.
    subset: str | None = None
    # memory: decode every selected sample once into a uint8 tensor (fast, exact resume; for the
    # small worlds). stream: decode in DataLoader workers while training (large data).
    # auto: memory when the decoded samples fit in memory_limit_gb.
    mode: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: NonNegative = 4.0
    workers: Natural = 2  # DataLoader decode processes (0: decode in the training process)
    shuffle_buffer: Count = 4096  # stream mode: samples mixed across shards in each worker
    # memory mode: a folder that keeps each shard decoded (<stem>-<px>px.npz), so runs over the
    # same shards with other subsets skip decoding (compare sets it; "" = decode every run)
    decode_cache: str = ""
    # stream mode: where images are decoded. cpu: in the workers (PIL/libjpeg). device: workers
    # only read and tokenise; the training process decodes each batch's JPEGs in one batched
    # call on its device (nvJPEG on a GPU) and resizes/crops there. auto: cpu (measured faster on
    # an H100 with 16 cores; docs/results/performance.md).
    image_decode: Literal["auto", "cpu", "device"] = "auto"
    # an image with more pixels (from its header, before decoding) is skipped as image_too_large,
    # unless a JPEG fits at a draft reduction (1/2, 1/4, 1/8): it is decoded reduced. The pipeline's
    # max_image_pixels and default (36 Mpx); 0 = no limit but PIL's own (~179 Mpx)
    max_image_pixels: Natural = MAX_IMAGE_PIXELS


@dataclass
class TrainConfig:
    out: str = "runs/train"  # run directory: checkpoints/, config.yaml, stats.json, train.log
    model: str = "world-rn-s"  # open_clip architecture (world-rn-s/-l/-s64/-l64 or e.g. ViT-B-32)
    seed: int = 0  # model init and data order
    data: DataConfig = field(default_factory=DataConfig)
    # Fixed compute: these define a scale and must not change between strategies.
    samples_seen: Count = 25_600  # steps = samples_seen // batch_size
    batch_size: Count = 128  # global batch (split evenly over DDP ranks)
    lr: Positive = 2e-3
    warmup: Natural = 20  # linear warmup steps, then cosine decay to 0
    beta1: Fraction = 0.9
    beta2: Fraction = 0.98
    eps: Positive = 1e-6
    wd: NonNegative = 0.2  # on >=2-D weights only
    grad_clip_norm: Positive | None = None
    # Execution: these do not change what is learned (up to floating point).
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    threads: Count | None = None  # torch CPU threads per process (None: cores / local processes; 1 on a busy machine)
    # ResNet towers' batch norm. global: statistics over the global batch by one explicit formula
    # for 1 or N processes (GlobalBatchNorm2d: N ranks match one process; ~25% slower on CPU).
    # local: torch's BatchNorm2d, per-rank statistics under DDP (open_clip without --use-bn-sync).
    # auto: global under DDP, torch's fused kernel in one process.
    batch_norm: Literal["auto", "global", "local"] = "auto"
    # torch.compile the model on cuda (ignored on a CPU, with a log line): off; default (fused
    # kernels); reduce-overhead (fused kernels replayed as CUDA graphs: small models' steps are
    # bound by kernel launches). The first steps compile (tens of seconds).
    compile: Literal["off", "default", "reduce-overhead"] = "off"
    checkpoint_every: Count = 100  # steps between atomic checkpoints (and always at the end)
    resume: str | None = None  # "latest" (<out>/checkpoints/epoch_latest.pt) or a checkpoint path
    # weights to start from (a checkpoint or a run folder of the same architecture): fine-tuning;
    # the optimiser, schedule and data order start fresh. "" = random init from `seed`
    init: str = ""
    stop_after_steps: Natural | None = None  # stop (with a checkpoint) after this many steps: a planned interruption
    log_every: Count = 10
    progress: bool = True  # tqdm bar on stderr


# Keys that may differ between a run and its resumption (they do not change the result).
RESUME_FREE_KEYS = frozenset(
    {"out", "resume", "stop_after_steps", "checkpoint_every", "log_every", "progress", "threads", "device",
     "data.workers", "data.memory_limit_gb", "data.image_decode", "compile"}
)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (dotted) whose values differ and that would change what is learned. A key one side
    lacks (a config saved before the key existed) counts as its default, so adding an option does
    not make every earlier run stale."""
    default = flat_config(to_dict(TrainConfig()))
    a, b = flat_config(saved), flat_config(current)
    return sorted(k for k in set(a) | set(b)
                  if k not in RESUME_FREE_KEYS and a.get(k, default.get(k)) != b.get(k, default.get(k)))


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
