"""Training throughput versus the data-free ceiling, per case, in one run (issue 23's figures).

The ceiling is the same model, optimiser and step (training.loop.Stepper) fed one batch of uint8
images and tokens that already sit on the device: nothing can feed the model faster. Against it,
`train()` itself in each mode:

    memory         decode everything once, then gather (on the GPU when training there)
    stream         decode while training, data.image_decode as the preset says (auto: cpu)
    stream-cpu     stream, JPEGs decoded in the DataLoader workers
    stream-device  stream, workers only read and tokenise; the training process decodes on its device
    loader         stream-device's data alone, no model (can the readers and the decoder feed the step?)
    MODE+graphs    the same with compile=reduce-overhead (torch.compile + CUDA graphs), against a
                   ceiling that is compiled too (on a CPU compile is ignored)

Cases (--cases):
    world     --world's pool shards with --preset (gpu: world-rn-s64, batch 1024, 64 px) and --modes
    datacomp  DataComp-like shards (256-512 px JPEGs, benchmarks/pipeline.py's writer), preset gpu_datacomp
              (ViT-B-32, 224 px, batch 1024), stream-cpu and stream-device
    tiny      the demo's compare scale (preset tiny: world-rn-s, batch 128) on --world's shards: memory,
              memory+graphs
    bench     `compare -p gpu`'s scale (preset bench: world-rn-s, batch 512), likewise

Runs are interleaved (ceiling, mode, mode, ceiling, ...) so a machine shared with other jobs slows
them alike; figures are medians over repeats. Per mode:

    steady      samples/s inside the training loop after its first log window (start-up, the
                first batch and compilation excluded) / ceiling samples/s
    end_to_end  samples / (data loading + training) / ceiling            (decode cost and start-up included)

and, where a mode misses its goal (issue 23: 0.9 for world and datacomp, 0.8 for tiny and bench), a breakdown
of where the time goes: data wait (the step waiting for its batch), GPU busy (CUDA events around
each step / loop time), the decode thread's time a batch, the ceiling's step time.

    .venv/bin/python benchmarks/train.py --world runs/world/tiny [--steps 150] [--repeats 3]
    python benchmarks/train.py --cases world,datacomp,tiny --world runs/bench/world-gpu --make-world \\
        --preset gpu --modes memory,stream-cpu,stream-device [--quick] --out $OUT/train.json

--make-world generates --world (a 64-px world: 96k pool pairs in 24 shards; --quick: 30k in 15)
when it is missing; DataComp-like shards go to --data (default runs/bench/datacomp-like-N).
--quick: about 2 minutes on a GPU machine once the data exist (fewer steps, one repeat, no +graphs).
Writes benchmarks/results/train.json (or --out).
"""
from __future__ import annotations

import argparse
import importlib
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
from clipsift.training.loop import Stepper, StepClock, cosine_lr, default_threads, resolve_device  # noqa: E402
from clipsift.training.models import image_size  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train.json"
GOALS = {"world": 0.9, "datacomp": 0.9, "tiny": 0.8, "bench": 0.8}
SMALL = ("tiny", "bench")  # compare-scale cases: the world's shards, memory mode, twice the steps
MODE_OVERRIDES = {"memory": ["data.mode=memory"], "stream": ["data.mode=stream"],
                  "stream-cpu": ["data.mode=stream", "data.image_decode=cpu"],
                  "stream-device": ["data.mode=stream", "data.image_decode=device"],
                  "loader": ["data.mode=stream", "data.image_decode=device"]}


def mode_overrides(mode: str) -> list[str]:
    base, _, extra = mode.partition("+")
    if base not in MODE_OVERRIDES or extra not in ("", "graphs"):
        raise SystemExit(f"unknown mode {mode!r}: one of {', '.join(MODE_OVERRIDES)}, each optionally +graphs")
    return [*MODE_OVERRIDES[base], *(["compile=reduce-overhead"] if extra else [])]


