"""Connecting to Ray and sharing its CPUs between the model stage and the read tasks.

Laptop: a local Ray with this machine's cores (or ray.num_cpus). Cluster: the cluster named by
ray.address or $RAY_ADDRESS; clipsift must be installed on every node. A Ray session the caller
already started (tests, notebooks) is used as is and left running.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from clipsift.pipeline.config import RayConfig


class ResourceError(RuntimeError):
    """A resource plan that would hang or cannot run (e.g. actors reserving every CPU)."""


@dataclass
class StagePlan:
    use_gpu: bool
    model_actors: int
    model_cpus: float
    model_threads: int
    read_cpus: float
    read_slots: int  # read tasks that can run beside the model actors
    cluster_cpus: float
    cluster_gpus: float


@contextmanager
def ray_session(rc: RayConfig, progress: bool = True) -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        address = rc.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=rc.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def cluster(device: str) -> tuple[float, float, bool]:
    """(CPUs, GPUs, whether to use GPUs) of the connected Ray cluster, for device auto|cpu|cuda."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    if device == "cuda" and gpus < 1:
        raise ResourceError("device=cuda but the Ray cluster has no GPU")
    return cpus, gpus, device != "cpu" and gpus >= 1


def stage_plan(rc: RayConfig, device: str) -> StagePlan:
    """How many model actors, on what, and how many read tasks fit beside them."""
    cpus, gpus, use_gpu = cluster(device)
    actors = rc.model_actors or (int(gpus) if use_gpu else 1)
    if use_gpu and actors > gpus:
        raise ResourceError(f"ray.model_actors={actors} but the cluster has {gpus:g} GPUs (one actor per GPU)")
    left = cpus - actors * rc.model_cpus
    if left < rc.read_cpus:
        raise ResourceError(
            f"{actors} model actor(s) x ray.model_cpus={rc.model_cpus:g} leave {left:g} of {cpus:g} CPUs, less than "
            f"one read task needs (ray.read_cpus={rc.read_cpus:g}); the job would hang. Lower ray.model_cpus, "
            f"ray.model_actors or ray.read_cpus.")
    threads = rc.model_threads or max(1, math.ceil(rc.model_cpus))
    return StagePlan(use_gpu, actors, rc.model_cpus, threads, rc.read_cpus, int(left // rc.read_cpus), cpus, gpus)
