"""Filters on the `ci` world: every baseline against a plain re-implementation of DataComp's rule,
planted noise caught (ground truth), ties kept, SemDeDup on the planted duplicates, NormSim.

The world's metadata has no scores or embeddings yet (the pipeline adds them), so the fixture adds
them: CLIP-score columns with many ties (known values), image embeddings from a real (randomly
initialised, seeded) tiny open_clip model on the pool images and the shapes task's train images,
and a `dup_img` embedding built from the ground truth so each duplicate group shares a direction.
"""
from __future__ import annotations

import io
import re
import shutil
import tarfile

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipsift import cli, config, formats
from clipsift.filters import filter_cli
from clipsift.filters.image_based import normsim_scores
from clipsift.filters.lang import identifier
from clipsift.filters.filter_cli import FilterRunConfig
from clipsift.shards import Sample, read_shard
from clipsift.world.generate import load_ground_truth


def _tiny_clip():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(embed_dim=64, vision_cfg=dict(image_size=32, layers=2, width=64, head_width=16, patch_size=4),
                text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=4, layers=2)).eval()


def _pixels(data: bytes) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32))
        return np.asarray(img, dtype=np.float32) / 255.0
    except Exception:  # the world's truncated JPEGs: embed a blank image
        return np.zeros((32, 32, 3), np.float32)


@torch.no_grad()
def _embed(model, images: list[np.ndarray]) -> np.ndarray:
    x = (torch.tensor(np.stack(images)).permute(0, 3, 1, 2) - 0.5) / 0.25
    return model.encode_image(x).numpy().astype(np.float16)