def ceiling(cfg: TrainConfig, steps: int, warmup_steps: int = 5) -> dict[str, float]:
    """Samples/s of the step alone: one resident batch, no data pipeline at all; and the GPU's busy
    fraction over those steps (CUDA events, as in training)."""
    device = resolve_device(cfg.device, 0)
    stepper = Stepper(cfg, device)
    size = image_size(stepper.model)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (cfg.batch_size, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    captions = [f"a photo of a {c} shape number {i}" for i, c in zip(range(cfg.batch_size), ["red", "blue"] * cfg.batch_size)]
    tokens = tokenizer(cfg.model)(captions).to(device)
    warmup_steps += 3 if cfg.compile == "reduce-overhead" else 0  # graphs are recorded on the first calls
    for s in range(warmup_steps):
        stepper.step(images, tokens, cosine_lr(s, cfg.lr, cfg.warmup, steps))
    _sync(device)
    clock = StepClock(device)
    t0 = time.perf_counter()
    for s in range(steps):
        mark = clock.start()
        stepper.step(images, tokens, cosine_lr(s, cfg.lr, cfg.warmup, steps))
        clock.stop(mark)
    _sync(device)
    seconds = time.perf_counter() - t0
    clock.collect(sync=True)
    return {"steady": steps * cfg.batch_size / seconds, "step_ms": 1000 * seconds / steps,
            "gpu_busy_fraction": clock.seconds / seconds if device.type == "cuda" else None}


def loader(cfg: TrainConfig, steps: int, warmup_steps: int = 5) -> dict[str, float]:
    """Samples/s of stream mode's data alone: the workers reading (and decoding, with image_decode=cpu),
    the batches decoded or copied to the device ahead of the consumer as in training, no model.
    Against the ceiling it says whether the data path could keep the step fed at all."""
    from clipsift.training.data import open_data
    from clipsift.training.models import create_model

    device = resolve_device(cfg.device, 0)
    data, _ = open_data(cfg.data, cfg.model, image_size(create_model(cfg.model)), 0, cfg.batch_size, cfg.seed,
                        pin_memory=device.type == "cuda", device=device)
    n, t0 = 0, None
    batches = data.batches(0)
    for i, batch in enumerate(batches):
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
    seconds = time.perf_counter() - t0
    batches.close()
    return {"steady": n / seconds}


def real(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cfg.out = str(out)
    train(cfg)
    stats = read_json(out / "stats.json")
    t, rows, b = stats["timings"], stats["log"], stats["batch_size"]
    # steady: the log windows after the first (start-up, first batch, compilation in the first)
    spans = [(r["step"] - p["step"], r["samples_per_s"]) for p, r in zip(rows, rows[1:])]
    samples = sum(n * b for n, _ in spans)
    steady = samples / sum(n * b / rate for n, rate in spans) if spans else stats["samples_per_s"]
    steps = stats["steps"]
    return {"steady": steady, "end_to_end": stats["samples_seen"] / (t["load_data"] + t["train"]),
            "data_wait_fraction": stats["data_wait_fraction"], "gpu_busy_fraction": stats.get("gpu_busy_fraction"),
            "first_batch_s": round(t.get("first_batch", 0.0), 2), "load_data_s": round(t["load_data"], 2),
            "image_decode": stats["data"].get("image_decode"),
            "decode_thread_ms_per_batch": round(1000 * stats["data"].get("decode_thread_s", 0.0) / max(steps, 1), 2)}


def summarise(runs: list[dict[str, Any]], ceilings: list[dict[str, float]], ceil: float) -> dict[str, Any]:
    """Medians over repeats; the loader mode has only its steady rate."""
    def med(key):
        values = [x[key] for x in runs if x.get(key) is not None]
        return statistics.median(values) if values else None

    out = {"steady_samples_per_s": round(med("steady"), 1), "steady_ratio": round(med("steady") / ceil, 3),
           "steady_ratio_per_repeat": [round(x["steady"] / c["steady"], 3) for x, c in zip(runs, ceilings)]}
    if "end_to_end" in runs[0]:
        out.update(end_to_end_samples_per_s=round(med("end_to_end"), 1), end_to_end_ratio=round(med("end_to_end") / ceil, 3),
                   data_wait_fraction=med("data_wait_fraction"), gpu_busy_fraction=med("gpu_busy_fraction"),
                   first_batch_s=med("first_batch_s"), load_data_s=med("load_data_s"),
                   decode_thread_ms_per_batch=med("decode_thread_ms_per_batch"), image_decode=runs[0]["image_decode"])
    return out


def breakdown(case: str, mode: str, s: dict[str, Any], ceil: dict[str, Any]) -> str:
    """One line: where the time goes, for a mode that missed its goal."""
    parts = [f"{case}/{mode}: steady {s['steady_ratio']:.3f} of the ceiling (goal {GOALS.get(case, 0.9)})"]
    if s.get("data_wait_fraction") is not None:
        parts.append(f"data wait {100 * s['data_wait_fraction']:.0f}% of the loop")
    if s.get("gpu_busy_fraction") is not None:
        parts.append(f"GPU busy {100 * s['gpu_busy_fraction']:.0f}% (ceiling {100 * (ceil['gpu_busy_fraction'] or 0):.0f}%)")
    if s.get("decode_thread_ms_per_batch"):
        parts.append(f"decode/copy threads {s['decode_thread_ms_per_batch']:.1f} ms/batch busy "
                     f"({s.get('image_decode')} decode; with device decode 4 threads share it)")
    parts.append(f"ceiling step {ceil['step_ms']:.1f} ms")
    if s.get("first_batch_s") is not None:
        parts.append(f"first batch {s['first_batch_s']:.1f} s")
    return "; ".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sibling(name: str):
    """benchmarks/<name>.py as module <name> (its process pools' children import it by that name)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return importlib.import_module(name)


def make_world(out: Path, pool: int, per_shard: int) -> None:
    """A 64-px world with a `pool`-pair pool (the rest of the world kept small): reused when present."""
    from clipsift.world.config import WorldConfig
    from clipsift.world.generate import generate_world

    if (out / "stats.json").is_file():
        return
    print(f"generating a 64-px world with {pool} pool pairs in {out} ...", flush=True)
    cfg = config.load(WorldConfig, config.preset_path("world", "gpu"),
                      [f"out={out}", f"pool_size={pool}", f"samples_per_shard={per_shard}", "curated_size=2000",
                       "train_per_class=5", "test_per_class=5", "fine_test_per_class=2", "retrieval_size=100",
                       "duplicate_sources=100", f"workers={os.cpu_count()}"])
    generate_world(cfg, progress=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="world", help="comma-separated: world, datacomp, tiny, bench")
    p.add_argument("--world", help="a generated world (its pool shards are the world and tiny cases' data)")
    p.add_argument("--make-world", action="store_true", help="generate --world first if it is missing")
    p.add_argument("--preset", default="tiny", help="the world case's configs/train preset")
    p.add_argument("--modes", default="memory,stream", help="the world case's modes (see above)")
    p.add_argument("--datacomp-like", type=int, default=0, metavar="N", help="DataComp-like samples (default 24000)")
    p.add_argument("--data", help="folder of the DataComp-like shards (written once, then reused)")
    p.add_argument("--steps", type=int, default=150, help="steps a run (the tiny and bench cases run 2x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="few steps, one repeat, less data, no +graphs modes")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every case (e.g. threads=1)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 40), 1
    cases = args.cases.split(",")
    t_start = time.perf_counter()

    sources: dict[str, tuple[str, Path, list[str]]] = {}  # case -> (preset, shards, modes)
    if {"world", *SMALL} & set(cases):
        if not args.world:
            p.error("the world, tiny and bench cases need --world")
        if args.make_world:
            make_world(Path(args.world), *((30_000, 2_000) if args.quick else (96_000, 4_000)))
        shards_dir = Path(args.world) / "pool" / "shards"
        if "world" in cases:
            sources["world"] = (args.preset, shards_dir, args.modes.split(","))
        for case in SMALL:
            if case in cases:
                sources[case] = (case, shards_dir, ["memory"] if args.quick else ["memory", "memory+graphs"])
    if "datacomp" in cases:
        n = args.datacomp_like or (7_500 if args.quick else 24_000)
        per_shard = 500 if args.quick else 1_000
        folder = Path(args.data or f"runs/bench/datacomp-like-{n}-{per_shard}")
        _sibling("pipeline").datacomp_like_shards(folder, n, per_shard)
        sources["datacomp"] = ("gpu_datacomp", folder, ["stream-cpu", "stream-device"])
    if args.quick:
        sources = {c: (pr, sh, [m for m in ms if "+graphs" not in m]) for c, (pr, sh, ms) in sources.items()}
    for _, _, ms in sources.values():
        for m in ms:
            mode_overrides(m)  # unknown modes fail before anything runs

    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        for case, (preset, shards_dir, modes) in sources.items():
            steps = args.steps * (2 if case in SMALL else 1)
            base = [f"data.shards={shards_dir}", "progress=false", "checkpoint_every=1000000",
                    f"log_every={max(steps // 10, 1)}",
                    # a 1024-sample buffer: DataComp-sized workers start in seconds, not a minute
                    *(["data.shuffle_buffer=1024"] if case == "datacomp" else []),
                    # the presets' 2 workers would take most of the case decoding its memory-mode pool
                    *([f"data.workers={max(1, (os.cpu_count() or 2) - 1)}"] if case in SMALL else []),
                    *args.overrides]
            # One thread count for every run (the default adapts to the machine at that moment).
            threads = config.load(TrainConfig, config.preset_path("train", preset), base).threads or default_threads()
            base.append(f"threads={threads}")
            torch.set_num_threads(threads)

            def cfg_for(mode: str) -> TrainConfig:
                c = config.load(TrainConfig, config.preset_path("train", preset), [*base, *mode_overrides(mode)])
                c.samples_seen = steps * c.batch_size  # the schedule's length does not change the cost of a step
                return c

            compiles = sorted({cfg_for(m).compile for m in modes})
            runs: dict[str, list[dict[str, Any]]] = {f"ceiling:{c}": [] for c in compiles} | {m: [] for m in modes}
            for r in range(args.repeats):
                for c in compiles:
                    runs[f"ceiling:{c}"].append(ceiling(cfg_for("memory" if c == "off" else "memory+graphs"), steps))
                for m in modes:
                    runs[m].append(loader(cfg_for(m), steps) if m == "loader" else real(cfg_for(m), tmp / f"{case}-{m}-{r}"))
                print(f"{case} repeat {r + 1}/{args.repeats}: " + ", ".join(
                    f"{k} {v[-1]['steady']:.0f}" for k, v in runs.items()) + " samples/s", flush=True)
            ceil = {c: statistics.median([x["steady"] for x in runs[f"ceiling:{c}"]]) for c in compiles}
            ceil_info = {c: {"step_ms": statistics.median([x["step_ms"] for x in runs[f"ceiling:{c}"]]),
                             "gpu_busy_fraction": runs[f"ceiling:{c}"][0]["gpu_busy_fraction"]} for c in compiles}
            probe = cfg_for(modes[0])
            summary = {}
            for m in modes:
                c = cfg_for(m).compile
                summary[m] = summarise(runs[m], runs[f"ceiling:{c}"], ceil[c]) | {"ceiling": f"compile={c}"}
            results[case] = {
                "preset": preset, "shards": str(shards_dir), "model": probe.model, "batch_size": probe.batch_size,
                "steps_per_run": steps, "repeats": args.repeats, "threads": threads,
                "ceiling_samples_per_s": {c: round(v, 1) for c, v in ceil.items()},
                "ceiling_step_ms": {c: round(v["step_ms"], 2) for c, v in ceil_info.items()},
                "ceiling_gpu_busy_fraction": {c: v["gpu_busy_fraction"] for c, v in ceil_info.items()},
                "goal": GOALS[case] if case in GOALS else None, "modes": summary, "runs": runs,
                "missed": [breakdown(case, m, s, ceil_info[cfg_for(m).compile]) for m, s in summary.items()
                           if m != "loader" and s["steady_ratio"] < GOALS.get(case, 0.9)],
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    device = resolve_device(config.load(TrainConfig, config.preset_path("train", "ci"), args.overrides).device, 0)
    result = {
        "device": str(device), "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "quick": args.quick,
        "wall_s": round(time.perf_counter() - t_start, 1), "cases": results,
    }
    write_json(args.out, result)
    for case, r in results.items():
        print(json.dumps({case: {k: v for k, v in r.items() if k not in ("runs", "missed")}}, indent=1))
        for line in r["missed"]:
            print("MISSED " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
