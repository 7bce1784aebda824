"""The Ray pipeline on the ci world: shard mode, metadata mode, resume, bad input, output format.

One local Ray session and one full shard-mode run are shared by the module. The two embedding
models are real open_clip models with random weights saved to disk: world-rn-s as a checkpoint
file (the "b32" role) and a tiny ViT as a `local-dir:` folder with its own preprocessing
(squash-resize to 24 px, other mean/std, context 16: the "l14" role), so the run exercises two
image preprocessings and two tokenizers.
"""
from __future__ import annotations

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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipsift import formats, shards
from clipsift.eval.models import ModelSpec
from clipsift.pipeline.config import EmbedConfig, RayConfig, ScoreConfig
from clipsift.pipeline.heads import HeadError, HeadSpec, build_heads
from hostile_images import png_claiming

TINY_VIT = {
    "model_cfg": {"embed_dim": 48, "vision_cfg": {"image_size": 24, "layers": 1, "width": 32, "patch_size": 8,
                                                  "head_width": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
                       "resize_mode": "squash"},
}
SCORES = ["clip_b32_similarity_score", "clip_l14_similarity_score"]
EMBEDDINGS = ["b32_img", "b32_txt", "l14_img", "l14_txt"]
# what read_shard / the decode stage report for each kind of damage the world plants
CORRUPT_REASON = {"truncated_jpeg": shards.CORRUPT_IMAGE, "missing_caption": shards.MISSING_TEXT,
                  "malformed_json": shards.BAD_JSON}


def quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, ModelSpec]:
    import open_clip

    import clipsift.training  # noqa: F401  (registers world-rn-s)

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    ckpt = root / "world-rn-s.pt"
    torch.save({"state_dict": open_clip.create_model("world-rn-s").state_dict()}, ckpt)
    vit = root / "tiny-vit"
    vit.mkdir()
    (vit / "open_clip_config.json").write_text(json.dumps(TINY_VIT))
    torch.manual_seed(2)
    state = open_clip.create_model(f"local-dir:{vit}").state_dict()
    torch.save(state, vit / "open_clip_pytorch_model.bin")
    return {"b32": ModelSpec("world-rn-s", str(ckpt)), "l14": ModelSpec(f"local-dir:{vit}", "")}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()  # another module's session is used as is
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def embed_config(shards_dir: Path, out: Path, models: dict[str, ModelSpec], **kw) -> EmbedConfig:
    args = dict(input=str(shards_dir), out=str(out), models=models, batch_size=128, progress=False,
                ray=RayConfig(num_cpus=2))
    args.update(kw)
    return EmbedConfig(**args)


@pytest.fixture(scope="module")
def embedded(ci_world, models, ray_local, tmp_path_factory):
    from clipsift.pipeline.embed import run_embed

    out = tmp_path_factory.mktemp("embed")
    cfg = embed_config(ci_world / "pool" / "shards", out, models)
    return cfg, run_embed(cfg, echo=quiet)


def output_tables(out: Path) -> tuple[pa.Table, dict[str, np.ndarray]]:
    files = sorted((Path(out) / "metadata").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    arrays: dict[str, list[np.ndarray]] = {}
    for f in files:
        with np.load(f.with_suffix(".npz"), allow_pickle=False) as z:
            for k in z.files:
                arrays.setdefault(k, []).append(z[k])
    return table, {k: np.concatenate(v) for k, v in arrays.items()}


def markers(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((Path(out) / "done").glob("*.json"))}


# ---------------------------------------------------------------- shard mode on the world
def test_stage_profile_orders_the_start_up(embedded):
    """The run's stats say when each stage started: a chunk is read before it is decoded, the model
    actor is ready (after a constructor that took time) before its first chunk, all within the run."""
    _, stats = embedded
    run = stats["run"]
    model, decode = run["model"], run["decode"]
    assert model["setup_s"] > 0
    assert 0 <= run["first_chunk_read_s"] <= decode["first_start_s"] < run["wall_s"]
    assert 0 <= model["ready_s"] <= model["first_start_s"] < run["wall_s"]
    assert 0 < model["busy_fraction"] <= 1 and model["busy_s"] > 0


def test_every_valid_sample_once_in_pool_order(ci_world, embedded):
    from clipsift.world.generate import load_ground_truth

    cfg, stats = embedded
    gt = load_ground_truth(ci_world)
    valid = [u for u, noise in zip(gt.column("uid").to_pylist(), gt.column("noise").to_pylist()) if noise != "corrupt"]
    table, arrays = output_tables(cfg.out)
    assert table.column("uid").to_pylist() == valid  # each exactly once, in tar order, shard by shard
    # the DataComp columns come from the sample json / caption and match the world's own metadata
    world_meta = pa.concat_tables([pq.read_table(f) for f in sorted((ci_world / "pool" / "metadata").glob("*.parquet"))])
    by_uid = {r["uid"]: r for r in world_meta.to_pylist()}
    for row in table.select(formats.METADATA_COLUMNS).to_pylist():
        assert row == by_uid[row["uid"]]
    assert stats["totals"]["rows_out"] == len(valid) and stats["totals"]["rows_in"] == gt.num_rows
    for k in EMBEDDINGS:
        assert arrays[k].shape[0] == len(valid)


def test_embeddings_and_scores_equal_plain_open_clip(ci_world, models, embedded):
    """Each model + its own open_clip preprocess, no Ray, on every decodable sample of the pool."""
    import open_clip

    cfg, _ = embedded
    table, arrays = output_tables(cfg.out)
    images, texts, uids = [], [], []
    for path in formats.list_shards(ci_world / "pool" / "shards"):
        for rec in shards.read_shard(path):
            if isinstance(rec, shards.Sample):
                try:
                    img = Image.open(io.BytesIO(rec.image))
                    img.load()
                except OSError:
                    continue
                images.append(img)
                texts.append(rec.text)
                uids.append(rec.uid)
    assert uids == table.column("uid").to_pylist()
    for name, spec in models.items():
        model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=spec.pretrained or None)
        model.eval()
        tokenizer = open_clip.get_tokenizer(spec.arch)
        with torch.no_grad():
            img = torch.cat([model.encode_image(torch.stack([preprocess(i) for i in images[s:s + 256]]))
                             for s in range(0, len(images), 256)])
            txt = torch.cat([model.encode_text(tokenizer(texts[s:s + 256])) for s in range(0, len(texts), 256)])
        img, txt = (torch.nn.functional.normalize(z, dim=-1).numpy() for z in (img, txt))
        assert arrays[f"{name}_img"].dtype == np.float16
        np.testing.assert_allclose(arrays[f"{name}_img"].astype(np.float32), img, atol=1e-3, rtol=0)
        np.testing.assert_allclose(arrays[f"{name}_txt"].astype(np.float32), txt, atol=1e-3, rtol=0)
        cosine = (img * txt).sum(1)
        column = {"b32": SCORES[0], "l14": SCORES[1]}[name]
        np.testing.assert_allclose(table.column(column).to_numpy(), cosine, atol=2e-3, rtol=0)


