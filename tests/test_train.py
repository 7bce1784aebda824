"""clipsift train on the ci world: checkpoints, skips, subsets with repeats, exact resume, DDP."""
from __future__ import annotations

import collections
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipsift import cli, config, formats, shards
from clipsift.runlog import read_json
from clipsift.training import TrainConfig, checkpoint, train
from clipsift.training.data import NOT_IN_SUBSET, MemoryData, StreamData, SubsetWeights, find_shards
from clipsift.training.loop import cosine_lr
from clipsift.training.reference import ensure_reference_models
from clipsift.world.generate import load_ground_truth

REPO = Path(__file__).resolve().parent.parent
# Small and quick; one thread so results do not depend on the machine's load.
QUICK = ["progress=false", "threads=1", "batch_size=32", "samples_seen=320", "warmup=2", "log_every=1",
         "checkpoint_every=3"]


def make_cfg(out: Path, *overrides: str, preset: str = "ci") -> TrainConfig:
    return config.load(TrainConfig, config.preset_path("train", preset), [f"out={out}", *QUICK, *overrides])


def weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(checkpoint.latest_path(run))["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def few(ci_world, tmp_path_factory) -> dict:
    """A subset of 200 curated uids from all shards (each once), so each run decodes only what it trains on."""
    uids = [rec.uid for shard in find_shards(ci_world / "curated") for rec in shards.read_shard(shard)
            if isinstance(rec, shards.Sample)][::15][:200]
    path = tmp_path_factory.mktemp("few") / "few.npy"
    formats.write_subset(path, uids)
    return {"shards": ci_world / "curated" / "shards", "subset": path, "uids": uids}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def few_data(few) -> list[str]:
    return [f"data.shards={few['shards']}", f"data.subset={few['subset']}"]


def test_schedule_is_warmup_then_cosine_to_zero():
    lrs = [cosine_lr(s, 1e-3, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-6
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_scale_presets_are_datacomps_fixed_compute():
    for name, samples in (("small", 12_800_000), ("medium", 128_000_000)):
        cfg = config.load(TrainConfig, config.preset_path("train", name))
        assert (cfg.model, cfg.batch_size, cfg.lr, cfg.warmup, cfg.samples_seen) == ("ViT-B-32", 4096, 5e-4, 500, samples)
        assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.wd) == (0.9, 0.98, 1e-6, 0.2)
        assert open_clip.get_model_config(cfg.model)["vision_cfg"]["image_size"] == 224


def test_run_writes_open_clip_checkpoint_config_and_stats(ci_world, tmp_path):
    run = train(make_cfg(tmp_path / "run", f"data.shards={ci_world / 'pool'}"))  # a pool folder works
    ckpt = checkpoint.latest_path(run)
    state = checkpoint.load(ckpt)
    assert {"state_dict", "optimizer", "epoch", "step", "name"} <= set(state) and state["step"] == 10
    # Stock open_clip reads it (the architecture is registered by importing clipsift.training).
    model, _, preprocess = open_clip.create_model_and_transforms("world-rn-s", pretrained=str(ckpt))
    assert_same_weights(model.state_dict(), state["state_dict"])
    assert open_clip.get_tokenizer("world-rn-s")(["a red star"]).shape == (1, 20)
    # Weight decay on matrices only.
    groups = state["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]

    stats = read_json(run / "stats.json")
    assert stats["done"] and stats["samples_seen"] == 320 and stats["steps"] == 10
    assert [row["step"] for row in stats["log"]] == list(range(1, 11))
    assert stats["log"][0]["lr"] == pytest.approx(1e-3) and stats["log"][1]["lr"] == pytest.approx(2e-3)
    assert config.load(TrainConfig, run / "config.yaml") == make_cfg(run, f"data.shards={ci_world / 'pool'}")
    assert "loss" in (run / "train.log").read_text()
    # Every planted corrupt pool sample is counted under its reason; nothing else is lost.
    gt = load_ground_truth(ci_world).to_pandas()
    kinds = gt.corrupt_kind.value_counts()
    records = stats["data"]["records"]
    assert records["dropped"] == {shards.CORRUPT_IMAGE: kinds["truncated_jpeg"], shards.MISSING_TEXT: kinds["missing_caption"],
                                  shards.BAD_JSON: kinds["malformed_json"]}
    assert records["seen"] == len(gt) and records["kept"] == len(gt) - kinds[["truncated_jpeg", "missing_caption", "malformed_json"]].sum()


def test_stream_mode_counts_undecodable_images_without_crashing(tmp_path):
    """Garbage and truncated JPEGs in shards without stats files: counted, skipped, said."""
    folder = tmp_path / "shards"

    def damage(shard, row, data, rng):
        if row == 3:
            return data[: len(data) // 2]  # truncated
        return b"not an image at all" if row == 5 else data

    _write_jpeg_shards(folder, (32, 32), damage)
    (folder / formats.stats_name(1)).unlink()
    run = train(make_cfg(tmp_path / "run", f"data.shards={folder}", "data.mode=stream", "data.workers=2",
                         "data.shuffle_buffer=4", "samples_seen=64"))
    stats = read_json(run / "stats.json")
    assert stats["done"] and stats["data"]["mode"] == "stream"
    assert stats["data"]["shards_without_stats"] == ["00000001.tar"]
    assert stats["data"]["records"]["dropped"] == {shards.CORRUPT_IMAGE: 4}  # both shards read once each
    assert stats["data"]["records"]["kept"] == 76


def test_subset_repeats_set_how_often_each_uid_is_seen(few, tmp_path):
    """A uid listed k times is seen k times as often; unlisted uids never; absent uids are counted."""
    uids = few["uids"][::3][:60]
    reps = {u: 1 + i % 3 for i, u in enumerate(uids)}
    absent = "0" * 31 + "7"
    path = tmp_path / "subset.npy"
    formats.write_subset(path, [u for u, k in reps.items() for _ in range(k)] + [absent])
    subset = SubsetWeights(path)
    paths = find_shards(few["shards"])
    per_pass = sum(reps.values())  # 120
    memory = MemoryData(paths, 32, "world-rn-s", subset, batch_size=40, seed=3)
    stream = StreamData(paths, 32, "world-rn-s", subset, batch_size=40, seed=3, workers=2, shuffle_buffer=8)
    for data in (memory, stream):
        seen = collections.Counter()
        batches = data.batches(0)
        for _ in range(5 * per_pass // 40):  # exactly five passes over the selected multiset
            seen.update(next(batches).uids)
        batches.close()
        assert set(seen) == set(reps)
        if data is memory:  # whole passes: exact multiples
            assert seen == collections.Counter({u: 5 * k for u, k in reps.items()})
        else:  # shard-level passes, a shuffle buffer carried across them: close to it
            for u, k in reps.items():
                assert abs(seen[u] - 5 * k) <= 2 * k, (u, seen[u], k)
    assert memory.subset_missing == 1
    assert memory.counts.dropped[NOT_IN_SUBSET] == memory.counts.seen - 60


def test_decode_cache_gives_what_decoding_gives(ci_world, tmp_path):
    """The compare's decode cache: a shard decoded once, then selected per subset, with the same
    samples, pixels, texts, weights and skip counts (planted corrupt records included)."""
    from clipsift.training.data import decode_shard

    path = find_shards(ci_world / "pool" / "shards")[0]
    records = [r for r in shards.read_shard(path) if isinstance(r, shards.Sample)]
    subset_path = tmp_path / "subset.npy"
    formats.write_subset(subset_path, [r.uid for r in records[::4] for _ in range(2)] + [r.uid for r in records[1::4]])
    cache = tmp_path / "cache"
    for subset in (None, SubsetWeights(subset_path), None):
        plain, cached = decode_shard(path, 32, subset), decode_shard(path, 32, subset, cache)
        assert cached.uids == plain.uids and cached.texts == plain.texts
        assert np.array_equal(cached.images, plain.images) and np.array_equal(cached.weights, plain.weights)
        assert cached.counts == plain.counts and np.array_equal(np.sort(cached.subset_hits), np.sort(plain.subset_hits))
        assert sum(plain.counts["dropped"].values()) > 0  # the shard's corrupt records are in the test
    assert [p.name for p in cache.iterdir()] == [f"{path.stem}-32px.npz"]
    # A shard rewritten in place is decoded again, not served from the stale cache.
    copy = tmp_path / "shards" / path.name
    copy.parent.mkdir()
    shutil.copy(path, copy)
    entry = cache / f"{path.stem}-32px.npz"
    source = lambda: str(np.load(entry)["source"])  # noqa: E731
    first = decode_shard(copy, 32, None, cache)
    before = source()
    assert str(copy.resolve()) in before
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert decode_shard(copy, 32, None, cache).uids == first.uids and source() != before


def test_same_seed_same_weights_other_seed_differs(few, tmp_path):
    a = train(make_cfg(tmp_path / "a", *few_data(few), "samples_seen=96"))
    b = train(make_cfg(tmp_path / "b", *few_data(few), "samples_seen=96"))
    c = train(make_cfg(tmp_path / "c", *few_data(few), "samples_seen=96", "seed=1"))
    assert_same_weights(weights(a), weights(b))
    assert not torch.equal(weights(a)["text_projection"], weights(c)["text_projection"])


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_stop_and_resume_gives_the_uninterrupted_weights(few, tmp_path, mode):
    extra = [*few_data(few), f"data.mode={mode}", "data.workers=2", "data.shuffle_buffer=32"]
    whole = train(make_cfg(tmp_path / "whole", *extra))
    part = make_cfg(tmp_path / "part", *extra, "stop_after_steps=4")
    train(part)
    assert read_json(part.out + "/stats.json")["done"] is False
    assert checkpoint.load(checkpoint.latest_path(part.out))["step"] == 4
    with pytest.raises(FileExistsError, match="resume=latest"):
        train(make_cfg(tmp_path / "part", *extra))  # a checkpoint is never silently overwritten
    with pytest.raises(ValueError, match="lr"):
        train(make_cfg(tmp_path / "part", *extra, "lr=1e-3", "resume=latest"))
    train(make_cfg(tmp_path / "part", *extra, "resume=latest"))
    assert_same_weights(weights(whole), weights(Path(part.out)))
    s_whole, s_part = read_json(Path(whole) / "stats.json"), read_json(Path(part.out) / "stats.json")
    assert s_part["done"] and s_part["resumed_at_step"] == 4
    assert [(r["step"], r["loss"]) for r in s_part["log"]] == [(r["step"], r["loss"]) for r in s_whole["log"]]


def test_killed_cli_run_resumes_to_the_uninterrupted_weights(few, tmp_path):
    args = ["-p", "ci", *QUICK, *few_data(few), "samples_seen=640", "checkpoint_every=2"]
    whole = tmp_path / "whole"
    assert cli.main(["train", *args, f"out={whole}"]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipsift", "train", *args, f"out={killed}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = checkpoint.latest_path(killed)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and checkpoint.load(ckpt)["step"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint.load(ckpt)["step"]
    assert 4 <= step < 20
    assert cli.main(["train", *args, f"out={killed}", "--resume", "latest"]) == 0
    assert read_json(killed / "stats.json")["resumed_at_step"] == step
    assert_same_weights(weights(whole), weights(killed))


def test_two_process_gloo_ddp_matches_one_process(few, tmp_path):
    """torchrun, 2 CPU ranks of 16: the loss over the global batch of 32 and the weights match
    (batch_norm=global: one formula for both; auto would use torch's fused kernel in one process)."""
    args = ["-p", "ci", *QUICK, *few_data(few), "samples_seen=160", "data.workers=0", "batch_norm=global"]
    single = tmp_path / "single"
    assert cli.main(["train", *args, f"out={single}"]) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "clipsift", "train", *args,
                           f"out={ddp}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    s1, s2 = read_json(single / "stats.json"), read_json(ddp / "stats.json")
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    np.testing.assert_allclose([r["loss"] for r in s2["log"]], [r["loss"] for r in s1["log"]], rtol=1e-5)
    assert_same_weights(weights(single), weights(ddp), atol=2e-4)


@pytest.mark.slow
def test_ci_training_on_the_world_lifts_zero_shot_accuracy_well_above_chance(ci_world, tmp_path):
    from clipsift.eval import ModelSpec, evaluate

    cfg = config.load(TrainConfig, config.preset_path("train", "ci"),
                      [f"data.shards={ci_world / 'curated'}", f"out={tmp_path / 'run'}", "progress=false"])
    run = train(cfg)
    trained = evaluate(ModelSpec("world-rn-s", str(run)), ci_world / "tasks.yaml", tmp_path / "eval", device="cpu")
    untrained = evaluate(ModelSpec("world-rn-s", ""), ci_world / "tasks.yaml", tmp_path / "eval0", device="cpu")
    acc = {r["name"]: r["value"] for r in trained["tasks"]}
    acc0 = {r["name"]: r["value"] for r in untrained["tasks"]}
    classes = {t: len(_lines(ci_world / "tasks" / t / "classnames.txt")) for t in ("shapes", "colour_shape")}
    print(json.dumps({"trained": acc, "untrained": acc0}, indent=1))
    # Chance: 1/10 shapes, 1/80 colour_shape, 1/200 retrieval; the untrained model sits at it.
    assert acc["shapes"] >= 1.5 / classes["shapes"]
    assert acc["colour_shape"] >= 10 / classes["colour_shape"]
    assert acc["retrieval"] >= 0.08 and acc0["retrieval"] < 0.03
    assert trained["average"] >= untrained["average"] + 0.1


@pytest.mark.parametrize("override, error, match", [
    ("data.shards=/nonexistent/shards", FileNotFoundError, "data.shards"),
    ("model=no-such-model", ValueError, "unknown model"),
    ("samples_seen=10", ValueError, "less than one batch"),
    ("log_every=0", ValueError, "log_every"),
])
def test_bad_config_fails_before_training_with_a_clear_error(few, tmp_path, override, error, match):
    with pytest.raises(error, match=match):
        train(make_cfg(tmp_path / "run", *few_data(few), override))
    assert not checkpoint.latest_path(tmp_path / "run").exists()


def test_reference_models_are_trained_once_then_reused(ci_world, few, tmp_path, capsys):
    world = tmp_path / "world"  # a private view of the ci world: models/ is written next to curated/
    world.mkdir()
    (world / "curated").symlink_to(ci_world / "curated")
    shutil.copy(ci_world / "world.yaml", world / "world.yaml")
    quick = ["threads=1", "samples_seen=64", "batch_size=32", "warmup=1", f"data.subset={few['subset']}"]
    models = ensure_reference_models(world, quick)
    assert [(m.name, m.arch) for m in models] == [("b32", "world-rn-s"), ("l14", "world-rn-l")]
    for m in models:
        assert m.checkpoint == world / "models" / m.name / "checkpoints" / "epoch_latest.pt"
        model, _, _ = open_clip.create_model_and_transforms(m.arch, pretrained=str(m.checkpoint))
        assert read_json(m.checkpoint.parent.parent / "stats.json")["done"]
    stamps = [m.checkpoint.stat().st_mtime_ns for m in models]
    # Same config: reused, through the CLI too.
    assert cli.main(["train", "--reference-models", str(world), *quick]) == 0
    assert json.loads(capsys.readouterr().out)["l14"]["arch"] == "world-rn-l"
    assert [m.checkpoint.stat().st_mtime_ns for m in models] == stamps
    # Another budget: retrained.
    again = ensure_reference_models(world, [*quick, "samples_seen=96"])
    assert checkpoint.load(again[0].checkpoint)["step"] == 3


def test_decoding_matches_open_clips_eval_preprocessing():
    """Training sees what eval sees: resize shortest side + centre crop, within one grey level."""
    from clipsift.training.data import decode_image

    _, _, preprocess = open_clip.create_model_and_transforms("world-rn-s")
    rng = np.random.default_rng(0)
    pixels = (np.linspace(0, 255, 48 * 40 * 3).reshape(40, 48, 3) + rng.normal(0, 20, (40, 48, 3))).clip(0, 255)
    for fmt in ("JPEG", "PNG", "BMP"):  # BMP: torchvision cannot decode it, PIL does
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, fmt)
        ours = decode_image(buf.getvalue(), 32).astype(np.float32) / 255
        norm = preprocess.transforms[-1]
        theirs = preprocess(Image.open(io.BytesIO(buf.getvalue()))).numpy() * np.array(norm.std)[:, None, None] \
            + np.array(norm.mean)[:, None, None]
        assert ours.shape == (3, 32, 32)
        np.testing.assert_allclose(ours, theirs, atol=1.01 / 255)
    with pytest.raises(Exception):
        decode_image(buf.getvalue()[:60], 32)


def test_open_clip_loads_a_run_by_local_dir_in_a_process_without_clipsift(few, tmp_path):
    """Issue 22, item 11: clip_benchmark / DataComp's evaluate.py never import clipsift, so the world's
    architecture names are unknown there; `local-dir:<run>/checkpoints` must still build the model and
    load the run's latest weights (the same embeddings as in this process)."""
    run = tmp_path / "run"
    quick = [f"data.shards={few['shards']}", f"data.subset={few['subset']}", "samples_seen=96"]
    train(make_cfg(run, *quick, "stop_after_steps=2"))
    folder = checkpoint.latest_path(run).parent
    assert json.loads((folder / checkpoint.OPEN_CLIP_CONFIG).read_text())["model_cfg"] == \
        open_clip.get_model_config("world-rn-s")
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(2, 3, 32, 32)).astype(np.float32))
    torch.save(image, tmp_path / "image.pt")
    script = f"""
import sys, torch, open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")
tokens = open_clip.get_tokenizer("local-dir:{folder}")(["a red square", "two blue circles"])
model.eval()
with torch.no_grad():
    out = {{"img": model.encode_image(torch.load("{tmp_path / 'image.pt'}")), "txt": model.encode_text(tokens),
           "tokens": tokens, "size": preprocess.transforms[0].size}}
assert not any(m == "clipsift" or m.startswith("clipsift.") for m in sys.modules), "clipsift was imported"
torch.save(out, "{tmp_path / 'out.pt'}")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "out.pt")
    model, _, preprocess = open_clip.create_model_and_transforms("world-rn-s", pretrained=str(checkpoint.latest_path(run)))
    model.eval()
    tokens = open_clip.get_tokenizer("world-rn-s")(["a red square", "two blue circles"])
    with torch.no_grad():
        assert torch.equal(theirs["img"], model.encode_image(image))
        assert torch.equal(theirs["txt"], model.encode_text(tokens))
    assert torch.equal(theirs["tokens"], tokens) and theirs["size"] == preprocess.transforms[0].size
    # the weights link follows the latest checkpoint: after a resume, the final weights
    train(make_cfg(run, *quick, "resume=latest"))
    final, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert checkpoint.load(checkpoint.latest_path(run))["step"] == 3
    assert_same_weights(final.state_dict(), weights(run))


# ---------------------------------------------------------------- image_decode=device (issue 23)
def _stream_batches(paths, size, n, decode, subset=None, state=None, start=0, **kw):
    data = StreamData(paths, size, "world-rn-s", subset, batch_size=48, seed=5, workers=2, shuffle_buffer=64,
                      image_decode=decode, device=torch.device("cpu"), **kw)
    if state is not None:
        data.load_state(state)
    batches, out, states = data.batches(start), [], []
    for _ in range(n):
        out.append(next(batches))
        states.append(data.state())
    batches.close()
    return out, states, data


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")  # per call, in threads
@pytest.mark.parametrize("size", [32, 24])
def test_device_decoded_stream_gives_the_cpu_streams_batches(ci_world, size):
    """The device path run on the CPU (torchvision's decode_jpeg on CPU tensors: the same code
    nvJPEG runs on a GPU): the pool's stream, planted truncated JPEGs and all, gives the CPU path's
    batches: the same samples in the same order, the same tokens, pixels equal to the last bit (both
    decode with libjpeg and resize with the same function; on a GPU nvJPEG's IDCT differs by
    rounding), and the same record counts."""
    paths = find_shards(ci_world / "pool" / "shards")
    cpu, _, cpu_data = _stream_batches(paths, size, 70, "cpu")  # 3360 samples: more than a pass (3000)
    dev, _, dev_data = _stream_batches(paths, size, 70, "device")
    for a, b in zip(cpu, dev):
        assert a.uids == b.uids and torch.equal(a.tokens, b.tokens)
        assert b.images.shape == (48, 3, size, size) and torch.equal(a.images, b.images)
    assert dev_data.counts.as_dict() == cpu_data.counts.as_dict()
    assert dev_data.counts.dropped[shards.CORRUPT_IMAGE] > 0  # the truncated JPEGs, caught in the workers


def _write_jpeg_shards(folder: Path, shape: tuple[int, int], damage=lambda shard, row, data, rng: data) -> None:
    """Two shards of 40 random-pixel JPEGs (uid = shard, row); damage(shard, row, jpeg, rng) may spoil one."""
    rng = np.random.default_rng(0)
    for shard in range(2):
        with shards.ShardWriter(folder, shard) as w:
            for row in range(40):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(buf, "JPEG")
                w.add(formats.sample_key(shard, row), damage(shard, row, buf.getvalue(), rng), f"picture {row}",
                      {"uid": f"{shard:016x}{row:016x}", "status": "success"})


def _shards_with_a_jpeg_only_the_decoder_refuses(folder: Path) -> str:
    """Two shards of 40 JPEGs; one record is a complete JPEG with a readable header (its size, within
    the pixel limit) but without its quantization tables: no decoder can decode it."""
    def damage(shard, row, data, rng):
        if (shard, row) != (1, 7):
            return data
        out, i = bytearray(data[:2]), 2
        while data[i + 1] != 0xDA:  # the segments before the scan (SOS), less the DQT ones
            n = 2 + int.from_bytes(data[i + 2:i + 4], "big")
            out += data[i:i + n] if data[i + 1] != 0xDB else b""
            i += n
        return bytes(out + data[i:])

    _write_jpeg_shards(folder, (40, 30), damage)
    return f"{1:016x}{7:016x}"


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")  # per call, in threads
def test_device_decode_fills_the_place_of_an_image_only_the_decoder_refuses_and_resumes_exactly(tmp_path):
    """A JPEG that passes the workers' checks (complete, header within the pixel limit) but will not
    decode: dropped and counted in the training process, the next samples move up so every batch
    stays full, and a stream restarted from any batch's state() continues with exactly the batches
    that followed."""
    folder = tmp_path / "shards"
    bad = _shards_with_a_jpeg_only_the_decoder_refuses(folder)
    paths = find_shards(folder)
    cpu, _, cpu_data = _stream_batches(paths, 32, 8, "cpu")
    dev, states, dev_data = _stream_batches(paths, 32, 8, "device")
    cpu_uids = [u for b in cpu for u in b.uids]
    dev_uids = [u for b in dev for u in b.uids]
    assert all(len(b.uids) == 48 and b.images.shape[0] == 48 and b.tokens.shape[0] == 48 for b in dev)
    assert bad not in cpu_uids and bad not in dev_uids
    assert cpu_data.counts.dropped[shards.CORRUPT_IMAGE] > 0  # the CPU path refuses it in the workers
    # Here it is dropped when its batch is decoded (counted per use, the workers' reads per read).
    assert dev_data.counts.dropped[shards.CORRUPT_IMAGE] >= 1
    assert dev_data.counts.seen == dev_data.counts.kept + sum(dev_data.counts.dropped.values())
    assert any(s["resume_at"][1] for s in states), "a drop leaves later batches starting inside a raw batch"
    for j in (1, 3, 6):  # resumed at odd and even steps (the DataLoader always asks worker 0 first)
        rest, _, _ = _stream_batches(paths, 32, 8 - j - 1, "device", state=states[j], start=j + 1)
        for a, b in zip(dev[j + 1:], rest, strict=True):
            assert a.uids == b.uids and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
        rest, _, _ = _stream_batches(paths, 32, 8 - j - 1, "cpu", start=j + 1)  # the CPU path: from the step
        for a, b in zip(cpu[j + 1:], rest, strict=True):
            assert a.uids == b.uids and torch.equal(a.images, b.images)


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")  # per call, in threads
def test_device_decoded_stream_trains_and_resumes_to_the_uninterrupted_weights(few, tmp_path):
    """train() with data.image_decode=device (its CPU run): stop and resume reach the same weights,
    and stats say where the images were decoded."""
    extra = [*few_data(few), "data.mode=stream", "data.workers=2", "data.shuffle_buffer=32", "data.image_decode=device"]
    whole = train(make_cfg(tmp_path / "whole", *extra))
    part = make_cfg(tmp_path / "part", *extra, "stop_after_steps=4")
    train(part)
    train(make_cfg(tmp_path / "part", *extra, "resume=latest"))
    assert_same_weights(weights(whole), weights(Path(part.out)))
    stats = read_json(Path(whole) / "stats.json")
    assert stats["data"]["image_decode"] == "device" and stats["data"]["decode_thread_s"] > 0


def test_image_decode_auto_is_cpu_decoding_and_device_is_opt_in():
    from clipsift.training.data import resolve_image_decode

    assert resolve_image_decode("auto", torch.device("cuda", 0)) == "cpu"  # measured faster on an H100 (16 cores)
    assert resolve_image_decode("auto", torch.device("cpu")) == "cpu"
    assert resolve_image_decode("cpu", torch.device("cuda", 0)) == "cpu"
    assert resolve_image_decode("device", torch.device("cuda", 0)) == "device"
    with pytest.raises(ValueError, match="data.image_decode"):
        resolve_image_decode("gpu", None)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on the GPU machine)")


@CUDA
def test_cuda_steps_never_wait_for_the_gpu(tmp_path):
    """Between log rows a step queues work and returns: any host sync inside it raises here."""
    from clipsift.training.loop import Stepper

    cfg = make_cfg(tmp_path / "run", "device=cuda", "batch_size=64")
    device = torch.device("cuda", 0)
    stepper = Stepper(cfg, device)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=device)
    tokens = open_clip.get_tokenizer("world-rn-s")([f"a red square {i}" for i in range(64)]).to(device)
    stepper.step(images, tokens, 1e-3)  # first step: lazy initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = stepper.step(images, tokens, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


@CUDA
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
def test_cuda_decoded_stream_matches_the_cpu_path_within_rounding(ci_world):
    """nvJPEG on the GPU: the same samples in the same order as image_decode=cpu, pixels close but
    not bit-equal: nvJPEG's IDCT and chroma upsampling differ from libjpeg's, and the resize runs
    on the device. Measured on an H100 (commit 93bcac4, 1.66M values): mean |diff| 1.30, median 1,
    99th percentile 13, max 64 (sharp saturated edges of 32 px shapes), 0.036% above 32. A swapped
    channel, a shifted crop or another sample would put the mean far above these bounds."""
    paths = find_shards(ci_world / "pool" / "shards")
    cpu, _, _ = _stream_batches(paths, 24, 20, "cpu")
    data = StreamData(paths, 24, "world-rn-s", None, batch_size=48, seed=5, workers=2, shuffle_buffer=64,
                      image_decode="device", device=torch.device("cuda", 0))
    batches = data.batches(0)
    diffs = []
    for a in cpu:
        b = next(batches)
        assert b.images.device.type == "cuda" and a.uids == b.uids
        diffs.append((a.images.int() - b.images.cpu().int()).abs().float().flatten())
    batches.close()
    diff = torch.cat(diffs)
    assert diff.mean() < 2.0 and (diff > 16).float().mean() < 0.01 and (diff > 32).float().mean() < 0.001, \
        (diff.mean(), (diff > 16).float().mean(), (diff > 32).float().mean())


def test_reference_models_are_the_same_run_by_relative_or_absolute_world_path(ci_world, monkeypatch):
    """A world named relatively (compare's default out) and absolutely is one world: its reference
    models' configs are equal, so neither call sees the other's models as stale and retrains them."""
    from clipsift.training.reference import reference_config

    monkeypatch.chdir(ci_world.parent)
    for name in ("b32", "l14"):
        assert config.to_dict(reference_config(ci_world.name, name)) == config.to_dict(reference_config(ci_world, name))
