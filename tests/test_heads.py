"""M-FLYT's extra inputs: negCLIPLoss (a pool-level score, filters/negclip.py) and the DFN-style
score (the CLIP score of the b32 reference fine-tuned on the curated split), each against values
computed by hand from its definition."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipsift.config import ConfigError
from clipsift.filters.base import Context, FilterError, FilterSpec, build, run_filters
from clipsift.filters.negclip import negclip_scores
from clipsift.filters.pool import ArrayPool


def by_hand(img, txt, members, i, scale):
    """s_ii - τ/2 [log Σ_j e^{s_ij/τ} + log Σ_j e^{s_ji/τ}] over batch `members`, in plain Python."""
    unit = lambda x: [a / math.sqrt(sum(b * b for b in x)) for a in x]  # noqa: E731
    u = {j: unit(img[j]) for j in members}
    v = {j: unit(txt[j]) for j in members}
    s = lambda a, b: sum(p * q for p, q in zip(u[a], v[b]))  # noqa: E731
    row = math.log(sum(math.exp(scale * s(i, j)) for j in members))
    col = math.log(sum(math.exp(scale * s(j, i)) for j in members))
    return s(i, i) - (row + col) / (2 * scale)


IMG = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0], [-1.0, 1.0], [3.0, -1.0]]
TXT = [[0.8, 0.6], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, -2.0]]


def test_negclip_whole_pool_batch_matches_the_definition():
    img, txt = np.array(IMG, np.float32), np.array(TXT, np.float32)
    got = negclip_scores(img, txt, batch_size=5, repeats=3, logit_scale=2.5, rng=np.random.default_rng(0))
    want = [by_hand(IMG, TXT, range(5), i, 2.5) for i in range(5)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # one example alone in its batch: the normaliser is its own CLIP score, so the loss term is 0
    np.testing.assert_allclose(negclip_scores(img, txt, 1, 1, 2.5, np.random.default_rng(0)), 0, atol=1e-6)


def test_negclip_random_pairs_and_the_topped_up_last_batch():
    """b = 2 over 5 rows: two true pairs and one short batch topped up to 2 with a row of the first
    pair. Every score must equal the hand value of some 2-row batch holding it, the pairs must be
    mutual, and each repeat average two such batches."""
    img, txt = np.array(IMG, np.float32), np.array(TXT, np.float32)
    got = negclip_scores(img, txt, batch_size=2, repeats=1, logit_scale=3.0, rng=np.random.default_rng(7))
    partner = {}
    for i in range(5):
        hits = [j for j in range(5) if j != i and abs(by_hand(IMG, TXT, [i, j], i, 3.0) - got[i]) < 1e-5]
        assert len(hits) == 1, (i, hits)
        partner[i] = hits[0]
    lone = [i for i in range(5) if partner[partner[i]] != i]
    assert len(lone) == 1  # the short batch's row; its filler is paired with someone else
    assert sum(partner[i] == j and partner[j] == i for i in range(5) for j in range(5)) == 4
    twice = negclip_scores(img, txt, 2, 2, 3.0, np.random.default_rng(7))
    again = negclip_scores(img, txt, 2, 2, 3.0, np.random.default_rng(7))
    np.testing.assert_array_equal(twice, again)  # deterministic given the seed
    pairs = {i: [by_hand(IMG, TXT, [i, j], i, 3.0) for j in range(5) if j != i] for i in range(5)}
    for i in range(5):  # the mean of two batches' values
        assert any(abs((a + b) / 2 - twice[i]) < 1e-5 for a in pairs[i] for b in pairs[i]), i


def _pool(n=600, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim)).astype(np.float16)
    txt = (img + rng.normal(size=(n, dim)) * np.linspace(0.1, 3, n)[:, None]).astype(np.float16)  # noisier later
    return ArrayPool({"uid": np.array([f"{i:032x}" for i in range(n)])}, {"b32_img": img, "b32_txt": txt})


def _run(pool, tmp_path, **args):
    ctx = Context(work_dir=tmp_path / "work", seed=3, batch_size=128, log=lambda *_: None)
    tree = build(FilterSpec(kind="negclip", args={"model": "b32", "device": "cpu", **args}), ctx)
    return run_filters(tree, pool, 128)


def test_negclip_filter_scores_the_pool_and_spills_a_large_one(tmp_path):
    pool, args = _pool(), {"batch_size": 32, "repeats": 4, "logit_scale": 10.0}
    res = _run(pool, tmp_path, **args)
    score = res.scores["negclip"]
    assert score.shape == (600,) and np.isfinite(score).all() and res.keep.all()
    assert np.corrcoef(score, -np.arange(600))[0, 1] > 0.5  # noisier captions score lower
    # three groups through spill files: every row scored once, from its own embeddings
    spilled = _run(pool, tmp_path, **args, memory_rows=250).scores["negclip"]
    assert np.isfinite(spilled).all() and np.corrcoef(score, spilled)[0, 1] > 0.95
    assert not any((tmp_path / "work" / "negclip").iterdir())  # spill files removed
    np.testing.assert_array_equal(spilled, _run(pool, tmp_path, **args, memory_rows=250).scores["negclip"])
    kept = _run(pool, tmp_path, **args, fraction=0.25)
    # DataComp's cut: every row scoring at least the score at rank int(600 * 0.25) = 150, itself included
    assert kept.keep.sum() == 151 and score[kept.keep].min() >= score[~kept.keep].max()


def test_negclip_spill_groups_return_each_row_once_with_its_embeddings(tmp_path):
    pool = _pool(n=301)
    ctx = Context(work_dir=tmp_path, seed=0, batch_size=64, log=lambda *_: None)
    flt = build(FilterSpec(kind="negclip", args={"model": "b32", "batch_size": 8, "memory_rows": 100}), ctx).filter
    group_of = np.arange(301) % 4
    seen = []
    for rows, img, txt in flt._groups(pool, group_of, 4):
        assert (group_of[rows] == group_of[rows[0]]).all()
        np.testing.assert_array_equal(img, pool.embeddings["b32_img"][rows])
        np.testing.assert_array_equal(txt, pool.embeddings["b32_txt"][rows])
        seen.append(rows)
    assert sorted(np.concatenate(seen).tolist()) == list(range(301))


def test_negclip_bad_parameters_are_one_line_errors(tmp_path):
    with pytest.raises(FilterError, match="larger than the 600 rows"):
        _run(_pool(), tmp_path, batch_size=1000, memory_rows=1000)
    with pytest.raises(ConfigError, match="memory_rows"):
        _run(_pool(), tmp_path, batch_size=64, memory_rows=10)
    with pytest.raises(FilterError, match="no embedding 'l14_"):
        run_filters(build(FilterSpec(kind="negclip", args={"batch_size": 8}), Context(log=lambda *_: None)), _pool())


@pytest.fixture(scope="module")
def dfn_world(ci_world, tmp_path_factory):
    """The ci world's data (linked, so the session's world gets no models/ of ours) with a very
    briefly trained b32 reference and its DFN-style fine-tune."""
    from clipsift.training.loop import train
    from clipsift.training.reference import ensure_dfn_model, reference_config

    world = tmp_path_factory.mktemp("dfn_world")
    for name in ("world.yaml", "curated", "pool"):
        (world / name).symlink_to(ci_world / name)
    short = ["samples_seen=256", "batch_size=64", "warmup=1", "data.workers=0", "progress=false"]
    train(reference_config(world, "b32", short))  # only b32: the DFN-style model starts from it
    return world, ensure_dfn_model(world, short)


def test_dfn_model_is_the_b32_reference_fine_tuned(dfn_world, tmp_path):
    from clipsift.training import checkpoint
    from clipsift.training.reference import ensure_dfn_model

    world, dfn = dfn_world
    b32 = checkpoint.load(checkpoint.latest_path(world / "models" / "b32"))["state_dict"]
    tuned = checkpoint.load(dfn.checkpoint)["state_dict"]
    assert dfn.arch == "world-rn-s" and any(not torch.equal(b32[k], tuned[k]) for k in b32)
    # lr ~0: every weight but batch-norm statistics stays b32's (the init, not a random model)
    frozen = ensure_dfn_model(world, ["samples_seen=64", "batch_size=64", "lr=1e-12", "warmup=0",
                                      "data.workers=0", f"out={tmp_path / 'dfn0'}"])
    same = checkpoint.load(frozen.checkpoint)["state_dict"]
    for k in b32:
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(same[k], b32[k], atol=1e-9, rtol=0)
    assert ensure_dfn_model(world, ["samples_seen=256", "batch_size=64", "warmup=1", "data.workers=0"]) == dfn


def test_dfn_score_head_matches_the_fine_tuned_models_cosine(dfn_world):
    """The pipeline's clip_dfn_similarity_score on real pool images = cosine of the fine-tuned model's
    own open_clip embeddings, computed here directly."""
    import io

    import open_clip
    from PIL import Image

    from clipsift import formats, shards
    from clipsift.eval.models import ModelSpec, load_model
    from clipsift.pipeline.encoders import Encoder, make_plan, split_transform
    from clipsift.pipeline.heads import HeadSpec

    world, dfn = dfn_world
    samples = [r for r in shards.read_shard(formats.list_shards(world / "pool" / "shards")[0])
               if isinstance(r, shards.Sample)][:24]
    images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in samples]
    plan = make_plan({"dfn": ModelSpec(dfn.arch, str(dfn.checkpoint))},
                     {"clip_dfn_similarity_score": HeadSpec("clip_score", "dfn")}, batch_size=24, normalize=True,
                     precision="fp32", seed=0, allow_random_weights=False)
    pil, _, _ = split_transform(plan.images[0].cfg_json)
    arrays = {plan.images[0].key: np.stack([np.asarray(pil(im)) for im in images])}
    tok = open_clip.get_tokenizer(plan.texts[0].open_clip_name)
    tokens = {plan.texts[0].key: tok([s.text for s in samples]).numpy().astype(np.int32)}
    _, scores = Encoder(plan).encode(arrays, tokens)

    loaded = load_model(dfn.arch, str(dfn.checkpoint))
    with torch.no_grad():
        u = loaded.model.encode_image(torch.stack([loaded.preprocess(im) for im in images]))
        v = loaded.model.encode_text(loaded.tokenizer([s.text for s in samples]))
    want = torch.nn.functional.cosine_similarity(u, v, dim=-1).numpy()
    np.testing.assert_allclose(scores["clip_dfn_similarity_score"], want, atol=2e-3)


def test_logistic_fit_matches_the_stationary_point_by_hand():
    """x = ±1 with labels 1/0: b = 0 by symmetry and w solves σ(-w) = l2·w (bisection here)."""
    from clipsift.filters.linear_classifier import fit_logistic

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 / (1 + math.exp(mid)) > 0.1 * mid else (lo, mid)
    w, b, report = fit_logistic(np.array([[1.0], [-1.0]], np.float32), np.array([1.0, 0.0], np.float32), 0.1, 100)
    assert abs(w[0] - lo) < 1e-6 and abs(b) < 1e-6 and report["train_accuracy"] == 1.0


def test_linear_classifier_scores_rows_like_the_high_quality_set_higher(tmp_path):
    """Positives and half the pool come from one distribution, the other half of the pool from a
    shifted one: the classifier's logit must rank the first half above the second."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipsift.pipeline.output import write_npz

    rng = np.random.default_rng(0)
    dim, n, shift = 8, 400, np.eye(8)[0] * 1.5

    def pairs(m, off):
        img = rng.normal(size=(m, dim)) + off
        return img.astype(np.float16), (img + rng.normal(size=(m, dim))).astype(np.float16)

    hq = tmp_path / "hq"
    hq.mkdir()
    img, txt = pairs(200, shift)
    pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(200)]}), hq / "00000000.parquet")
    write_npz(hq / "00000000.npz", {"b32_img": img, "b32_txt": txt})
    (ai, at), (bi, bt) = pairs(n // 2, shift), pairs(n // 2, -shift)
    pool = ArrayPool({"uid": np.array([f"{i:032x}" for i in range(n)])},
                     {"b32_img": np.concatenate([ai, bi]), "b32_txt": np.concatenate([at, bt])})
    ctx = Context(seed=0, batch_size=128, log=lambda *_: None)
    tree = build(FilterSpec(kind="linear_classifier", args={"model": "b32", "positives": str(hq)}), ctx)
    res = run_filters(tree, pool, 128)
    s = res.scores["linear_classifier"]
    assert s.shape == (n,) and (s[: n // 2, None] > s[None, n // 2:]).mean() > 0.9  # AUC
    assert res.fits["linear_classifier"]["negatives"] == 200
    with pytest.raises(ConfigError, match="positives"):
        build(FilterSpec(kind="linear_classifier", args={"model": "b32"}), ctx)
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"uid": pa.array([], pa.string())}), empty / "00000000.parquet")
    write_npz(empty / "00000000.npz", {"b32_img": img[:0], "b32_txt": txt[:0]})
    tree = build(FilterSpec(kind="linear_classifier", args={"model": "b32", "positives": str(empty)}), ctx)
    with pytest.raises(FilterError, match=r"needs positives \(0 in"):
        run_filters(tree, pool, 128)


def test_a_run_saved_before_an_option_existed_is_not_stale():
    """`init` (the DFN-style fine-tune's option) is newer than many saved reference runs: a saved
    config without it must still match a current one at its default, and differ from a set one."""
    from clipsift.config import to_dict
    from clipsift.training.config import TrainConfig, config_differences

    current = to_dict(TrainConfig())
    saved = {k: v for k, v in current.items() if k != "init"}
    assert config_differences(saved, current) == []
    assert config_differences(saved, {**current, "init": "runs/b32"}) == ["init"]
    assert config_differences({**saved, "lr": 1.0}, current) == ["lr"]