def test_planted_corrupt_samples_reported_by_reason(ci_world, embedded):
    from clipsift.world.generate import load_ground_truth

    cfg, stats = embedded
    gt = load_ground_truth(ci_world).to_pylist()
    expected = {r["key"]: CORRUPT_REASON[r["corrupt_kind"]] for r in gt if r["noise"] == "corrupt"}
    assert expected  # the ci world plants some
    reported = {s["key"]: s["reason"] for m in markers(cfg.out).values() for s in m["skips"]}
    assert reported == expected
    want_totals: dict[str, int] = {}
    for reason in expected.values():
        want_totals[reason] = want_totals.get(reason, 0) + 1
    assert stats["totals"]["skipped"] == dict(sorted(want_totals.items()))
    for m in stats["shards"].values():  # nothing unaccounted for
        assert m["rows_in"] == m["rows_out"] + sum(m["skipped"].values())
        assert set(m["timings"]) == {"read", "decode", "model", "write"}


def test_output_is_plain_datacomp_metadata(embedded):
    cfg, _ = embedded
    files = sorted((Path(cfg.out) / "metadata").glob("*.parquet"))
    assert [f.stem for f in files] == ["00000000", "00000001", "00000002"]  # one per input shard, same stem
    for f in files:
        schema = pq.read_schema(f)
        assert schema.names == formats.METADATA_COLUMNS + SCORES
        assert schema.field("uid").type == pa.string() and schema.field("original_width").type == pa.int64()
        assert schema.field("face_bboxes").type == pa.list_(pa.list_(pa.float64()))
        for s in SCORES:
            assert schema.field(s).type == pa.float32()
        rows = pq.ParquetFile(f).metadata.num_rows
        with np.load(f.with_suffix(".npz"), allow_pickle=False) as z:
            assert sorted(z.files) == sorted(EMBEDDINGS)
            assert z["b32_img"].shape == (rows, 128) and z["l14_txt"].shape == (rows, 48)
            assert all(z[k].dtype == np.float16 for k in z.files)
            assert np.allclose(np.linalg.norm(z["b32_img"].astype(np.float32), axis=1), 1, atol=2e-3)
    stats = json.loads((Path(cfg.out) / "stats.json").read_text())
    assert stats["shards_done"] == 3 and (Path(cfg.out) / "config.yaml").is_file()


def test_rerun_is_a_no_op_and_other_config_is_refused(embedded):
    from clipsift.pipeline.embed import run_embed
    from clipsift.pipeline.output import OutputError

    cfg, _ = embedded
    before = {p: p.stat().st_mtime_ns for p in (Path(cfg.out) / "metadata").iterdir()}
    stats = run_embed(cfg, echo=quiet)  # nothing pending: Ray is not even needed
    assert stats["run"]["shards_written"] == 0 and stats["run"]["shards_skipped_done"] == 3
    assert {p: p.stat().st_mtime_ns for p in (Path(cfg.out) / "metadata").iterdir()} == before
    other = embed_config(Path(cfg.input), Path(cfg.out), cfg.models, batch_size=64)
    with pytest.raises(OutputError, match="different configuration"):
        run_embed(other, echo=quiet)