@pytest.fixture(scope="module")
def world(ci_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("scored")
    model = _tiny_clip()
    images = {}
    for shard in formats.list_shards(ci_world / "pool" / "shards"):
        for rec in read_shard(shard):
            if isinstance(rec, Sample):
                images[rec.uid] = _pixels(rec.image)
    gt = load_ground_truth(ci_world).to_pandas()
    rng = np.random.default_rng(0)
    groups = {g: rng.normal(size=32) for g in sorted(set(gt.dup_group)) if g >= 0}
    meta_dir = root / "metadata"
    meta_dir.mkdir()
    for path in sorted((ci_world / "pool" / "metadata").glob("*.parquet")):
        t = pq.read_table(path)
        n = t.num_rows
        # Scores on a 0.01 grid: plenty of ties, including at any fraction's threshold.
        b32 = np.round(rng.uniform(0.1, 0.4, n), 2).astype(np.float32)
        l14 = np.round(rng.uniform(0.1, 0.4, n), 2).astype(np.float32)
        t = t.append_column("clip_b32_similarity_score", pa.array(b32)).append_column(
            "clip_l14_similarity_score", pa.array(l14))
        pq.write_table(t, meta_dir / path.name)
        uids = t.column("uid").to_pylist()
        img = _embed(model, [images.get(u, np.zeros((32, 32, 3), np.float32)) for u in uids])
        g = gt.set_index("uid").loc[uids]
        dup = np.stack([groups[d] + (0.02 * rng.normal(size=32) if k == "near_duplicate" else 0)
                        if d >= 0 else rng.normal(size=32) for d, k in zip(g.dup_group, g.noise)])
        np.savez(meta_dir / path.with_suffix(".npz").name, l14_img=img, b32_img=img, dup_img=dup.astype(np.float16))
    # Downstream: the shapes task's train images through the same model.
    train = []
    for tar in sorted((ci_world / "tasks" / "shapes" / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            train += [_pixels(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".jpg")]
    np.save(root / "downstream.npy", _embed(model, train))
    meta = pd.concat([pq.read_table(p).to_pandas() for p in sorted(meta_dir.glob("*.parquet"))], ignore_index=True)
    emb = np.concatenate([np.load(p)["l14_img"] for p in sorted(meta_dir.glob("*.npz"))])
    return {"root": root, "world": ci_world, "metadata": meta_dir, "meta": meta, "gt": gt, "l14": emb,
            "downstream": root / "downstream.npy"}


def run_preset(world, name, tmp_path, *overrides):
    cfg = config.load(FilterRunConfig, config.preset_path("filters", name),
                      [f"metadata={world['metadata']}", f"out={tmp_path / name}", *overrides])
    stats = filter_cli.run(cfg, log=lambda s: None)
    uids = set(formats.u8u8_to_uids(formats.read_subset(tmp_path / name / "subset.npy")))
    return uids, stats


# ---------------------------------------------------------------- plain versions of DataComp's rules
def english(texts, backend="fasttext") -> np.ndarray:
    return identifier(backend).predict(list(texts)) == "en"


def basic_rule(m: pd.DataFrame) -> np.ndarray:
    words = m.text.map(lambda t: len(t.split())).values
    chars = m.text.map(len).values
    lo = np.minimum(m.original_width, m.original_height).values
    hi = np.maximum(m.original_width, m.original_height).values
    return english(m.text) & (words > 2) & (chars > 5) & (lo >= 200) & (hi / lo <= 3.0)


def top_fraction(scores: np.ndarray, f: float) -> np.ndarray:
    threshold = -np.sort(-scores)[int(len(scores) * f)]
    return scores >= threshold


def uids(m, mask) -> set[str]:
    return set(m.uid[mask])


def test_no_filter_basic_clip_score_laion_match_plain_rules(world, tmp_path):
    m = world["meta"]
    assert run_preset(world, "no_filter", tmp_path)[0] == set(m.uid)
    assert run_preset(world, "basic", tmp_path)[0] == uids(m, basic_rule(m))
    l14 = m.clip_l14_similarity_score.values
    assert run_preset(world, "clip_score_l14_30", tmp_path)[0] == uids(m, top_fraction(l14, 0.3))
    b32 = m.clip_b32_similarity_score.values
    assert run_preset(world, "clip_score_b32_30", tmp_path)[0] == uids(m, top_fraction(b32, 0.3))
    got, _ = run_preset(world, "clip_score_l14_30", tmp_path, "filter.args={column: b32, threshold: 0.3}")
    assert got == uids(m, b32 >= np.float32(0.3))
    assert run_preset(world, "laion2b", tmp_path)[0] == uids(m, english(m.text, "cld3") & (b32 >= np.float32(0.28)))


def test_text_based_matches_plain_rule(world, tmp_path):
    m = world["meta"]
    names = set()
    for task in ("shapes", "shapes_outline", "colour_shape", "count"):
        names |= {n.strip().lower() for n in (world["world"] / "tasks" / task / "classnames.txt").read_text().splitlines() if n.strip()}
    # A concept matches as whole words, in singular or -s/-es plural form.
    patterns = [re.compile(r"(?<!\w)" + re.escape(n) + r"(e?s)?(?!\w)") for n in names]

    def names_concept(text: str) -> bool:
        t = " ".join(re.sub(r"^\W+|\W+$", "", w) for w in text.lower().split())
        return any(p.search(t) for p in patterns)

    expected = english(m.text) & m.text.map(names_concept).values
    got, stats = run_preset(world, "text_based_world", tmp_path, f"downstream.concepts={world['world']}")
    assert got == uids(m, expected)
    assert 0 < len(got) < len(m)
    assert stats["filters"]["text_based_world"]["counts"]["dropped"]["no_concept"] > 0


def image_based_plain(world, k: int) -> np.ndarray:
    m, x = world["meta"], world["l14"].astype(np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    pre = english(m.text) & (m.text.map(lambda t: len(t.split())).values > 1) & (m.text.map(len).values > 5)
    km = faiss.Kmeans(x.shape[1], k, niter=20, seed=0, spherical=True)
    km.train(x[pre])
    c = km.centroids
    d = np.load(world["downstream"]).astype(np.float32)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    targets = np.unique((d @ c.T).argmax(1))
    return pre & np.isin((x @ c.T).argmax(1), targets)


def test_image_based_world_and_intersection_match_plain_rule(world, tmp_path):
    m = world["meta"]
    expected = image_based_plain(world, k=16)
    down = f"downstream.embeddings={world['downstream']}"
    got, stats = run_preset(world, "image_based_world", tmp_path, down, "filter.args.centroids=16")
    assert got == uids(m, expected)
    fit = stats["filters"]["image_based_world"]["fit"]
    assert fit["kmeans"]["trained_on_points"] == fit["caption_prefilter_passed"]  # no hidden subsampling
    assert 0 < len(got) < len(m)
    # DataComp-1B's recipe: image-based ∩ L/14 top 30%.
    cfg = config.load(FilterRunConfig, config.preset_path("filters", "image_based_world_clip_l14_30"),
                      [f"metadata={world['metadata']}", f"out={tmp_path / 'both'}", down])
    cfg.filter.of[0].args["centroids"] = 16
    stats = filter_cli.run(cfg, log=lambda s: None)
    both = set(formats.u8u8_to_uids(formats.read_subset(tmp_path / "both" / "subset.npy")))
    assert both == uids(m, expected & top_fraction(m.clip_l14_similarity_score.values, 0.3))
    # Each rule counted on its own, and drops attributed to the first rule that rejected the row.
    per = stats["filters"]
    assert per["image_based_world"]["counts"]["kept"] == int(expected.sum())
    assert stats["counts"]["kept"] == len(both)
    assert sum(stats["counts"]["dropped"].values()) == len(m) - len(both)


def test_image_based_world_reports_subsampling(world, tmp_path):
    _, stats = run_preset(world, "image_based_world", tmp_path, f"downstream.embeddings={world['downstream']}",
                          "filter.args={centroids: 16, max_points_per_centroid: 40}")
    fit = stats["filters"]["image_based_world"]["fit"]
    assert fit["kmeans"]["trained_on_points"] == 16 * 40
    assert f"trained on 640 of {fit['caption_prefilter_passed']}" in fit["subsampled"]


def test_basic_and_language_catch_planted_noise(world, tmp_path):
    gt, m = world["gt"], world["meta"]
    assert list(gt.uid) == list(m.uid)
    kept_basic, _ = run_preset(world, "basic", tmp_path)
    cfg = config.load(FilterRunConfig, None, [f"metadata={world['metadata']}", f"out={tmp_path / 'en'}",
                                              "filter.kind=english"])
    filter_cli.run(cfg, log=lambda s: None)
    kept_en = set(formats.u8u8_to_uids(formats.read_subset(tmp_path / "en" / "subset.npy")))
    dropped_en = ~gt.uid.isin(kept_en).values
    dropped_basic = ~gt.uid.isin(kept_basic).values
    foreign, junk = (gt.noise == "foreign").values, (gt.noise == "junk").values
    # Language id: every foreign caption caught; what it drops is mostly foreign or junk text.
    assert dropped_en[foreign].mean() >= 0.95
    assert (foreign | junk)[dropped_en].mean() >= 0.45
    # Basic: junk and foreign caught; small / extreme-aspect images always dropped.
    assert dropped_basic[junk].mean() >= 0.9
    assert dropped_basic[foreign].mean() >= 0.95
    assert dropped_basic[(gt.small | gt.extreme_aspect).values].all()
    should_drop = foreign | junk | (gt.small | gt.extreme_aspect).values | (m.text.map(lambda t: len(t.split())) <= 2).values
    assert should_drop[dropped_basic].mean() >= 0.6  # precision; the rest are short English captions the language id misses
    clean = (gt.noise == "clean").values & ~should_drop
    assert (~dropped_basic[clean]).mean() >= 0.85


def test_clip_score_fraction_keeps_ties(world, tmp_path):
    m = world["meta"]
    s = m.clip_l14_similarity_score.values
    got, stats = run_preset(world, "clip_score_l14_30", tmp_path)
    fit = stats["filters"]["clip_score"]["fit"]
    threshold = -np.sort(-s)[int(len(s) * 0.3)]
    assert fit["threshold"] == pytest.approx(float(threshold))
    assert fit["ties_at_threshold"] == int((s == threshold).sum()) > 1
    assert len(got) > int(len(s) * 0.3)  # ties at the threshold push past N * f ...
    assert set(m.uid[s == threshold]) <= got  # ... and every tied row is kept
    assert not (set(m.uid[s < threshold]) & got)


def test_semdedup_removes_planted_duplicates_and_resumes(world, tmp_path):
    gt = world["gt"]
    args = ["filter.kind=semdedup", "filter.args={embedding: dup_img, epsilon: 0.05, clusters: 8, clusters_per_file: 2}"]
    cfg = config.load(FilterRunConfig, None, [f"metadata={world['metadata']}", f"out={tmp_path / 'sd'}", *args])
    stats = filter_cli.run(cfg, log=lambda s: None)
    kept = set(formats.u8u8_to_uids(formats.read_subset(tmp_path / "sd" / "subset.npy")))
    dup = (gt.dup_group >= 0).values
    kept_mask = gt.uid.isin(kept).values
    # Exactly one survivor per duplicate group; nothing outside the groups removed.
    survivors = gt[dup & kept_mask].groupby("dup_group").size()
    assert set(survivors.index) == set(gt.dup_group[dup]) and (survivors == 1).all()
    assert kept_mask[~dup].all()
    fit = stats["filters"]["semdedup"]["fit"]
    assert fit["dropped"] == int(dup.sum()) - gt.dup_group[dup].nunique()
    assert fit["cluster_files_computed"] == 4
    # Resume: a run killed after some cluster groups finished recomputes only the missing ones.
    files = sorted((tmp_path / "sd" / "work" / "semdedup" / "clusters").glob("*.npz"))
    files[1].unlink()
    stats2 = filter_cli.run(cfg, log=lambda s: None)
    fit2 = stats2["filters"]["semdedup"]["fit"]
    assert (fit2["cluster_files_resumed"], fit2["cluster_files_computed"]) == (3, 1)
    assert set(formats.u8u8_to_uids(formats.read_subset(tmp_path / "sd" / "subset.npy"))) == kept
    # State from other parameters is refused, not reused.
    other = config.load(FilterRunConfig, None, [f"metadata={world['metadata']}", f"out={tmp_path / 'sd'}",
                                                "filter.kind=semdedup", "filter.args={embedding: dup_img, epsilon: 0.2, clusters: 8}"])
    with pytest.raises(ValueError, match="another pool or other parameters"):
        filter_cli.run(other, log=lambda s: None)


def test_normsim_scores_match_brute_force(world, tmp_path):
    x = world["l14"].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = np.load(world["downstream"]).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    got, stats = run_preset(world, "normsim", tmp_path, f"downstream.embeddings={world['downstream']}")
    scores = pq.read_table(tmp_path / "normsim" / "scores.parquet").to_pandas()
    assert list(scores.uid) == list(world["meta"].uid)
    np.testing.assert_allclose(scores.normsim_score.values, (x @ d.T).max(1), atol=1e-5)
    assert got == uids(world["meta"], top_fraction(scores.normsim_score.values, 0.3))
    np.testing.assert_allclose(normsim_scores(x[:50], d, 2.0), np.sqrt(((x[:50] @ d.T) ** 2).sum(1)), rtol=1e-5)


def test_filter_command_writes_subset_stats_and_config(world, tmp_path):
    out = tmp_path / "cmd"
    assert cli.main(["filter", "-p", "basic", f"metadata={world['metadata']}", f"out={out}"]) == 0
    arr = np.load(out / "subset.npy")
    assert arr.dtype == np.dtype("u8,u8") and (np.sort(arr, order=["f0", "f1"]) == arr).all()
    stats = (out / "stats.json").read_text()
    assert "not_english" in stats and "small_image" in stats
    resolved = config.load(FilterRunConfig, out / "config.yaml")
    assert resolved.filter.kind == "basic" and resolved.lang.backend == ""
    shutil.rmtree(out)
