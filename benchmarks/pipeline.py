"""Pipeline throughput (pairs/s) against two ceilings measured in the same run.

    .venv/bin/python benchmarks/pipeline.py                      # world shards, world-rn-s + world-rn-l, CPU
    .venv/bin/python benchmarks/pipeline.py --datacomp-like 20000 --copies 15 --models vit-b-32 --device cuda

(a) model ceiling: the same models and heads (pipeline.encoders.Encoder) encoding already-decoded
    arrays in a plain loop on the same device, batch for batch as the pipeline feeds them (host ->
    device copy and normalisation included). On a CPU the best of 1 thread and all cores.
(b) decode ceiling: the pipeline's own decode code (decode_chunk) over every chunk of the same
    shards in a plain process pool of all cores (warmed up first; the tars are read beforehand).
(c) pipeline: `run_embed` end to end into a fresh folder per repeat, with Ray already started:
    planning, actor start and model load, every stage and every write are inside the time.
(d) metadata mode: `run_score` (clip-score heads) over (c)'s output.
Each repeat measures (b), then (a), then runs (c), so its ratio compares figures taken a minute or
so apart, whatever else the machine is doing. The ratio that matters is pipeline / min(a, b):
medians of the per-repeat ratios over --repeats, after one untimed warm-up
run (Ray's worker processes started, imports done). Each run also reports its rate after its
first shard was written (start-up excluded) and Ray Data's per-operator stats. Use enough data
that start-up (worker imports, model load: about 17 s on a 16-core GPU machine) is small against the
run: --copies K feeds the pipeline every shard K times (the ceilings' rates are per image, so they
measure the distinct shards once), which is cheaper than writing K times as many images. Results are merged into
benchmarks/results/pipeline.json under a key naming device, models and data.

--datacomp-like N writes N DataComp-like samples (256-512 px photo-like JPEGs, 4-20 word captions,
img2dataset shard layout via ShardWriter) once into --data and reuses them.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"
MODEL_SETS = {"world": {"b32": "world-rn-s", "l14": "world-rn-l"}, "vit-b-32": {"b32": "ViT-B-32"},
              "vit-b-32+l-14": {"b32": "ViT-B-32", "l14": "ViT-L-14"}}
WORDS = ("a photo of the red blue green small large dog cat car house tree street man woman child on in "
         "with near old new bright dark view city beach mountain food plate table window sky").split()


# ---------------------------------------------------------------- data
def world_shards(path: str | None, pairs: int) -> Path:
    """DIR/pool/shards of the given world, or of a generated one (reused on later runs)."""
    from clipsift import config
    from clipsift.world.config import WorldConfig
    from clipsift.world.generate import generate_world

    if path:
        return Path(path) / "pool" / "shards"
    out = Path("runs/bench") / f"pipeline-world-{pairs}"
    if not (out / "stats.json").is_file():
        print(f"generating a world with {pairs} pool pairs in {out} ...", flush=True)
        cfg = config.load(WorldConfig, config.preset_path("world", "ci"),
                          [f"out={out}", f"pool_size={pairs}", "samples_per_shard=2000", "curated_size=500",
                           f"workers={os.cpu_count()}"])
        generate_world(cfg, progress=False)
    return out / "pool" / "shards"


def datacomp_like_shards(folder: Path, n: int, shard_size: int, seed: int = 0) -> Path:
    jobs = [(str(folder), s, min(shard_size, n - s * shard_size), seed) for s in range((n + shard_size - 1) // shard_size)]
    todo = [j for j in jobs if not (folder / f"{j[1]:08d}.tar").is_file()]
    if todo:
        print(f"writing {len(todo)} DataComp-like shards into {folder} ...", flush=True)
        with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.map(_write_datacomp_like_shard, todo)
    return folder


def _write_datacomp_like_shard(job: tuple[str, int, int, int]) -> None:
    from PIL import Image

    from clipsift import formats
    from clipsift.shards import ShardWriter

    folder, shard, count, seed = job
    uids = formats.random_uids(np.random.default_rng([seed, shard]), count)
    with ShardWriter(folder, shard) as writer:
        for row in range(count):
            rng = np.random.default_rng([seed, shard, row])
            w, h = (int(x) for x in rng.integers(256, 513, size=2))
            # photo-like: a smooth colour field, mid-frequency texture and sensor noise
            field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            texture = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
            texture = texture.resize((w, h), Image.BILINEAR)
            pixels = 0.7 * np.asarray(field, np.float32) + 0.3 * np.asarray(texture, np.float32) + rng.normal(0, 6, (h, w, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            jpeg = buf.getvalue()
            caption = " ".join(rng.choice(WORDS, int(rng.integers(4, 21))))
            meta = {"uid": uids[row], "url": f"http://bench.invalid/{uids[row]}.jpg", "caption": caption,
                    "status": "success", "error_message": None, "width": w, "height": h,
                    "original_width": int(w * rng.uniform(1, 4)), "original_height": int(h * rng.uniform(1, 4)),
                    "sha256": hashlib.sha256(jpeg).hexdigest()}
            writer.add(formats.sample_key(shard, row), jpeg, caption, meta)


def linked_copies(folder: Path, shard_paths: list[Path], copies: int) -> Path:
    """FOLDER-xK: K symbolic links to every shard (tar, stats, status parquet), numbered on."""
    out = folder.parent / f"{folder.name}-x{copies}"
    out.mkdir(exist_ok=True)
    n = len(shard_paths)
    for k in range(copies):
        for j, path in enumerate(shard_paths):
            for suffix in (".tar", "_stats.json", ".parquet"):
                src, dst = path.with_name(path.stem + suffix), out / f"{k * n + j:08d}{suffix}"
                if src.exists() and not dst.exists():
                    dst.symlink_to(src.resolve())
    return out


# ---------------------------------------------------------------- ceilings
class ModelCeiling:
    """Encoder on pre-decoded chunks in a plain loop; on CPU the best of 1 thread and all cores."""

    def __init__(self, plan, device: str, shard_paths: list[Path], max_rows: int):
        import torch

        from clipsift.pipeline.decode import decode_chunk, read_chunks
        from clipsift.pipeline.encoders import Encoder

        self.chunks, self.rows = [], 0
        for raw in (t for path in shard_paths for t in read_chunks(str(path), 0, plan.batch_size)):
            c = decode_chunk(raw, plan).to_pylist()[0]
            n = len(c["uid"])
            if n:
                self.chunks.append(
                    ({p.key: np.frombuffer(c[p.key], np.uint8).reshape(n, *p.shape) for p in plan.images},
                     {t.key: np.frombuffer(c[t.key], np.int32).reshape(n, t.context_length) for t in plan.texts}))
                self.rows += n
            if self.rows >= max_rows:
                break
        self.threads = list(dict.fromkeys([1, os.cpu_count()])) if device == "cpu" else [torch.get_num_threads()]
        self.encoder = Encoder(plan, device)
        self.encoder.encode(*self.chunks[0])  # warm-up (kernels, allocator)

    def measure(self, seconds: float) -> dict:
        import torch

        before, by_threads = torch.get_num_threads(), {}
        for th in self.threads:
            torch.set_num_threads(th)
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or done == 0:
                for images, tokens in self.chunks:
                    self.encoder.encode(images, tokens)  # returns host arrays: synchronised
                    done += len(next(iter(tokens.values())))
            by_threads[th] = done / (time.perf_counter() - t0)
        torch.set_num_threads(before)
        return {"rows_per_s": max(by_threads.values()), "by_threads": by_threads, "rows_per_pass": self.rows}


_RAW: list = []  # raw chunk rows, read before the pool forks, so workers get them without a pipe


def _warm(plan) -> int:
    from clipsift.pipeline.decode import one_thread, prepare

    one_thread()  # as the pipeline's decode tasks do
    prepare(plan)
    time.sleep(0.2)  # keep this worker busy so the others take the remaining warm-up calls
    return os.getpid()


def _decode_count(args) -> tuple[int, int, float]:
    """(rows kept, images decoded, CPU seconds) of one chunk, timed by decode_chunk as in the pipeline."""
    from clipsift.pipeline.decode import decode_chunk

    index, plan = args
    t = decode_chunk(_RAW[index], plan)
    return len(t.column("uid")[0]), t.column("decoded")[0].as_py(), t.column("decode_cpu_s")[0].as_py()


class DecodeCeiling:
    """decode_chunk over every chunk of the shards in a pool of `workers` forked processes.

    The tars are read into memory first (not timed: reading is not decoding, and the pipeline's
    read tasks are cheap); only chunk indices cross the pipe, so the figure is decode work alone.
    The pool forks here, before this process starts CUDA or Ray, and idles while the pipeline runs.
    """

    def __init__(self, plan, shard_paths: list[Path], workers: int):
        from clipsift.pipeline.decode import read_chunks

        _RAW[:] = [t for path in shard_paths for t in read_chunks(str(path), 0, plan.batch_size)]
        self.plan, self.workers = plan, workers
        self.pool = mp.get_context("fork").Pool(workers)
        self.pool.map(_warm, [plan] * workers, chunksize=1)  # imports, transforms, tokenizers: not timed

    def measure(self) -> dict:
        t0 = time.perf_counter()
        done = list(self.pool.imap_unordered(_decode_count, [(i, self.plan) for i in range(len(_RAW))], chunksize=1))
        wall = time.perf_counter() - t0
        rows, images, cpu = (sum(x) for x in zip(*done))
        return {"rows": rows, "seconds": wall, "rows_per_s": rows / wall, "workers": self.workers,
                "cpu_ms_per_image": round(1000 * cpu / max(images, 1), 3)}

    def close(self) -> None:
        self.pool.close()
        self.pool.join()
        _RAW.clear()


# ---------------------------------------------------------------- pipeline
def pipeline_run(cfg_args: dict, out: Path, label: str) -> dict:
    """One run_embed into a fresh folder."""
    from clipsift.pipeline.config import EmbedConfig
    from clipsift.pipeline.embed import run_embed

    stats = run_embed(EmbedConfig(**cfg_args, out=str(out)), echo=lambda *a: None)
    run = stats["run"]
    dec = run["decode"]
    print(f"  pipeline {label}: {run['rows_written']} rows in {run['wall_s']:.1f} s = {run['rows_per_s']:.0f} rows/s, "
          f"{run['steady_rows_per_s']} rows/s after the first shard  (stage sums {stats['shard_timings_s']})\n"
          f"    decode: {dec['mean_in_flight']} tasks in flight on average (peak {dec['peak_in_flight']}, "
          f"{dec['slots']} slots) over {dec['window_s']:.1f} s; {dec['cpu_ms_per_image'] or 0:.2f} CPU ms / "
          f"{dec['wall_ms_per_image'] or 0:.2f} wall ms per image (0: decoded on the device); process start-up {dec['setup_s']:.1f} s in all; "
          f"model stage busy {run['model']['busy_fraction']:.0%} of the run", flush=True)
    return {"rows": run["rows_written"], "wall_s": run["wall_s"], "rows_per_s": run["rows_per_s"],
            "steady_rows_per_s": run["steady_rows_per_s"], "timeline": run["timeline"],
            "ray_init_s": run.get("ray_init_s"), "first_chunk_read_s": run.get("first_chunk_read_s"),
            "stage_seconds": stats["shard_timings_s"], "decode": dec, "model": run["model"],
            "stages": run["stages"], "out": str(out), "ray_stats": (out / "ray_stats.txt").read_text()}


def metadata_runs(src: Path, heads, repeats: int, tmp: Path) -> list[dict]:
    from clipsift.pipeline.config import RayConfig, ScoreConfig
    from clipsift.pipeline.score import run_score

    runs = []
    for r in range(repeats):
        stats = run_score(ScoreConfig(input=str(src), out=str(tmp / f"score{r}"), heads=heads, batch_size=4096,
                                      progress=False, ray=RayConfig()), echo=lambda *a: None)
        runs.append({"rows": stats["run"]["rows_written"], "wall_s": stats["run"]["wall_s"],
                     "rows_per_s": stats["run"]["rows_per_s"]})
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", help="a world folder (default: generate or reuse one under runs/bench)")
    p.add_argument("--world-pairs", type=int, default=12000, help="pool size of the generated world")
    p.add_argument("--datacomp-like", type=int, default=0, metavar="N",
                   help="benchmark on N DataComp-like 256-512 px samples instead of world shards")
    p.add_argument("--data", help="folder for --datacomp-like shards (default runs/bench/datacomp-like-N)")
    p.add_argument("--shard-size", type=int, default=2000, help="samples per --datacomp-like shard")
    p.add_argument("--models", default="world", help=f"{', '.join(MODEL_SETS)} or name=arch,name=arch (random weights)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="", help="fp32 | fp16 | bf16 (default fp16 on cuda, fp32 on cpu)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--model-threads", type=int, default=0, help="ray.model_threads of the pipeline's CPU actor")
    p.add_argument("--ray", action="append", default=[], metavar="KEY=VALUE",
                   help="a pipeline ray.* setting, e.g. --ray read_tasks=4 (repeatable; the results key names them)")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="jpeg_draft=true in the pipeline and the decode ceiling alike (reduced-scale JPEG decoding)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-decode", default="cpu", choices=["cpu", "device"],
                   help="the pipeline's image_decode (the decode ceiling is the CPU pool either way)")
    p.add_argument("--copies", type=int, default=1, metavar="K",
                   help="the pipeline reads every shard K times (links): a K-times longer job, same images")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed pipeline run that starts Ray's workers before the repeats")
    p.add_argument("--ceiling-rows", type=int, default=4096, help="decoded rows the model ceiling loops over")
    p.add_argument("--ceiling-seconds", type=float, default=10.0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray
    import torch

    from clipsift import config, formats
    from clipsift.eval.models import ModelSpec
    from clipsift.pipeline.config import RayConfig
    from clipsift.pipeline.encoders import make_plan, pick_device
    from clipsift.pipeline.heads import HeadSpec

    device = pick_device(args.device).type
    precision = args.precision or ("fp16" if device == "cuda" else "fp32")
    if args.datacomp_like:
        shards_dir = datacomp_like_shards(Path(args.data or f"runs/bench/datacomp-like-{args.datacomp_like}"),
                                          args.datacomp_like, args.shard_size)
        data_name = f"datacomp-like-{args.datacomp_like}"
    else:
        shards_dir = world_shards(args.world, args.world_pairs)
        data_name = "world" if args.world else f"world-{args.world_pairs}"
    shard_paths = formats.list_shards(shards_dir)  # the ceilings measure these
    if args.copies > 1:  # the pipeline reads each shard K times (links), to amortise its start-up
        shards_dir, data_name = linked_copies(shards_dir, shard_paths, args.copies), f"{data_name}-x{args.copies}"
    names = MODEL_SETS.get(args.models) or dict(item.split("=", 1) for item in args.models.split(","))
    models = {n: ModelSpec(a, "") for n, a in names.items()}
    heads = {f"clip_{n}_similarity_score": HeadSpec("clip_score", n) for n in models}
    plan = make_plan(models, heads, batch_size=args.batch_size, normalize=True, precision=precision, seed=0,
                     allow_random_weights=True, jpeg_draft=args.jpeg_draft)
    ray_cfg = config.load(RayConfig, None, [f"model_threads={args.model_threads}", *args.ray])
    cpus = os.cpu_count()
    load_before = os.getloadavg()  # other jobs on the machine skew every figure: say how busy it was
    print(f"{len(shard_paths)} shards in {shards_dir}; models {names}; device {device} ({precision}); {cpus} CPUs",
          flush=True)

    decode = DecodeCeiling(plan, shard_paths, cpus)  # forks first: before CUDA and Ray start here
    model = ModelCeiling(plan, device, shard_paths, args.ceiling_rows)
    Path("runs/bench").mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    object_store = ray.cluster_resources().get("object_store_memory", 0)
    repeats = []
    try:
        with tempfile.TemporaryDirectory(dir="runs/bench") as tmp:
            cfg_args = dict(input=str(shards_dir), models=models, heads=heads, allow_random_weights=True,
                            batch_size=args.batch_size, device=args.device, precision=precision, progress=False,
                            jpeg_draft=args.jpeg_draft, image_decode=args.image_decode, ray=ray_cfg)
            if args.warmup:  # leaves Ray's workers started with their imports done, as in a long job
                pipeline_run(cfg_args, Path(tmp) / "warmup", "warm-up")
            for r in range(args.repeats):  # the ceilings beside each run: other jobs on the machine come and go
                b = decode.measure()
                a = model.measure(args.ceiling_seconds)
                c = pipeline_run(cfg_args, Path(tmp) / f"embed{r}", f"repeat {r}")
                lower = min(a["rows_per_s"], b["rows_per_s"])
                c.update(model_ceiling=a, decode_ceiling=b, vs_lower_ceiling=c["rows_per_s"] / lower,
                         steady_vs_lower_ceiling=c["steady_rows_per_s"] / lower if c["steady_rows_per_s"] else None)
                print(f"    ceilings: model {a['rows_per_s']:.0f} rows/s (by torch threads "
                      f"{ {k: round(v) for k, v in a['by_threads'].items()} }), decode {b['rows_per_s']:.0f} rows/s; "
                      f"pipeline / lower = {c['vs_lower_ceiling']:.2f}", flush=True)
                repeats.append(c)
            meta = metadata_runs(Path(repeats[0]["out"]) / "metadata", heads, args.repeats, Path(tmp))
    finally:
        ray.shutdown()
        decode.close()

    a_med = statistics.median(r["model_ceiling"]["rows_per_s"] for r in repeats)
    b_med = statistics.median(r["decode_ceiling"]["rows_per_s"] for r in repeats)
    pipe = statistics.median(r["rows_per_s"] for r in repeats)
    ratio = statistics.median(r["vs_lower_ceiling"] for r in repeats)
    steady = [r["steady_vs_lower_ceiling"] for r in repeats if r["steady_vs_lower_ceiling"]]
    steady_ratio = statistics.median(steady) if steady else None
    meta_rate = statistics.median(r["rows_per_s"] for r in meta)
    in_flight = statistics.median(r["decode"]["mean_in_flight"] or 0 for r in repeats)
    cpu_ms = statistics.median(r["decode"]["cpu_ms_per_image"] or 0 for r in repeats)
    ceiling_cpu_ms = statistics.median(r["decode_ceiling"]["cpu_ms_per_image"] for r in repeats)
    goal = 0.8 if device == "cuda" else 0.5
    key = "-".join([device, args.models, data_name] + (["draft"] if args.jpeg_draft else []) +
                   (["device-decode"] if args.image_decode == "device" else []) + args.ray)
    result = {
        "machine": {"cpus": cpus,
                    "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
                    "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
                    "ray_object_store_gib": round(object_store / 2**30, 1),
                    "dev_shm_gib": round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if os.path.isdir("/dev/shm") else None},
        "setup": {"shards": len(shard_paths), "copies": args.copies, "models": names, "precision": precision, "batch_size": args.batch_size,
                  "model_threads": args.model_threads or "default", "repeats": args.repeats, "warmup_run": args.warmup,
                  "jpeg_draft": args.jpeg_draft, "image_decode": args.image_decode, "ray": vars(ray_cfg)},
        "pipeline": {"repeats": [{k: v for k, v in r.items() if k != "out"} for r in repeats],
                     "median_rows_per_s": pipe},
        "median_model_ceiling_rows_per_s": a_med, "median_decode_ceiling_rows_per_s": b_med,
        "metadata_mode": {"runs": meta, "median_rows_per_s": meta_rate},
        # did decoding use the machine? tasks in flight against the slots beside the model actor, and the
        # CPU each image costs in the pipeline's decode tasks against the plain process pool
        "decode": {"median_mean_in_flight": in_flight, "slots": repeats[0]["decode"]["slots"],
                   "median_cpu_ms_per_image": cpu_ms, "median_ceiling_cpu_ms_per_image": ceiling_cpu_ms,
                   "ceiling_workers": cpus},
        "ratios": {"pipeline_vs_lower_ceiling": ratio, "steady_pipeline_vs_lower_ceiling": steady_ratio,
                   "lower_ceiling": "model" if a_med <= b_med else "decode", "goal": goal,
                   "note": "medians of per-repeat ratios; each repeat's ceilings are measured just before it"},
    }
    print(f"(a) model ceiling: median {a_med:.0f} rows/s    (b) decode ceiling: median {b_med:.0f} rows/s")
    print(f"(c) pipeline: median {pipe:.0f} rows/s; median ratio to the lower ceiling {ratio:.2f} "
          f"({result['ratios']['lower_ceiling']}); goal >= {goal}")
    if steady_ratio:
        print(f"    after each run's first shard: median ratio {steady_ratio:.2f}")
    print(f"    decode: median {in_flight} tasks in flight of {result['decode']['slots']} slots; CPU per image "
          f"{cpu_ms:.2f} ms in the pipeline vs {ceiling_cpu_ms:.2f} ms in the {cpus}-process pool")
    print(f"(d) metadata mode: median {meta_rate:.0f} rows/s")
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged[key] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(f"wrote {out} [{key}]")


if __name__ == "__main__":
    main()