def test_killed_run_resumes_to_identical_bytes(embedded, tmp_path):
    """Stop after one shard (as a kill would), leave debris of an unfinished write, resume."""
    from clipsift.pipeline.embed import run_embed

    cfg, _ = embedded
    out = tmp_path / "resumed"
    first = run_embed(embed_config(Path(cfg.input), out, cfg.models, max_shards=1), echo=quiet)
    assert first["run"]["shards_written"] == 1 and len(markers(out)) == 1
    pending = sorted({"00000000", "00000001", "00000002"} - set(markers(out)))
    # a killed writer leaves a temp file and maybe a parquet without its marker
    (out / "metadata" / f".{pending[0]}.parquet.123.tmp").write_bytes(b"partial")
    (out / "metadata" / f"{pending[0]}.parquet").write_bytes(b"not a finished parquet")
    second = run_embed(embed_config(Path(cfg.input), out, cfg.models), echo=quiet)  # default read_splits
    assert second["run"]["shards_written"] == 2 and second["run"]["shards_skipped_done"] == 1
    for stem in ["00000000", "00000001", "00000002"]:
        for suffix in (".parquet", ".npz"):
            a = (Path(cfg.out) / "metadata" / f"{stem}{suffix}").read_bytes()
            assert (out / "metadata" / f"{stem}{suffix}").read_bytes() == a, f"{stem}{suffix} differs"
    want = {k: {f: m[f] for f in ("rows_in", "rows_out", "skipped", "skips")} for k, m in markers(cfg.out).items()}
    got = {k: {f: m[f] for f in ("rows_in", "rows_out", "skipped", "skips")} for k, m in markers(out).items()}
    assert got == want


def test_metadata_mode_reproduces_shard_mode_scores(embedded, tmp_path):
    """Also runs a learned head (a FLYT GLU scorer saved as FLYT saves it) in the same pass."""
    from clipsift.pipeline.score import run_score
    from clipsift.training.flyt.heads import score_embeddings
    from clipsift.training.flyt.scorer import GLUScorer

    cfg, _ = embedded
    src = Path(cfg.out) / "metadata"
    # drop the score columns so metadata mode has to compute them (DataComp's own metadata has them)
    stripped = tmp_path / "in"
    stripped.mkdir()
    for f in sorted(src.glob("*.parquet")):
        pq.write_table(pq.read_table(f).drop_columns(SCORES), stripped / f.name)
        shutil.copyfile(f.with_suffix(".npz"), stripped / f"{f.stem}.npz")
    torch.manual_seed(3)
    scorer = GLUScorer(input_dim=2 * 128, hidden=32)
    flyt = tmp_path / "scorer.pt"
    torch.save({"kind": "flyt", "spec": scorer.spec, "state_dict": scorer.state_dict(),
                "inputs": ["b32_img", "b32_txt"], "column": "flyt_score"}, flyt)
    heads = {s: HeadSpec("clip_score", m) for s, m in zip(SCORES, ["b32", "l14"])}
    heads["flyt_score"] = HeadSpec("flyt", checkpoint=str(flyt))
    out = tmp_path / "scored"
    stats = run_score(ScoreConfig(input=str(stripped), out=str(out), heads=heads, batch_size=100, progress=False,
                                  ray=RayConfig(num_cpus=2)), echo=quiet)
    assert stats["run"]["shards_written"] == 3
    for f in sorted(src.glob("*.parquet")):
        want, got = pq.read_table(f), pq.read_table(out / "metadata" / f.name)
        with np.load(f.with_suffix(".npz")) as z:
            np.testing.assert_allclose(got.column("flyt_score").to_numpy(),
                                       score_embeddings(flyt, z["b32_img"], z["b32_txt"]), rtol=1e-5, atol=1e-6)
        got = got.drop_columns(["flyt_score"])
        assert got.schema == want.schema
        for s in SCORES:
            np.testing.assert_allclose(got.column(s).to_numpy(), want.column(s).to_numpy(), rtol=0, atol=1e-6)
        assert got.drop_columns(SCORES).equals(want.drop_columns(SCORES))
        assert (out / "metadata" / f"{f.stem}.npz").read_bytes() == f.with_suffix(".npz").read_bytes()


# ---------------------------------------------------------------- bad input
def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _sample(shard: int, row: int, *, text: bytes | None = b"a red square", uid: bool = True,
            image: bytes | None = None, json_bytes: bytes | None = None) -> tuple[str, dict[str, bytes], dict]:
    key = formats.sample_key(shard, row)
    meta = {"url": f"http://x.invalid/{key}.jpg", "status": "success", "original_width": 300,
            "original_height": 200, "sha256": "0" * 64, "key": key}
    if uid:
        meta["uid"] = f"{shard:016x}{row:016x}"
    members = {"jpg": _jpeg(row) if image is None else image}
    if text is not None:
        members["txt"] = text
    members["json"] = json.dumps(meta).encode() if json_bytes is None else json_bytes
    return key, members, meta


def _write(folder: Path, shard: int, samples) -> Path:
    with shards.ShardWriter(folder, shard) as w:
        for key, members, meta in samples:
            w.add_raw(key, members, status=meta)
    return folder / formats.shard_name(shard)


