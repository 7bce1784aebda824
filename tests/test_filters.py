"""Filter components on small constructed pools: composition, config errors, bad inputs, SemDeDup tiling."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsift import config, formats
from clipsift.filters import kmeans
from clipsift.filters.base import Context, FilterError, FilterSpec, build, run_filters, top_fraction_threshold
from clipsift.filters.filter_cli import FilterRunConfig, run
from clipsift.filters.lang import LangConfig, Languages, identifier
from clipsift.filters.pool import ArrayPool, MetadataPool
from clipsift.filters.semdedup import dedup_ordered


def make_pool(n=200, seed=0) -> ArrayPool:
    rng = np.random.default_rng(seed)
    texts = np.array([("a photo of a red circle on a table" if i % 4 else "ein rotes Quadrat auf dem Tisch")
                      if i % 5 else "IMG_1" for i in range(n)], dtype=object)
    return ArrayPool(
        {"uid": np.array([f"{i:032x}" for i in range(n)], dtype=object), "text": texts,
         "original_width": rng.integers(100, 600, n), "original_height": rng.integers(100, 600, n),
         "clip_b32_similarity_score": np.round(rng.uniform(0, 0.4, n), 2).astype(np.float32)},
        {"l14_img": rng.normal(size=(n, 16)).astype(np.float16)})


def ctx(**kw) -> Context:
    return Context(lang=Languages(), log=lambda s: None, **kw)


def spec(d: dict) -> FilterSpec:
    return config.from_dict(FilterSpec, d)


def test_all_and_any_groups_combine_and_attribute_drops():
    pool = make_pool()
    tree = build(spec({"kind": "all", "of": [{"kind": "english"},
                                             {"kind": "clip_score", "args": {"column": "b32", "threshold": 0.2}}]}), ctx())
    res = run_filters(tree, pool)
    en = identifier("fasttext").predict(pool.columns["text"]) == "en"
    hi = pool.columns["clip_b32_similarity_score"] >= np.float32(0.2)
    assert (res.keep == (en & hi)).all()
    # per-filter counts are each rule on its own; the total attributes a drop to the first rejecting rule
    assert res.per_filter["english"].kept == en.sum() and res.per_filter["clip_score"].kept == hi.sum()
    assert res.counts.dropped["english:not_english"] == (~en).sum()
    assert res.counts.dropped["clip_score:low_score"] == (en & ~hi).sum()
    union = run_filters(build(spec({"kind": "any", "of": [{"kind": "english"},
                                                         {"kind": "clip_score", "args": {"column": "b32", "threshold": 0.2}}]}), ctx()), pool,
                        batch_size=64)  # several batches: the kept uids still come out in pool order
    assert (union.keep == (en | hi)).all()
    assert formats.u8u8_to_uids(union.uids) == [u for u, k in zip(pool.columns["uid"], en | hi) if k]


def test_score_mean_ranks_by_the_mean_of_standardised_scores_missing_as_the_mean():
    """Hand-computed: two columns on different scales, one missing value; the top half by the mean
    of the z-scores, over several batches; a constant column or a single column is refused."""
    pool = make_pool(n=6)
    pool.columns["clip_b32_similarity_score"] = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], np.float32)
    pool.columns["other"] = np.array([10.0, 60.0, np.nan, 20.0, 50.0, 30.0], np.float32)
    a, b = (np.asarray(pool.columns[c], np.float64) for c in ("clip_b32_similarity_score", "other"))
    za = (a - a.mean()) / a.std(ddof=1)
    fb = b[np.isfinite(b)]
    zb = np.where(np.isfinite(b), (b - fb.mean()) / fb.std(ddof=1), 0.0)
    expected = (za + zb) / 2  # [-1.25, 0.23, -0.13, -0.20, 0.79, 0.57]
    res = run_filters(build(spec({"kind": "score_mean", "args": {"columns": ["b32", "other"], "fraction": 0.5}}),
                            ctx()), pool, batch_size=4)
    np.testing.assert_allclose(res.scores["score_mean"], expected, rtol=1e-5)
    cut = top_fraction_threshold(expected.astype(np.float32), 0.5)  # the one top-fraction rule (DataComp's)
    assert res.keep.tolist() == (expected.astype(np.float32) >= cut).tolist()
    assert res.keep[[1, 4, 5]].all() and not res.keep[[0, 3]].any()  # row 2 (other missing: z 0) sits at the cut
    pool.columns["other"] = np.full(6, 3.0, np.float32)
    with pytest.raises(FilterError, match="other has no spread"):
        run_filters(build(spec({"kind": "score_mean", "args": {"columns": ["b32", "other"], "fraction": 0.5}}), ctx()), pool)
    with pytest.raises(config.ConfigError, match="at least two different"):
        build(spec({"kind": "score_mean", "args": {"columns": ["b32", "clip_b32_similarity_score"], "fraction": 0.5}}), ctx())


def test_a_kept_row_with_a_bad_uid_is_named():
    pool = make_pool()
    pool.columns["uid"][130] = pool.columns["uid"][130].upper().replace("0", "A")
    with pytest.raises(formats.FormatError, match=f"'{pool.columns['uid'][130]}' is not 32 lowercase hex"):
        run_filters(build(spec({"kind": "no_filter"}), ctx()), pool, batch_size=64)


def test_repeated_filters_get_distinct_names():
    tree = build(spec({"kind": "all", "of": [{"kind": "clip_score", "args": {"threshold": 0.1}},
                                             {"kind": "clip_score", "args": {"threshold": 0.2}}]}), ctx())
    assert [leaf.name for leaf in tree.leaves()] == ["clip_score", "clip_score#2"]


@pytest.mark.parametrize("bad, message", [
    ({"kind": "nope"}, "unknown filter 'nope'"),
    ({"kind": "basic", "args": {"min_wrds": 3}}, "unknown key filter.args.min_wrds"),
    ({"kind": "basic", "args": {"min_words": "three"}}, "expected an integer"),
    ({"kind": "clip_score", "args": {"threshold": 0.3, "fraction": 0.3}}, "not both"),
    ({"kind": "clip_score"}, "needs a threshold or a pool fraction"),
    ({"kind": "clip_score", "args": {"fraction": 1.5}}, r"fraction must be in \(0, 1\]"),
    ({"kind": "all"}, "needs at least one filter"),
    ({"kind": "basic", "of": [{"kind": "english"}]}, "only `all`/`any` groups take `of`"),
    ({"kind": "semdedup", "args": {"order": "random"}}, "is not one of"),
])
def test_bad_filter_configs_are_clear_errors(bad, message):
    with pytest.raises(config.ConfigError, match=message):
        build(spec(bad), ctx())


def test_text_based_world_without_concepts_and_image_based_world_without_downstream_fail_clearly():
    with pytest.raises(FilterError, match="needs concept names"):
        build(spec({"kind": "text_based_world"}), ctx())
    tree = build(spec({"kind": "image_based_world", "args": {"centroids": 2}}), ctx())
    with pytest.raises(FilterError, match="downstream training-image embeddings"):
        run_filters(tree, make_pool())


def test_language_resources_errors_name_the_problem(tmp_path):
    langs = Languages(LangConfig(fasttext_model=str(tmp_path / "lid.176.bin")))
    with pytest.raises(FilterError, match="lid.176.bin does not exist"):
        langs.get("fasttext")
    (tmp_path / "lid.176.bin").write_bytes(b"not the model")
    with pytest.raises(FilterError, match="not DataComp's lid.176.bin"):
        langs.get("fasttext")
    with pytest.raises(FilterError, match="not a WordNet dict folder"):
        build(spec({"kind": "text_based", "args": {"wordnet_dir": str(tmp_path)}}), ctx())
    (tmp_path / "ids.txt").write_text("n02084071\n")
    with pytest.raises(FilterError, match="sha256 differs"):
        build(spec({"kind": "text_based", "args": {"in21k_synsets": str(tmp_path / "ids.txt")}}), ctx())
    assert build(spec({"kind": "text_based", "args": {"in21k_synsets": str(tmp_path / "ids.txt"),
                                                      "in21k_check": False}}), ctx())


def _write_chunk(folder, name, n, with_npz=True, drop=()):
    rng = np.random.default_rng(len(name))
    cols = {"uid": [f"{name}{i:030x}"[-32:] for i in range(n)], "text": ["a red circle on a table"] * n,
            "original_width": [300] * n, "original_height": [300] * n,
            "clip_l14_similarity_score": rng.uniform(0, 1, n).astype(np.float32)}
    pq.write_table(pa.table({k: v for k, v in cols.items() if k not in drop}), folder / f"{name}.parquet")
    if with_npz:
        np.savez(folder / f"{name}.npz", l14_img=rng.normal(size=(n, 8)).astype(np.float16))


def test_metadata_pool_reads_chunks_in_order_and_reports_bad_input(tmp_path):
    _write_chunk(tmp_path, "aa", 5)
    _write_chunk(tmp_path, "bb", 7)
    pool = MetadataPool(tmp_path)
    batches = list(pool.batches({"text"}, {"l14_img"}, batch_size=4))
    assert [b.offset for b in batches] == [0, 4, 5, 9]
    assert sum(len(b) for b in batches) == pool.num_rows == 12
    (tmp_path / "bb.npz").unlink()
    with pytest.raises(FilterError, match="bb.npz: embeddings file missing"):
        list(pool.batches(set(), {"l14_img"}))
    with pytest.raises(FilterError, match=r"aa.npz: no array\(s\) \['b32_img'\]"):
        list(pool.batches(set(), {"b32_img"}))
    with pytest.raises(FilterError, match=r"missing column\(s\) \['clip_b32_similarity_score'\]"):
        list(pool.batches({"clip_b32_similarity_score"}))
    np.savez(tmp_path / "bb.npz", l14_img=np.zeros((3, 8), np.float16))
    with pytest.raises(FilterError, match=r"shape \(3, 8\); expected \(7, dim\)"):
        list(pool.batches(set(), {"l14_img"}))


def test_filter_run_on_metadata_folder_writes_outputs(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    _write_chunk(meta, "aa", 50)
    _write_chunk(meta, "bb", 30)
    cfg = config.load(FilterRunConfig, config.preset_path("filters", "clip_score_l14_30"),
                      [f"metadata={meta}", f"out={tmp_path / 'out'}"])
    stats = run(cfg, log=lambda s: None)
    assert stats["counts"]["kept"] == 25  # int(80 * 0.3) + 1: distinct scores, the row at the rank is kept
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "stats.json").is_file()


def naive_greedy(x: np.ndarray, threshold: float) -> np.ndarray:
    kept: list[int] = []
    for i in range(len(x)):
        if not kept or (x[kept] @ x[i]).max() <= threshold:
            kept.append(i)
    keep = np.zeros(len(x), dtype=bool)
    keep[kept] = True
    return keep


def test_dedup_ordered_tiled_equals_naive_greedy():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(40, 24))
    # chains of near copies: i ~ j ~ k where i and k are further apart (greedy order matters)
    x = np.concatenate([base, base[:25] + 0.15 * rng.normal(size=(25, 24)), base[:10] + 0.3 * rng.normal(size=(10, 24))])
    x = kmeans.normalize(x[rng.permutation(len(x))])
    for threshold in (0.9, 0.97, 0.995):
        expected = naive_greedy(x, threshold)
        assert 0 < (~expected).sum()
        for tile in (1, 7, 16, 1000):
            keep, dup_of, best = dedup_ordered(x, threshold, tile)
            assert (keep == expected).all(), (threshold, tile)
            dropped = np.flatnonzero(~keep)
            assert (dup_of[dropped] < dropped).all() and keep[dup_of[dropped]].all()
            np.testing.assert_allclose(best[dropped], (x[dropped] * x[dup_of[dropped]]).sum(1), rtol=1e-5)
            assert (best[dropped] > threshold).all()


def test_kmeans_training_subsample_is_seeded_and_bounded():
    cands = np.arange(10_000)
    a = kmeans.training_rows(cands, 4, 100, seed=1)
    assert len(a) == 400 and (np.diff(a) > 0).all()
    assert (a == kmeans.training_rows(cands, 4, 100, seed=1)).all()
    assert len(kmeans.training_rows(cands[:300], 4, 100, seed=1)) == 300
    with pytest.raises(FilterError, match="needs at least 5 points"):
        kmeans.train(np.zeros((3, 4), np.float32), 5, 2, 0)
