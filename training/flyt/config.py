"""Configs of `clipsift flyt` (learned scorer on CLIP embeddings) and `clipsift mflyt` (score mixer).

Both train a scorer q_φ with the same FLYT loop; they differ only in the scorer and its inputs.
Defaults are the paper's (flyt.md) where they make sense at any scale; presets scale batch sizes
and steps to the world (configs/flyt/*.yaml, configs/mflyt/*.yaml).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from clipsift.config import Count, Fraction, Natural, NonNegative, Positive


@dataclass
class ReferenceConfig:
    """The reference CLIP f_θ, trained online by the loop (initialised from a pretrained CLIP)."""

    arch: str = "world-rn-s"  # open_clip architecture
    pretrained: str = ""  # checkpoint file or training run folder; "" = <world>/models/b32
    lr: Positive = 5e-5
    wd: NonNegative = 0.2  # on >= 2-D weights only
    # The log logit scale (ln τ) is clamped to [min, max] after each update, as FLYT does.
    logit_scale_min: float = 2.0
    logit_scale_max: float = math.log(100)
    # Batches that fill AdamW's moments (θ unchanged) before the first scorer step. 0 = the paper's
    # fresh optimiser; short runs need a few (hypergrad.warm_moments says why).
    moment_warmup: Natural = 0


@dataclass
class DownstreamConfig:
    tasks: str = ""  # task list (tasks.yaml); "" = <world>/tasks.yaml
    names: list[str] = field(default_factory=list)  # tasks to use (default: every task in the list)
    # Task groups FLYT does not learn from. The paper's downstream data are the training splits of
    # tasks that have one; DataComp's distribution shifts (ImageNet-V2/-Sketch/-R/-A, ObjectNet) are
    # test sets only, so its objective never sees them. The world gives its shift task a train split
    # (other filters may use its images); in FLYT's loss that task, on which the reference is
    # confidently wrong, carries all of the one-step objective's reward for junk pairs
    # (docs/results/flyt-diagnosis.md, section 6). [] keeps every task.
    left_out_groups: list[str] = field(default_factory=lambda: ["distribution shift"])
    split: str = "train"  # the split FLYT learns from (never the evaluation split)
    batch_size: Count = 3072  # examples per task and step (global; fewer if the split is smaller)
    rho_init: float = math.log(1 / 0.07)  # ρ: log temperature of the zero-shot heads (learned)
    # ce: the paper's main loss, zero-shot cross-entropy on the classification tasks (retrieval tasks
    # left out, counted in stats). clip: the paper's CLIP-loss variant, every task's image-text pairs
    # (a classification image with its class's prompt) in one contrastive loss at scale exp(ρ); the
    # default because it is the paper's form that lets the world's retrieval task (a quarter of the
    # average) shape the scorer. mixed: this repo's earlier loss (classification CE averaged with each
    # retrieval task's CLIP loss at the reference's own τ), kept to reproduce older runs.
    # clip_per_task: each task's own CLIP loss at exp(ρ), averaged over tasks (no task's prompts are
    # another's negatives: the world's tasks share class names and templates); an ablation, it did
    # not help on the tiny world (docs/results/flyt-ablations.md).
    loss: Literal["ce", "clip", "clip_per_task", "mixed"] = "clip"
    # reference: ρ takes AdamW steps with the reference model's settings (its lr schedule, betas, eps,
    # no decay), as the paper's code, where ρ is a reference parameter. scorer: in the scorer's AdamW
    # (this repo's earlier choice, kept to reproduce older runs).
    rho_optimizer: Literal["reference", "scorer"] = "reference"


@dataclass
class LoopConfig:
    out: str = "runs/flyt"  # run directory: checkpoints/, scorer.pt, scores/, config.yaml, stats.json
    world: str = ""  # a world folder: fills pool, metadata, downstream.tasks and reference.pretrained
    pool: str = ""  # pool shards folder; "" = <world>/pool/shards
    metadata: str = ""  # required: the pipeline's OUT/metadata for this pool (parquet + npz embeddings/scores)
    seed: int = 0  # scorer init, batch order, templates
    steps: Count = 5000
    batch_size: Count = 4096  # global upstream batch (the softmax of the scores is over all of it)
    warmup: Natural = 100  # linear warmup, then cosine to 0 (both learning rates)
    beta1: Fraction = 0.9
    beta2: Fraction = 0.98
    eps: Positive = 1e-6
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    score_pool: bool = True  # after training, score every row of `metadata` into <out>/scores/
    # Execution: these do not change what is learned (up to floating point).
    device: str = "auto"  # auto: cuda when available, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu
    # how the hypergradient's JVP of the embeddings is taken (training/flyt/hypergrad.py): backward
    # differentiates the upstream backward, forward runs forward-mode AD; the same values.
    # auto: forward for a ViT reference on cuda, else backward (the faster, measured: benchmarks/flyt.py)
    jvp: Literal["auto", "backward", "forward"] = "auto"
    threads: Count | None = None  # torch CPU threads per process (None: cores / local processes)
    workers: Natural = 0  # DataLoader processes decoding the pool shards at start-up
    decode_cache: str = ""  # a folder keeping the pool decoded (training DataConfig.decode_cache)
    checkpoint_every: Count = 100
    resume: str | None = None  # "latest" or a checkpoint path
    stop_after_steps: Natural | None = None  # stop (with a checkpoint) after this many steps
    log_every: Count = 10
    progress: bool = True
    # with world=: at the start and each checkpoint, log the AUC of the scores of clean pairs against
    # each planted noise kind (the world's ground truth), a learning curve of what the scorer learns
    noise_auc: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps must be >= 1 and batch_size >= 2")


@dataclass
class ScorerConfig:
    """FLYT's GLU head on Ψ = [image emb; text emb] of a frozen CLIP."""

    embeddings: str = "b32"  # the pipeline model whose <name>_img / <name>_txt arrays are Ψ
    hidden: Natural = 0  # 0 = the input dimension (the paper's choice)
    depth: Count = 1  # GLU blocks
    # random: PyTorch's default init; uniform: output layer zeroed, so every example starts with the same
    # score (uniform weights, nothing ranked by chance); clip_score: start as init_scale * cosine(img, txt)
    init: Literal["random", "uniform", "clip_score"] = "random"
    init_scale: Positive = 10.0  # clip_score init: keep init_scale x (spread of the pool's cosines) a few units,
    # or the softmax over a batch starts on a handful of examples
    lr: Positive = 1e-3
    wd: NonNegative = 0.2  # on >= 2-D weights only