@pytest.fixture(scope="module")
def bad_pool(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad") / "shards"
    # 0: duplicate key (a second group with a key already seen) + a corrupt image + a good sample
    s = [_sample(0, 0), _sample(0, 1), _sample(0, 2, image=b"\xff\xd8 not a jpeg")]
    _write(d, 0, s + [(s[0][0], _sample(0, 3)[1], s[0][2])])
    # 1: non-UTF-8 caption, json without uid, missing caption, malformed json, missing image, 2 good
    missing_image = _sample(1, 6)
    del missing_image[1]["jpg"]
    _write(d, 1, [_sample(1, 0, text=b"caf\xe9 \xff"), _sample(1, 1, uid=False), _sample(1, 2, text=None),
                  _sample(1, 3, json_bytes=b'{"uid": '), _sample(1, 4), _sample(1, 5), missing_image])
    # 2: a tar cut inside its 4th sample (stats say 6)
    tar = _write(d, 2, [_sample(2, r) for r in range(6)])
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 55 // 100])
    # 3: an empty shard
    _write(d, 3, [])
    # 4: a shard whose _stats.json is missing
    _write(d, 4, [_sample(4, r) for r in range(3)])
    (d / formats.stats_name(4)).unlink()
    return d


def test_decode_stage_chunks_account_for_every_record(bad_pool, models):
    """No Ray: chunks of 2 samples; every tar record lands in exactly one chunk, in tar order."""
    from clipsift.pipeline.decode import decode_chunk, read_chunks
    from clipsift.pipeline.encoders import make_plan

    plan = make_plan(models, {}, batch_size=2, normalize=True, precision="fp32", seed=0, allow_random_weights=False)
    assert [p.shape for p in plan.images] == [(32, 32, 3), (24, 24, 3)]  # world-rn-s, tiny ViT (squash)
    assert [t.context_length for t in plan.texts] == [20, 16]
    for path in sorted(bad_pool.glob("*.tar")):
        raw = [t for t in read_chunks(str(path), 7, 2)]
        rows = [decode_chunk(t, plan).to_pylist()[0] for t in raw]
        assert [c["chunk"] for c in rows] == list(range(len(rows)))
        assert [c["last"] for c in rows] == [False] * (len(rows) - 1) + [True]
        assert [k for c in rows for k in c["keys"]] == [r.key for r in shards.read_shard(path)]
        for c in rows:
            assert c["shard"] == 7 and len(c["uid"]) <= 2 and len(c["reasons"]) == len(c["keys"])
            assert len(c["uid"]) == c["reasons"].count("")  # a sample is kept or has a reason
            assert len(c["img0"]) == len(c["uid"]) * 32 * 32 * 3 and len(c["tok1"]) == len(c["uid"]) * 16 * 4
            assert "encoded" not in c


def test_missing_stats_file_is_an_error_by_default(bad_pool, models, tmp_path):
    from clipsift.pipeline.embed import run_embed

    with pytest.raises(formats.FormatError, match=r"00000004.tar.*on_missing_stats=process"):
        run_embed(embed_config(bad_pool, tmp_path / "o", models), echo=quiet)
    assert not (tmp_path / "o").exists()  # refused before writing anything


def test_bad_input_counted_by_reason(bad_pool, models, ray_local, tmp_path):
    from clipsift.pipeline.embed import MISSING_FROM_TAR, MISSING_STATS, run_embed

    out = tmp_path / "bad-out"
    stats = run_embed(embed_config(bad_pool, out, models, batch_size=2, on_missing_stats="process"), echo=quiet)
    per = stats["shards"]
    assert per["00000000"]["skipped"] == {shards.CORRUPT_IMAGE: 1, shards.DUPLICATE_KEY: 1}
    assert per["00000000"]["rows_out"] == 2
    assert per["00000001"]["skipped"] == {shards.BAD_TEXT: 1, shards.NO_UID: 1, shards.MISSING_TEXT: 1,
                                          shards.BAD_JSON: 1, shards.MISSING_IMAGE: 1}
    assert per["00000001"]["rows_out"] == 2
    cut = per["00000002"]
    assert cut["skipped"][shards.TRUNCATED_TAR] == 1 and cut["skipped"][MISSING_FROM_TAR] >= 1
    assert cut["rows_in"] == 6 and cut["rows_out"] == 6 - sum(cut["skipped"].values())
    assert per["00000003"] == {**per["00000003"], "rows_in": 0, "rows_out": 0, "skipped": {}}
    assert per["00000004"]["rows_out"] == 3 and per["00000004"]["notes"] == {MISSING_STATS: 1}
    for stem, m in per.items():
        assert m["rows_in"] == m["rows_out"] + sum(m["skipped"].values()), stem
        table = pq.read_table(out / "metadata" / f"{stem}.parquet")
        with np.load(out / "metadata" / f"{stem}.npz") as z:
            assert table.num_rows == m["rows_out"] == z["b32_img"].shape[0] == z["l14_txt"].shape[0]
    empty = np.load(out / "metadata" / "00000003.npz")
    assert empty["b32_img"].shape == (0, 128) and empty["l14_img"].shape == (0, 48)
    assert pq.read_table(out / "metadata" / "00000000.parquet").column("uid").to_pylist() == [
        f"{0:016x}{0:016x}", f"{0:016x}{1:016x}"]
    details = {s["reason"]: s["detail"] for s in json.loads((out / "done" / "00000000.json").read_text())["skips"]}
    assert details[shards.CORRUPT_IMAGE].startswith("UnidentifiedImageError")


# ---------------------------------------------------------------- heads, resources
def test_heads_are_looked_up_by_name_and_checked():
    heads = build_heads({"s": HeadSpec("clip_score", "b32")}, ["b32_img", "b32_txt"])
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    np.testing.assert_allclose(heads["s"]({"b32_img": a, "b32_txt": b}).numpy(),
                               torch.nn.functional.cosine_similarity(a, b).numpy(), rtol=1e-6)
    with pytest.raises(HeadError, match="needs"):
        build_heads({"s": HeadSpec("clip_score", "l14")}, ["b32_img", "b32_txt"])
    with pytest.raises(HeadError, match="unknown head kind"):
        build_heads({"s": HeadSpec("no_such_head")}, [])
    with pytest.raises(HeadError, match="cannot import"):
        build_heads({"s": HeadSpec("clipsift.pipeline.heads:Nope")}, [])
    # a kind can be any importable factory: the same class by path
    assert build_heads({"s": HeadSpec("clipsift.pipeline.heads:ClipScore", "b32")}, ["b32_img", "b32_txt"])


def test_random_weights_refused_unless_allowed(ci_world, tmp_path):
    from clipsift.pipeline.embed import run_embed
    from clipsift.pipeline.encoders import PlanError

    cfg = embed_config(ci_world / "pool" / "shards", tmp_path, {"b32": ModelSpec("world-rn-s", "")},
                       heads={"clip_b32_similarity_score": HeadSpec("clip_score", "b32")})
    with pytest.raises(PlanError, match="allow_random_weights"):
        run_embed(cfg, echo=quiet)


def test_model_actors_never_take_every_cpu(ray_local):
    import ray

    from clipsift.pipeline.raysession import ResourceError, stage_plan

    cpus = ray.cluster_resources()["CPU"]
    with pytest.raises(ResourceError, match="would hang"):
        stage_plan(RayConfig(model_cpus=cpus), "auto")
    with pytest.raises(ResourceError, match="would hang"):
        stage_plan(RayConfig(model_actors=2, model_cpus=cpus / 2), "cpu")
    with pytest.raises(ResourceError, match="would hang"):  # read tasks that reserve CPUs count too
        stage_plan(RayConfig(read_tasks=2, read_cpus=(cpus - 1) / 2), "cpu")
    sp = stage_plan(RayConfig(), "cpu")
    assert sp.model_actors == 1 and not sp.use_gpu and sp.model_threads == 0  # 0: all cores of its node
    # read tasks reserve no CPU by default: every CPU but the model actor's decodes
    assert sp.read_cpus == 0 and sp.read_tasks == 2 and sp.decode_slots == int(cpus) - 1
    # decode actors that only tokenise (image_decode=device) are as many as read tasks, if they fit
    assert stage_plan(RayConfig(), "cpu", tokenise_only=True).decode_slots == min(2, int(cpus) - 1)
    assert stage_plan(RayConfig(decode_actors=1), "cpu").decode_slots == 1
    with pytest.raises(ResourceError, match="decode_actors"):
        stage_plan(RayConfig(decode_actors=-1), "cpu")


def test_gpu_stage_plan_shares_gpus_between_actors():
    """A 16-CPU, 2-GPU node: one actor per GPU by default (two when images decode on the device),
    ray.actors_per_gpu=2 gives four half-GPU actors (each reserving its CPU), and asking for more
    actors than that is refused."""
    from clipsift.pipeline.raysession import ResourceError, plan_stages

    one = plan_stages(RayConfig(), 16, 2, True)
    assert (one.model_actors, one.gpus_per_actor, one.decode_slots) == (2, 1.0, 14)
    two = plan_stages(RayConfig(actors_per_gpu=2), 16, 2, True)
    assert (two.model_actors, two.gpus_per_actor, two.decode_slots) == (4, 0.5, 12)
    assert plan_stages(RayConfig(actors_per_gpu=2), 16, 2, False).gpus_per_actor == 0.0  # device=cpu
    with pytest.raises(ResourceError, match="actors_per_gpu"):
        plan_stages(RayConfig(model_actors=5, actors_per_gpu=2), 16, 2, True)
    on_device = plan_stages(RayConfig(), 16, 2, True, tokenise_only=True)
    assert (on_device.model_actors, on_device.gpus_per_actor) == (4, 0.5)
    assert plan_stages(RayConfig(actors_per_gpu=1), 16, 2, True, tokenise_only=True).model_actors == 2
    assert plan_stages(RayConfig(), 16, 0, False, tokenise_only=True).model_actors == 1  # no GPU: one actor
    with pytest.raises(ResourceError, match="actors_per_gpu"):
        plan_stages(RayConfig(actors_per_gpu=-1), 16, 2, True)



def test_cpu_model_actor_uses_every_core_unless_told(models):
    """Ray starts a 1-CPU actor with one torch thread; the model, the CPU job's bound, takes them all."""
    from clipsift.pipeline.embed import EncodeStage
    from clipsift.pipeline.encoders import make_plan

    plan = make_plan(models, {}, batch_size=2, normalize=True, precision="fp32", seed=0, allow_random_weights=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        EncodeStage(plan, "cpu", 0)
        assert torch.get_num_threads() == os.cpu_count()
        EncodeStage(plan, "cpu", 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

# ---------------------------------------------------------------- a real kill
@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_byte_identical(embedded, tmp_path):
    """`clipsift embed` in a subprocess, SIGKILLed (with its Ray) after its first shard is done."""
    from clipsift.pipeline.embed import run_embed

    cfg, _ = embedded
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "clipsift", "embed", f"input={cfg.input}", f"out={out}", "batch_size=128",
            "progress=false", "ray.num_cpus=2"] + [
        f"models.{n}.{k}={getattr(s, k)}" for n, s in cfg.models.items() for k in ("arch", "pretrained")]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not list((out / "done").glob("*.json")) if (out / "done").is_dir() else True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no shard finished in 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run's own process group: the CLI and the Ray it started
        proc.wait()
    assert 1 <= len(markers(out)) < 3
    stats = run_embed(embed_config(Path(cfg.input), out, cfg.models), echo=quiet)
    assert stats["shards_done"] == 3
    for f in sorted((Path(cfg.out) / "metadata").iterdir()):
        assert (out / "metadata" / f.name).read_bytes() == f.read_bytes(), f.name


def test_jpeg_draft_decodes_close_to_full_decoding(models):
    """jpeg_draft shrinks large JPEGs while decoding (PIL draft): the model inputs stay close to full
    decoding, and the plan's fingerprint changes so outputs of the two are never mixed."""
    from dataclasses import replace

    from clipsift.pipeline.decode import decode_image
    from clipsift.pipeline.encoders import make_plan

    plan = make_plan(models, {}, batch_size=2, normalize=True, precision="fp32", seed=0, allow_random_weights=False)
    draft = replace(plan, jpeg_draft=True)
    assert draft.fingerprint() != plan.fingerprint()
    yy, xx = np.mgrid[0:384, 0:512]
    smooth = np.stack([xx / 2, yy / 1.5, (xx + yy) / 3.5], -1).astype(np.uint8)  # a smooth 512x384 picture
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=90)
    full, err_full = decode_image(buf.getvalue(), plan)
    small, err_small = decode_image(buf.getvalue(), draft)
    assert err_full is None and err_small is None
    for key in full:
        assert small[key].shape == full[key].shape
        assert np.abs(small[key].astype(int) - full[key].astype(int)).mean() < 3.0


# ---------------------------------------------------------------- image_decode=device
def _photo(w: int, h: int, seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(field, np.float32) + rng.normal(0, 4, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def test_device_decoding_matches_cpu_decoding_and_names_the_same_failures(models):
    """decode_on_device (run here on the CPU, the same code nvJPEG runs on a GPU): pixels within
    rounding of the PIL path for JPEGs of any size and shape, PNGs through PIL exactly, and a
    truncated or fake JPEG refused with the CPU path's own error."""
    from clipsift.pipeline.decode import decode_image
    from clipsift.pipeline.device_decode import decode_on_device
    from clipsift.pipeline.encoders import make_plan

    plan = make_plan(models, {}, batch_size=8, normalize=True, precision="fp32", seed=0, allow_random_weights=False,
                     image_decode="device")
    good = [_photo(400, 300, 0), _photo(97, 203, 1), _photo(64, 64, 2), _photo(640, 120, 3)]
    png = _photo(150, 100, 4, "PNG")
    inputs = [good[0], good[0][:len(good[0]) // 2], good[1], png, b"\xff\xd8\xff not a jpeg", good[2], good[3]]
    images, errors = decode_on_device(inputs, plan, torch.device("cpu"))
    cpu = [decode_image(d, plan) for d in inputs]
    assert errors == [e for _, e in cpu]
    assert [bool(e) for e in errors] == [False, True, False, False, True, False, False]
    ok = [a for a, e in cpu if not e]
    for p in plan.images:
        assert images[p.key].dtype == torch.uint8 and images[p.key].shape == (5, *p.shape)
        for i, arrays in enumerate(ok):
            diff = np.abs(images[p.key][i].numpy().astype(int) - arrays[p.key].astype(int))
            if i == 2:  # the PNG: decoded by PIL, identical
                assert diff.max() == 0
            else:
                assert diff.mean() < 2.0, (p.key, i, diff.mean())


def test_device_decoding_pipeline_keeps_the_same_rows_and_close_embeddings(ci_world, bad_pool, models, embedded,
                                                                           ray_local, tmp_path):
    from clipsift.pipeline.embed import run_embed

    cfg, stats = embedded
    dev_cfg = embed_config(ci_world / "pool" / "shards", tmp_path / "dev", models, image_decode="device")
    dev_stats = run_embed(dev_cfg, echo=quiet)
    assert {s: m["skipped"] for s, m in dev_stats["shards"].items()} == {s: m["skipped"] for s, m in stats["shards"].items()}
    table, arrays = output_tables(cfg.out)
    dev_table, dev_arrays = output_tables(dev_cfg.out)
    assert dev_table.column("uid").to_pylist() == table.column("uid").to_pylist()
    for k in EMBEDDINGS:
        cos = (arrays[k].astype(np.float32) * dev_arrays[k].astype(np.float32)).sum(1)
        assert np.median(cos) > 0.995 and cos.min() > 0.95, k
    assert markers(dev_cfg.out)["00000000"]["fingerprint"] != markers(cfg.out)["00000000"]["fingerprint"]
    bad = run_embed(embed_config(bad_pool, tmp_path / "bad", models, batch_size=2, on_missing_stats="process",
                                 image_decode="device"), echo=quiet)
    assert bad["shards"]["00000000"]["skipped"] == {shards.CORRUPT_IMAGE: 1, shards.DUPLICATE_KEY: 1}
    assert bad["shards"]["00000000"]["rows_out"] == 2


# ---------------------------------------------------------------- image size limit (issue 22, item 6)
def test_images_over_the_pixel_limit_are_skipped_or_decoded_reduced(models, tmp_path):
    """Over max_image_pixels a JPEG decodes at PIL's draft scale (the least of 1/2, 1/4, 1/8 that
    fits), anything else is an image_too_large skip, as is an image past PIL's own bomb limit with no
    limit of ours; under the limit decoding is what it was. The device path routes large JPEGs to
    the CPU path, so both give the same pixels and reasons."""
    from dataclasses import replace

    from clipsift.pipeline.decode import decode_chunk, decode_image, read_chunks
    from clipsift.pipeline.device_decode import decode_on_device
    from clipsift.pipeline.encoders import make_plan, split_transform

    plan = make_plan(models, {}, batch_size=8, normalize=True, precision="fp32", seed=0, allow_random_weights=False,
                     max_image_pixels=50_000)
    unlimited = replace(plan, max_image_pixels=0)
    assert len({plan.fingerprint(), unlimited.fingerprint(), replace(plan, max_image_pixels=36_000_000).fingerprint()}) == 3
    big_jpeg, big_png, small = _photo(600, 400, 0), _photo(300, 200, 1, "PNG"), _photo(220, 200, 2)
    arrays, failure = decode_image(big_png, plan)
    assert arrays == {} and failure.reason == shards.IMAGE_TOO_LARGE
    assert failure.detail == "300x200 = 0.1 Mpx, over max_image_pixels=50000"
    assert decode_image(big_png, unlimited)[1] is None
    # 600x400 = 240k px: 1/2 scale is 60k, still over; 1/4 (150x100) fits
    reduced, failure = decode_image(big_jpeg, plan)
    assert failure is None
    with Image.open(io.BytesIO(big_jpeg)) as img:
        img.draft(None, (150, 100))
        assert img.size == (150, 100)
        img.load()
        for p in plan.images:
            np.testing.assert_array_equal(reduced[p.key], np.asarray(split_transform(p.cfg_json)[0](img)))
    full, _ = decode_image(big_jpeg, unlimited)
    for key in full:
        diff = np.abs(reduced[key].astype(int) - full[key].astype(int))
        assert 0 < diff.mean() < 3.0  # decoded reduced, yet close to full decoding
    same, _ = decode_image(small, plan)  # 44k px: under the limit, decoded exactly as without one
    for key, a in decode_image(small, unlimited)[0].items():
        np.testing.assert_array_equal(same[key], a)
    # past PIL's own limit (2 x Image.MAX_IMAGE_PIXELS): too large, not corrupt, with no limit of ours
    bomb = png_claiming(20_000, 20_000)
    assert decode_image(bomb, unlimited)[1].reason == shards.IMAGE_TOO_LARGE
    assert decode_image(bomb, unlimited)[1].detail.startswith("DecompressionBombError")

    device_plan = replace(plan, image_decode="device")
    inputs = [big_jpeg, big_png, small, bomb]
    images, errors = decode_on_device(inputs, device_plan, torch.device("cpu"))
    cpu = [decode_image(d, plan) for d in inputs]
    assert errors == [e for _, e in cpu] and [e.reason if e else None for e in errors] == [
        None, shards.IMAGE_TOO_LARGE, None, shards.IMAGE_TOO_LARGE]
    for p in plan.images:
        np.testing.assert_array_equal(images[p.key][0].numpy(), reduced[p.key])  # the CPU path's pixels

    # a shard: the skip is counted by reason, the other samples kept
    tar = _write(tmp_path, 0, [_sample(0, 0), _sample(0, 1, image=big_png), _sample(0, 2)])
    rows = [decode_chunk(t, plan).to_pylist()[0] for t in read_chunks(str(tar), 0, 8)]
    assert [r for row in rows for r in row["reasons"]] == ["", shards.IMAGE_TOO_LARGE, ""]
    assert sum(len(row["uid"]) for row in rows) == 2


# ---------------------------------------------------------------- img2dataset's shard names (issue 22, item 9)
def test_img2dataset_default_names_embed_the_same_and_carry_its_failure_counts(ci_world, embedded, tmp_path):
    """img2dataset's default output (oom_shard_count=5): 00000.tar with 00000_stats.json. The same
    samples give the same bytes as the world's 00000000.tar names; img2dataset's failure counts reach
    clipsift's stats (per shard and in total) and the run's summary."""
    from clipsift.pipeline.embed import run_embed

    cfg, stats = embedded
    src, folder = ci_world / "pool" / "shards", tmp_path / "i2d"
    folder.mkdir()
    world_stats = {}
    for tar in formats.list_shards(src):
        stem = f"{formats.shard_index(tar):05d}"
        shutil.copy(tar, folder / f"{stem}.tar")
        own = json.loads(formats.stats_path(tar).read_text())  # as img2dataset counts a real download
        own.update(failed_to_download=7 + int(stem), failed_to_resize=int(stem))
        own["count"] = own["successes"] + own["failed_to_download"] + own["failed_to_resize"]
        (folder / f"{stem}_stats.json").write_text(json.dumps(own))
        world_stats[stem] = own
    lines: list[str] = []
    got = run_embed(embed_config(folder, tmp_path / "out", cfg.models), echo=lines.append)
    assert sorted(got["shards"]) == ["00000", "00001", "00002"]
    for stem in got["shards"]:
        for suffix in (".parquet", ".npz"):
            assert (tmp_path / "out" / "metadata" / f"{stem}{suffix}").read_bytes() == \
                (Path(cfg.out) / "metadata" / f"000{stem}{suffix}").read_bytes()
        assert got["shards"][stem]["download_failures"] == {
            k: world_stats[stem][k] for k in ("failed_to_download", "failed_to_resize")}
    assert got["totals"]["download_failures"] == {"failed_to_download": 7 + 8 + 9, "failed_to_resize": 0 + 1 + 2}
    assert any("failed_to_download=24, failed_to_resize=3" in line for line in lines)


# ---------------------------------------------------------------- a real two-node Ray cluster (issue 22, item 12)
class RayNodes:
    """Ray nodes started with `ray start --block` on this machine, each in its own process group, so
    killing a node (SIGKILL to its group) and the final teardown reach exactly the processes it
    started, never another Ray on the machine (`ray stop` would stop every Ray here). Its own
    RAY_TMPDIR keeps other Ray users from finding (and joining) this cluster."""

    def __init__(self, tmp: Path):
        import socket

        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        # a loopback test cluster: no auth token (Ray enables token auth when it finds one)
        self.env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    def start(self, head: bool = False) -> subprocess.Popen:
        ray = str(Path(sys.executable).with_name("ray"))
        where = ["--head", f"--port={self.port}", "--include-dashboard=false", f"--temp-dir={self.tmp}"] if head \
            else [f"--address={self.address}"]
        log = open(self.tmp / f"node{len(self.nodes)}.log", "w")
        node = subprocess.Popen([ray, "start", "--block", *where, "--num-cpus=1", "--node-ip-address=127.0.0.1",
                                 "--object-store-memory=200000000", "--disable-usage-stats"],
                                env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.nodes.append(node)
        self.wait_for(sum(n.poll() is None for n in self.nodes))
        return node

    def alive_nodes(self) -> int:
        script = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
                  "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        r = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=120)
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else -1

    def wait_for(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while (alive := self.alive_nodes()) != n:
            assert time.time() < deadline, f"{alive} Ray nodes alive, waiting for {n}: see {self.tmp}/node*.log"
            time.sleep(1)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)


@pytest.mark.slow
def test_worker_node_killed_mid_run_on_a_two_node_ray_cluster(embedded, tmp_path):
    """`clipsift embed` with RAY_ADDRESS on a head node and a worker node (1 CPU each). The worker
    node is SIGKILLed once the first shard is written, and a replacement node joins: the job finishes
    by itself, and its outputs are byte-identical to the uninterrupted local run's."""
    cfg, _ = embedded
    nodes = RayNodes(Path(f"/tmp/clipsift-ray-{os.getpid()}"))  # short: Ray's socket paths must fit 107 bytes
    out = tmp_path / "cluster"
    # half a CPU for the model actor, half per decode actor: one node alone still runs both stages
    argv = [sys.executable, "-m", "clipsift", "embed", f"input={cfg.input}", f"out={out}", "batch_size=128",
            "progress=false", "ray.model_cpus=0.5", "ray.decode_cpus=0.5"] + [
        f"models.{n}.{k}={getattr(s, k)}" for n, s in cfg.models.items() for k in ("arch", "pretrained")]
    proc = None
    try:
        nodes.start(head=True)
        worker = nodes.start()
        proc = subprocess.Popen(argv, env={**nodes.env, "RAY_ADDRESS": nodes.address}, start_new_session=True,
                                stdout=open(tmp_path / "embed.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while not (out / "done").is_dir() or not list((out / "done").glob("*.json")):
            assert proc.poll() is None, (tmp_path / "embed.log").read_text()[-3000:]
            assert time.time() < deadline, "no shard finished in 400 s"
            time.sleep(0.2)
        nodes.kill(worker)
        assert len(markers(out)) < 3, "the run ended before the node was killed: nothing was tested"
        nodes.start()  # the replacement node
        assert proc.wait(timeout=500) == 0, (tmp_path / "embed.log").read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            RayNodes.kill(proc)
        nodes.stop()
        shutil.rmtree(nodes.tmp, ignore_errors=True)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards_done"] == 3
    # 2 CPUs: the model actor and 3 decode actors of half a CPU each fill both nodes, so the killed
    # node held a share of the run's actors (and the objects they had made) when it died
    stages = stats["run"]["stages"]
    assert (stages["cluster_cpus"], stages["model_actors"], stages["decode_slots"]) == (2.0, 1, 3)
    for f in sorted((Path(cfg.out) / "metadata").iterdir()):
        assert (out / "metadata" / f.name).read_bytes() == f.read_bytes(), f.name
