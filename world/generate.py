"""Generate the embedded benchmark world in DataComp's formats.

Every random choice comes from a generator seeded by (seed, split, shard), so any shard can be
(re)made alone, in any process, with the same bytes: that is what makes generation parallel and
resumable. Layout (see docs/world.md):

    OUT/pool/shards/          img2dataset shards of the candidate pool
    OUT/pool/metadata/        DataComp metadata parquet per shard (no scores yet)
    OUT/pool/ground_truth/    what each pool example really is, per shard (never shown to filters)
    OUT/curated/shards/       a clean, broad split for the world's reference CLIPs
    OUT/tasks/<task>/         downstream tasks in the clip_benchmark webdataset layout
    OUT/tasks.yaml            the task list for `clipsift eval`
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from clipsift import config as cfglib
from clipsift import formats
from clipsift.runlog import Timer, atomic_path, atomic_write_text, read_json, write_json
from clipsift.shards import ShardWriter, write_tar
from clipsift.world import concepts as C
from clipsift.world.config import WorldConfig
from clipsift.world.render import encode_jpeg, render

_SPLITS = {"pool": 1, "curated": 2, "dup_sources": 3, "task": 4}
CORRUPT_KINDS = ["truncated_jpeg", "missing_caption", "malformed_json"]
NOISE_KINDS = ["clean", "misaligned", "junk", "foreign", "partial", "off_task", "near_duplicate",
               "exact_duplicate", "corrupt"]
TASKS = [  # name, type, group, main metric
    ("shapes", "classification", "main", "acc1"),
    ("shapes_outline", "classification", "distribution shift", "acc1"),
    ("colour_shape", "classification", "other classification", "acc1"),
    ("count", "classification", "other classification", "acc1"),
    ("retrieval", "retrieval", "retrieval", "mean_recall@1"),
]


def _rng(cfg: WorldConfig, split: str, *parts: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _SPLITS[split], *parts])


def _zipf(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


# ------------------------------------------------------------------ scenes
def sample_scene(rng: np.random.Generator, cfg: WorldConfig | None = None, *, uniform: bool = False,
                 style: str | None = None, count: int | None = None, background: str | None = None) -> dict:
    """An on-task scene: shapes with colour, count, size, position, background and style."""
    shape_p = None if uniform or cfg is None else _zipf(len(C.SHAPES), cfg.shape_zipf)
    colour_p = None if uniform or cfg is None else _zipf(len(C.COLOURS), cfg.colour_zipf)
    outline = cfg.outline_rate if cfg is not None else 0.1
    return {
        "family": "shape",
        "shape": C.SHAPES[rng.choice(len(C.SHAPES), p=shape_p)],
        "colour": list(C.COLOURS)[rng.choice(len(C.COLOURS), p=colour_p)],
        "count": count or int(rng.choice(C.COUNTS, p=[0.7, 0.2, 0.1])),
        "size": C.SIZES[rng.integers(2)],
        "position": C.POSITIONS[rng.integers(len(C.POSITIONS))],
        "background": background or C.BACKGROUNDS[rng.integers(len(C.BACKGROUNDS))],
        "style": style or ("outline" if rng.random() < outline else "filled"),
        "letter": "",
    }


def sample_off_task(rng: np.random.Generator) -> tuple[dict, str]:
    """Letters or bare patterns with a true caption: real content that no task asks about."""
    scene = {"family": "letter" if rng.random() < 0.6 else "pattern", "shape": "", "count": 0, "size": "",
             "position": "", "style": "", "colour": list(C.COLOURS)[rng.integers(len(C.COLOURS))],
             "background": C.BACKGROUNDS[rng.integers(len(C.BACKGROUNDS))], "letter": ""}
    if scene["family"] == "letter":
        scene["letter"] = C.LETTERS[rng.integers(len(C.LETTERS))]
        return scene, C.letter_caption(rng, scene["letter"], scene["colour"])
    return scene, C.pattern_caption(rng, scene["background"])


def _partial_caption(rng: np.random.Generator, scene: dict) -> str:
    """A caption that is right about the scene except for one attribute."""
    wrong = dict(scene)
    attr = ["colour", "shape", "count"][rng.integers(3)]
    options = {"colour": list(C.COLOURS), "shape": C.SHAPES, "count": C.COUNTS}[attr]
    wrong[attr] = [o for o in options if o != scene[attr]][rng.integers(len(options) - 1)]
    return C.english_caption(rng, wrong)


def _perturb(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate: the same picture shifted a pixel or two and re-toned, as re-uploads are."""
    arr = np.asarray(img).astype(np.int16)
    arr = np.roll(arr, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    arr = np.clip(arr * rng.uniform(0.9, 1.1) + rng.integers(-12, 13), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _original_size(rng: np.random.Generator, cfg: WorldConfig, noise: str) -> tuple[int, int]:
    small_rate = cfg.sizes.small_junk if noise in ("junk", "off_task") else cfg.sizes.small
    if rng.random() < small_rate:
        short = int(rng.integers(24, 200))
    else:
        short = int(np.clip(rng.lognormal(np.log(480), 0.45), 200, 4000))
    ratio = rng.uniform(3.2, 8.0) if rng.random() < cfg.sizes.extreme_aspect else rng.uniform(1.0, 1.8)
    long = int(short * ratio)
    return (long, short) if rng.random() < 0.6 else (short, long)


def _dup_sources(cfg: WorldConfig) -> list[dict]:
    """The popular images behind every duplicate, shared by all shards."""
    out = []
    for d in range(cfg.duplicate_sources):
        rng = _rng(cfg, "dup_sources", d)
        scene = sample_scene(rng, cfg)
        out.append({"scene": scene, "caption": C.english_caption(rng, scene), "render_seed": int(rng.integers(2**32))})
    return out


# ------------------------------------------------------------------ pool shards
def _noise_plan(cfg: WorldConfig, rng: np.random.Generator, n: int) -> list[str]:
    rates = asdict(cfg.noise)
    kinds = list(rates) + ["clean"]
    p = np.array(list(rates.values()) + [1.0 - sum(rates.values())])
    return [kinds[i] for i in rng.choice(len(kinds), size=n, p=p / p.sum())]


def make_pool_shard(cfg: WorldConfig, shard: int, n: int, dup_sources: list[dict], first_corrupt: int) -> dict[str, int]:
    """Write one pool shard (tar + sidecars), its metadata parquet and its ground-truth part."""
    rng = _rng(cfg, "pool", shard)
    noise = _noise_plan(cfg, rng, n)
    uids = formats.random_uids(rng, n)
    scenes = [sample_scene(rng, cfg) for _ in range(n)]
    true_caps = [C.english_caption(rng, s) for s in scenes]
    meta_rows, gt_rows = [], []
    n_corrupt = first_corrupt
    with ShardWriter(Path(cfg.out) / "pool" / "shards", shard) as writer:
        for row in range(n):
            kind, scene, uid = noise[row], scenes[row], uids[row]
            key = formats.sample_key(shard, row)
            img_rng = np.random.default_rng([cfg.seed, _SPLITS["pool"], shard, row])
            dup_group, language, corrupt_kind = -1, "en", ""
            if kind in ("near_duplicate", "exact_duplicate"):
                dup_group = int(rng.integers(len(dup_sources)))
                src = dup_sources[dup_group]
                scene = src["scene"]
                img = render(scene, cfg.image_size, np.random.default_rng(src["render_seed"]))
                if kind == "near_duplicate":
                    img = _perturb(img, img_rng)
                    text = C.english_caption(img_rng, scene)
                else:
                    text = src["caption"]
            else:
                if kind == "off_task":
                    scene, text = sample_off_task(rng)
                elif kind == "misaligned":  # the true caption of another image in this shard
                    text = true_caps[(row + 1 + int(rng.integers(max(1, n - 1)))) % n]
                elif kind == "junk":
                    text = C.junk_caption(rng)
                elif kind == "foreign":
                    language = cfg.languages[int(rng.integers(len(cfg.languages)))]
                    text = C.foreign_caption(rng, scene, language)
                elif kind == "partial":
                    text = _partial_caption(rng, scene)
                else:  # clean, corrupt (a clean sample whose bytes get damaged below)
                    text = true_caps[row]
                img = render(scene, cfg.image_size, img_rng)
            image = encode_jpeg(img)
            width, height = _original_size(rng, cfg, kind)
            sha = hashlib.sha256(image).hexdigest()
            url = f"http://images.world.invalid/{scene['family']}/{uid[:12]}.jpg"
            meta = {"uid": uid, "url": url, "caption": text, "status": "success", "error_message": None,
                    "width": cfg.image_size, "height": cfg.image_size, "original_width": width,
                    "original_height": height, "sha256": sha, "face_bboxes": []}
            if kind == "corrupt":
                corrupt_kind = CORRUPT_KINDS[n_corrupt % len(CORRUPT_KINDS)]
                n_corrupt += 1
                members = {"jpg": image, "txt": text.encode(), "json": json.dumps({**meta, "key": key}, sort_keys=True).encode()}
                if corrupt_kind == "truncated_jpeg":
                    members["jpg"] = image[: len(image) // 2]
                elif corrupt_kind == "missing_caption":
                    del members["txt"]
                else:
                    members["json"] = members["json"][: len(members["json"]) // 2]
                writer.add_raw(key, members, status={**meta, "key": key})
            else:
                writer.add(key, image, text, meta)
            meta_rows.append({"uid": uid, "url": url, "text": text, "original_width": width,
                              "original_height": height, "face_bboxes": [], "sha256": sha})
            gt_rows.append({"uid": uid, "key": key, "shard": shard, "noise": kind, "corrupt_kind": corrupt_kind,
                            "family": scene["family"], "shape": scene["shape"], "colour": scene["colour"],
                            "count": scene["count"], "size": scene["size"], "position": scene["position"],
                            "background": scene["background"], "style": scene["style"], "letter": scene["letter"],
                            "language": language, "dup_group": dup_group,
                            "true_caption": C.canonical_caption(scene) if scene["family"] == "shape" else text,
                            "text": text, "small": min(width, height) < 200,
                            "extreme_aspect": max(width, height) / min(width, height) > 3})
    root = Path(cfg.out) / "pool"
    with atomic_path(root / "metadata" / f"{shard:08d}.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(meta_rows, schema=formats.METADATA_SCHEMA), tmp)
    with atomic_path(root / "ground_truth" / f"{shard:08d}.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(gt_rows), tmp)
    return {k: noise.count(k) for k in NOISE_KINDS}


def make_curated_shard(cfg: WorldConfig, shard: int, n: int) -> dict[str, int]:
    """Clean, broad, balanced pairs: the 'web-pretraining' data of the world's reference CLIPs."""
    rng = _rng(cfg, "curated", shard)
    uids = formats.random_uids(rng, n)
    with ShardWriter(Path(cfg.out) / "curated" / "shards", shard) as writer:
        for row in range(n):
            if rng.random() < 0.2:
                scene, text = sample_off_task(rng)
            else:
                scene = sample_scene(rng, cfg, uniform=True)
                text = C.english_caption(rng, scene)
            image = encode_jpeg(render(scene, cfg.image_size, np.random.default_rng([cfg.seed, 2, shard, row])))
            meta = {"uid": uids[row], "url": f"http://curated.world.invalid/{uids[row][:12]}.jpg", "caption": text,
                    "status": "success", "width": cfg.image_size, "height": cfg.image_size,
                    "original_width": cfg.image_size * 16, "original_height": cfg.image_size * 16,
                    "sha256": hashlib.sha256(image).hexdigest()}
            writer.add(formats.sample_key(shard, row), image, text, meta)
    return {"clean": n}


# ------------------------------------------------------------------ downstream tasks
def _task_items(cfg: WorldConfig, task: str, split: str, rng: np.random.Generator) -> tuple[list[str], list[str], list[tuple[dict, Any]]]:
    """(classnames, templates, [(scene, label or captions)]) for one task split."""
    per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
    colours = list(C.COLOURS)
    items: list[tuple[dict, Any]] = []
    if task in ("shapes", "shapes_outline"):
        outline = task == "shapes_outline"
        for label, shape in enumerate(C.SHAPES):
            for _ in range(per_class):
                s = sample_scene(rng, uniform=True, count=1, style="outline" if outline else "filled",
                                 background="noise" if outline else None)
                s["shape"] = shape
                items.append((s, label))
        templates = C.OUTLINE_TASK_TEMPLATES if outline else C.SHAPE_TASK_TEMPLATES
        return C.SHAPES, templates, items
    if task == "colour_shape":
        fine = cfg.train_per_class // 4 if split == "train" else cfg.fine_test_per_class
        names = []
        for ci, colour in enumerate(colours):
            for si, shape in enumerate(C.SHAPES):
                names.append(f"{colour} {shape}")
                for _ in range(max(1, fine)):
                    s = sample_scene(rng, uniform=True, count=1, style="filled")
                    s.update(shape=shape, colour=colour)
                    items.append((s, ci * len(C.SHAPES) + si))
        return names, C.SHAPE_TASK_TEMPLATES, items
    if task == "count":
        for label, count in enumerate(C.COUNTS):
            for _ in range(per_class * 2):
                items.append((sample_scene(rng, uniform=True, count=count, style="filled"), label))
        return C.COUNT_CLASSNAMES, C.COUNT_TASK_TEMPLATES, items
    if task == "retrieval":
        n = cfg.retrieval_size if split == "test" else cfg.retrieval_size // 2
        for _ in range(n):
            s = sample_scene(rng, uniform=True, style="filled")
            items.append((s, [C.canonical_caption(s), C.english_caption(rng, s)]))
        return [], [], items
    raise ValueError(task)


def make_task(cfg: WorldConfig, index: int, task: str, kind: str) -> dict[str, int]:
    root = Path(cfg.out) / "tasks" / task
    counts = {}
    for si, split in enumerate(["train", "test"]):
        rng = _rng(cfg, "task", index, si)
        classnames, templates, items = _task_items(cfg, task, split, rng)
        order = rng.permutation(len(items))
        shards = [order[i : i + cfg.task_shard_size] for i in range(0, len(order), cfg.task_shard_size)]
        for sh, idx in enumerate(shards):
            members = []
            for j, i in enumerate(idx):
                scene, target = items[i]
                key = f"s{sh * cfg.task_shard_size + j:07d}"
                img = render(scene, cfg.image_size, np.random.default_rng([cfg.seed, 5, index, si, int(i)]))
                members.append((f"{key}.jpg", encode_jpeg(img)))
                if kind == "classification":
                    members.append((f"{key}.cls", str(target).encode()))
                else:
                    members.append((f"{key}.txt", "\n".join(target).encode()))
            write_tar(root / split / f"{sh}.tar", members)
        atomic_write_text(root / split / "nshards.txt", f"{len(shards)}\n")
        counts[split] = len(items)
    if kind == "classification":
        atomic_write_text(root / "classnames.txt", "\n".join(classnames) + "\n")
        atomic_write_text(root / "zeroshot_classification_templates.txt", "\n".join(templates) + "\n")
    atomic_write_text(root / "dataset_type.txt", f"{kind}\n")
    return counts


# ------------------------------------------------------------------ driver
def _shard_sizes(total: int, per_shard: int) -> list[int]:
    return [min(per_shard, total - i) for i in range(0, total, per_shard)]


def _pool_job(args):
    cfg, shard, n, dup_sources, first_corrupt = args
    return make_pool_shard(cfg, shard, n, dup_sources, first_corrupt)


def generate_world(cfg: WorldConfig, progress: bool = True) -> Path:
    """Write (or finish writing) the world described by cfg; returns its folder. Idempotent."""
    out = Path(cfg.out)
    resolved = yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False)
    if (out / "world.yaml").exists() and _without_runtime(yaml.safe_load((out / "world.yaml").read_text())) != _without_runtime(cfglib.to_dict(cfg)):
        raise FileExistsError(f"{out} holds a world made with another config; pick another out= or delete it")
    atomic_write_text(out / "world.yaml", resolved)
    if (out / "stats.json").exists():
        return out
    timer = Timer()
    stats: dict[str, Any] = {"splits": {}}
    dup_sources = _dup_sources(cfg)
    pool_sizes = _shard_sizes(cfg.pool_size, cfg.samples_per_shard)
    # Corrupt kinds cycle across the whole pool; each shard starts where the previous left off,
    # which needs each shard's plan. The plan is cheap (no rendering), so compute it up front.
    firsts, running = [], 0
    for shard, n in enumerate(pool_sizes):
        firsts.append(running)
        running += _noise_plan(cfg, _rng(cfg, "pool", shard), n).count("corrupt")
    jobs = [(cfg, s, n, dup_sources, firsts[s]) for s, n in enumerate(pool_sizes)]
    with timer("pool"):
        counts = _run_jobs(_pool_job, jobs, cfg.workers, out / "pool" / "shards", progress, "pool shards")
    stats["splits"]["pool"] = _sum_counts(counts)
    with timer("curated"):
        cur_jobs = [(cfg, s, n) for s, n in enumerate(_shard_sizes(cfg.curated_size, cfg.samples_per_shard))]
        counts = _run_jobs(_curated_job, cur_jobs, cfg.workers, out / "curated" / "shards", progress, "curated shards")
    stats["splits"]["curated"] = _sum_counts(counts)
    with timer("tasks"):
        stats["tasks"] = {name: make_task(cfg, i, name, kind) for i, (name, kind, _, _) in enumerate(TASKS)}
    atomic_write_text(out / "tasks.yaml", yaml.safe_dump(
        [{"name": n, "path": f"tasks/{n}", "type": k, "main_metric": m, "group": g} for n, k, g, m in TASKS],
        sort_keys=False))
    total = cfg.pool_size + cfg.curated_size + sum(sum(v.values()) for v in stats["tasks"].values())
    stats["timings_s"] = timer.as_dict()
    stats["pairs_per_s"] = round(total / max(1e-9, sum(timer.seconds.values())), 1)
    # stats.json last: its presence marks a finished world.
    write_json(out / "stats.json", stats)
    return out


def _curated_job(args):
    return make_curated_shard(*args)


def _run_jobs(fn, jobs, workers, shard_dir: Path, progress: bool, desc: str) -> list[dict[str, int]]:
    """Run shard jobs, skipping shards already on disk (a killed run resumes here)."""
    from tqdm import tqdm

    done_file = shard_dir / ".counts.json"
    done = read_json(done_file) if done_file.exists() else {}
    todo = [j for j in jobs if str(j[1]) not in done or not (shard_dir / formats.shard_name(j[1])).exists()]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="shard", disable=not progress)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for job, result in zip(todo, pool.map(fn, todo)):
                done[str(job[1])] = result
                write_json(done_file, done)
                bar.update()
    else:
        for job in todo:
            done[str(job[1])] = fn(job)
            write_json(done_file, done)
            bar.update()
    bar.close()
    return [done[str(j[1])] for j in jobs]


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _without_runtime(d: dict) -> dict:
    """Config keys that do not change the output (so a resumed run may change them; `out` too: a world
    copied or moved to another folder is the same world)."""
    return {k: v for k, v in d.items() if k not in ("workers", "out")}


def load_ground_truth(world: str | Path) -> pa.Table:
    """What each pool example really is, in pool order (one parquet per shard beside the metadata)."""
    parts = sorted((Path(world) / "pool" / "ground_truth").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])
