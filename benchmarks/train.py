"""Training throughput on the world's shards versus the data-free ceiling, in one run.

The ceiling is the same model, optimiser and step (training.loop.Stepper) fed one batch of uint8
images and tokens that already sit on the device: nothing can feed the model faster. Against it:
`train()` on the shards, in memory mode (decode everything once, then gather) and stream mode
(decode in DataLoader workers while training); `--modes loader` adds stream mode's data alone
(workers decoding, batches copied to the device, no model: can the CPUs feed the step at all?).
Runs are interleaved (ceiling, memory, stream, ceiling, ...) so a machine shared with other jobs
slows them alike; figures are medians over repeats. Two ratios per mode:

    steady  samples/s inside the training loop / ceiling samples/s      (does data stall the step?)
    end_to_end  samples / (data loading + training) / ceiling            (decode cost included)

    .venv/bin/python benchmarks/train.py --world runs/world/tiny [--steps 150] [--repeats 3]

Writes benchmarks/results/train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clipsift import config  # noqa: E402
from clipsift.runlog import read_json, write_json  # noqa: E402
from clipsift.training import TrainConfig, train  # noqa: E402
from clipsift.training.data import tokenizer  # noqa: E402
from clipsift.training.loop import Stepper, resolve_device, cosine_lr, default_threads  # noqa: E402
from clipsift.training.models import image_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def ceiling(cfg: TrainConfig, steps: int, warmup_steps: int = 5) -> float:
    """Samples/s of the step alone: one resident batch, no data pipeline at all."""
    device = resolve_device(cfg.device, 0)
    stepper = Stepper(cfg, device)
    size = image_size(stepper.model)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.batch_size, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    captions = [f"a photo of a {c} shape number {i}" for i, c in zip(range(cfg.batch_size), ["red", "blue"] * cfg.batch_size)]
    tokens = tokenizer(cfg.model)(captions).to(device)
    for s in range(warmup_steps):
        stepper.step(images, tokens, cosine_lr(s, cfg.lr, cfg.warmup, steps))
    _sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        stepper.step(images, tokens, cosine_lr(s, cfg.lr, cfg.warmup, steps))
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def loader(cfg: TrainConfig, steps: int, warmup_steps: int = 5) -> dict[str, float]:
    """Samples/s of stream mode's data alone (cfg has data.mode=stream): the DataLoader workers decoding and batching, and the
    batches reaching the device (pinned, copied) as in training, with no model. Against the
    ceiling it says whether the CPUs could keep the step fed at all."""
    from clipsift.training.data import open_data
    from clipsift.training.models import create_model

    device = resolve_device(cfg.device, 0)
    data, _ = open_data(cfg.data, cfg.model, image_size(create_model(cfg.model)), 0, cfg.batch_size, cfg.seed,
                        pin_memory=device.type == "cuda")
    n, t0 = 0, None
    for i, batch in enumerate(data.batches(0)):
        batch.images.to(device, non_blocking=True)
        batch.tokens.to(device, non_blocking=True)
        if i == warmup_steps:
            _sync(device)
            t0 = time.perf_counter()
        elif i > warmup_steps:
            n += len(batch.uids)
        if i == warmup_steps + steps:
            break
    _sync(device)
    return {"steady": n / (time.perf_counter() - t0)}


def real(cfg: TrainConfig, out: Path) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    cfg.out = str(out)
    train(cfg)
    stats = read_json(out / "stats.json")
    t = stats["timings"]
    return {"steady": stats["samples_per_s"], "end_to_end": stats["samples_seen"] / (t["load_data"] + t["train"]),
            "data_wait_fraction": stats["data_wait_fraction"], "load_data_s": t["load_data"]}


def summarise(runs: list[dict[str, float]], ceilings: list[dict[str, float]], ceil: float) -> dict[str, Any]:
    """Medians over repeats; the loader mode has only its steady rate."""
    med = lambda key: statistics.median([x[key] for x in runs])  # noqa: E731
    out = {"steady_samples_per_s": round(med("steady"), 1), "steady_ratio": round(med("steady") / ceil, 3),
           "steady_ratio_per_repeat": [round(x["steady"] / c["steady"], 3) for x, c in zip(runs, ceilings)]}
    if "end_to_end" in runs[0]:
        out.update(end_to_end_samples_per_s=round(med("end_to_end"), 1), end_to_end_ratio=round(med("end_to_end") / ceil, 3),
                   data_wait_fraction=med("data_wait_fraction"), load_data_s=round(med("load_data_s"), 2))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="a generated world (its pool shards are the data)")
    p.add_argument("--preset", default="tiny", help="configs/train preset giving model, batch and optimiser")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="memory,stream")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. threads=1 data.workers=2)")
    args = p.parse_args(argv)

    world = Path(args.world)
    modes = args.modes.split(",")
    base = [f"data.shards={world / 'pool' / 'shards'}", "progress=false", "checkpoint_every=1000000", "log_every=50",
            *args.overrides]

    # One thread count for every run (the default adapts to the machine's load at that moment).
    threads = config.load(TrainConfig, config.preset_path("train", args.preset), base).threads or default_threads()
    base.append(f"threads={threads}")

    def cfg_for(mode: str, steps: int) -> TrainConfig:
        c = config.load(TrainConfig, config.preset_path("train", args.preset), [*base, f"data.mode={mode}"])
        c.samples_seen = steps * c.batch_size  # the schedule's length does not change the cost of a step
        return c

    probe = cfg_for("memory", args.steps)
    torch.set_num_threads(threads)
    runs: dict[str, list[dict[str, float]]] = {"ceiling": [], **{m: [] for m in modes}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        for r in range(args.repeats):
            runs["ceiling"].append({"steady": ceiling(probe, args.steps)})
            for m in modes:
                runs[m].append(loader(cfg_for("stream", args.steps), args.steps) if m == "loader" else
                               real(cfg_for(m, args.steps), tmp / f"{m}-{r}"))
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]['steady']:.0f}" for k, v in runs.items()) + " samples/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ceil = statistics.median([x["steady"] for x in runs["ceiling"]])
    result = {
        "world": str(world), "preset": args.preset, "model": probe.model, "batch_size": probe.batch_size,
        "steps_per_run": args.steps, "repeats": args.repeats, "device": str(resolve_device(probe.device, 0)),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "platform": platform.platform(), "torch": torch.__version__,
        "ceiling_samples_per_s": round(ceil, 1),
        "modes": {m: summarise(runs[m], runs["ceiling"], ceil) for m in modes},
        "runs": runs,
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