@dataclass
class FlytConfig(LoopConfig):
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    column: str = "flyt_score"  # name of the output score column


@dataclass
class MixerConfig:
    """M-FLYT's linear mixer over score columns (standardised with the pool's mean and std)."""

    columns: list[str] = field(default_factory=lambda: ["clip_b32_similarity_score", "clip_l14_similarity_score"])
    # More folders of per-uid score parquets joined to `metadata` by uid (e.g. a FLYT run's scores/).
    extra_metadata: list[str] = field(default_factory=list)
    # The paper's 1e-3 over 5000 steps. AdamW moves a weight ~lr a step, so a shorter run keeps the
    # paper's reach (lr x steps = 5) with lr = 5 / steps: the presets do (configs/mflyt/*.yaml)
    lr: Positive = 1e-3
    # random: PyTorch's default nn.Linear init, as the paper. zero: every example starts with the same
    # score (nothing ranked by chance), for runs too short to move away from a random start. equal
    # (an ablation): the mean of the standardised inputs, the untrained ensemble
    # (benchmarks/mflyt_vs_mean.py; docs/results/flyt-ablations.md)
    init: Literal["random", "zero", "equal"] = "random"
    wd: NonNegative = 0.2  # on the weights, not the bias: the paper trains the mixer with its scorer AdamW
    # standardised: each input score to mean 0, std 1 (the paper). whitened (an ablation): then
    # decorrelated (ZCA), so AdamW, which moves every weight about lr a step, moves each independent
    # direction of the inputs alike instead of their common one k times over.
    inputs: Literal["standardised", "whitened"] = "standardised"


@dataclass
class MFlytConfig(LoopConfig):
    mixer: MixerConfig = field(default_factory=MixerConfig)
    column: str = "mflyt_score"


# Keys that may differ between a run and its resumption (they do not change the result).
RESUME_FREE_KEYS = frozenset({"out", "resume", "stop_after_steps", "checkpoint_every", "log_every", "progress",
                              "threads", "device", "workers", "decode_cache", "score_pool", "noise_auc", "jvp"})
# Keys added with a default that changes what is learned, and the value a run saved before the key
# existed ran with: such a run is not one at the current default (compare refuses to reuse it).
EARLIER_DEFAULTS = {"downstream.left_out_groups": []}
