"""Connecting to Ray and sharing its CPUs between the model stage, the read tasks and the decode tasks.

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
    gpus_per_actor: float  # 0 on CPUs
    model_cpus: float
    model_threads: int
    read_cpus: float
    read_tasks: int  # read tasks at most at once
    decode_cpus: float
    decode_slots: int  # decode tasks that can run at once beside the model actors and the read tasks
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


def stage_plan(rc: RayConfig, device: str, tokenise_only: bool = False) -> StagePlan:
    """plan_stages for the connected Ray cluster."""
    return plan_stages(rc, *cluster(device), tokenise_only)


def plan_stages(rc: RayConfig, cpus: float, gpus: float, use_gpu: bool, tokenise_only: bool = False) -> StagePlan:
    """How many model actors, on what, how many read tasks, and how many decode tasks fit beside
    them, on a cluster with these CPUs and GPUs.

    tokenise_only (image_decode=device): the decode actors only tokenise, ~50 us a caption, so a few
    keep up, and fewer processes importing torch and open_clip at once start the job sooner."""
    for key in ("model_cpus", "read_cpus", "decode_cpus", "read_tasks", "model_actors", "model_threads", "decode_actors",
                "actors_per_gpu"):
        if getattr(rc, key) < 0:
            raise ResourceError(f"ray.{key}={getattr(rc, key)} must be >= 0")
    if rc.decode_cpus == 0:
        raise ResourceError("ray.decode_cpus must be > 0: decoding is CPU work, and Ray would start a task per image chunk at once")
    # decoding on the device leaves the actor's host side (nvJPEG's CPU part, resizing launches) the
    # bound: a second actor per GPU overlaps it with the first one's forward
    per_gpu = rc.actors_per_gpu or (2 if tokenise_only else 1)
    actors = rc.model_actors or (int(gpus) * per_gpu if use_gpu else 1)
    if use_gpu and actors > int(gpus) * per_gpu:
        raise ResourceError(f"ray.model_actors={actors} but the cluster has {gpus:g} GPUs for "
                            f"ray.actors_per_gpu={per_gpu} actor(s) each")
    read_tasks = rc.read_tasks or max(2, math.ceil(cpus / 8))
    # read tasks may hold their CPUs while downstream is backpressured: a decode task must still fit
    left = cpus - actors * rc.model_cpus - read_tasks * rc.read_cpus
    if left < rc.decode_cpus:
        raise ResourceError(
            f"{actors} model actor(s) x ray.model_cpus={rc.model_cpus:g} and {read_tasks} read task(s) x "
            f"ray.read_cpus={rc.read_cpus:g} leave {left:g} of {cpus:g} CPUs, less than one decode task needs "
            f"(ray.decode_cpus={rc.decode_cpus:g}); the job would hang. Lower ray.model_cpus, ray.model_actors, "
            f"ray.read_tasks, ray.read_cpus or ray.decode_cpus.")
    decode_slots = int(left // rc.decode_cpus)
    wanted = rc.decode_actors or (read_tasks if tokenise_only else decode_slots)
    decode_slots = max(1, min(decode_slots, wanted))
    threads = rc.model_threads  # 0: the model actor's node's cores (EncodeStage)
    return StagePlan(use_gpu, actors, 1.0 / per_gpu if use_gpu else 0.0, rc.model_cpus, threads, rc.read_cpus,
                     read_tasks, rc.decode_cpus, decode_slots, cpus, gpus)
