"""`clipsift compare`: config parsing, caching and resume (fast), and one end-to-end run (slow)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipsift import config, formats
from clipsift.compare.config import CompareConfig
from clipsift.compare.run import Compare
from clipsift.filters.base import top_fraction_threshold
from clipsift.runlog import write_json


def test_presets_parse_into_typed_strategies():
    tiny = config.load(CompareConfig, config.preset_path("compare", "tiny"))
    names = [s.name for s in tiny.strategies]
    for expected in ("no_filter", "basic", "clip_b32_top30", "clip_l14_top30", "laion2b", "image_based",
                     "image_based_clip_l14_top30", "semdedup_clip_l14_top30", "flyt_top30", "mflyt_top30",
                     "mflyt_scs_a015", "mflyt_scs_a025"):
        assert expected in names
    combo = next(s for s in tiny.strategies if s.name == "image_based_clip_l14_top30")
    assert combo.filter.kind == "all" and [c.kind for c in combo.filter.of] == ["image_based_world", "clip_score"]
    scs = next(s for s in tiny.strategies if s.name == "mflyt_scs_a025")
    assert scs.sample.method == "scs" and scs.sample.alpha == 0.25 and scs.filter is None
    learned = [s for s in tiny.strategies if s.learned]
    assert [s.name for s in learned] == ["flyt_top30", "mflyt_top30", "mflyt_scs_a015", "mflyt_scs_a025"]
    plans = {tuple(Compare(tiny, echo=lambda s: None).plan(s)) for s in learned}
    assert plans == {((0, 0), (1, 1))}  # two scorers each: the spread holds the scorer's variance


@pytest.mark.parametrize("strategies, message", [
    ([{"name": "a"}], "give a filter, a sample, or both"),
    ([{"name": "a", "filter": {"kind": "basic"}}, {"name": "a", "filter": {"kind": "basic"}}], "repeat"),
    ([{"name": "bad name", "filter": {"kind": "basic"}}], "letters, digits"),
    ([{"name": "a", "sample": {"method": "softcap"}}], "strategies\\[0\\].sample.method"),
    ([{"name": "a", "filtr": {"kind": "basic"}}], "unknown key strategies\\[0\\].filtr"),
    ([{"name": "a", "filter": {"kind": "basic"}, "scorer_seeds": [0]}], "only to a sample by a learned score"),
    ([{"name": "a", "sample": {"score": "flyt_score"}, "seeds": [0, 1], "scorer_seeds": [0]}],
     "one entry per training seed"),
    ([{"name": "a", "filter": {"kind": "all", "of": [{"kind": "clip_score", "args": {"column": "mflyt_score"}}]}}],
     "a filter cannot use \\['mflyt_score'\\]"),
])
def test_bad_strategies_are_clear_errors(strategies, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(CompareConfig, {"strategies": strategies})


def test_the_scorer_seed_and_the_mixers_inputs_are_compares_to_set():
    with pytest.raises(config.ConfigError, match="scorer_seeds instead"):
        config.from_dict(CompareConfig, {"strategies": [{"name": "a", "filter": {"kind": "basic"}}],
                                         "learned": {"flyt_overrides": ["steps=5", "seed=3"]}})
    with pytest.raises(config.ConfigError, match="learned.mflyt_columns instead"):
        config.from_dict(CompareConfig, {"strategies": [{"name": "a", "filter": {"kind": "basic"}}],
                                         "learned": {"mflyt_overrides": ["mixer.columns=[normsim_score]"]}})


def test_learned_strategies_get_one_scorer_per_seed_unless_told(tmp_path):
    cfg = config.from_dict(CompareConfig, {"out": str(tmp_path), "seeds": [0, 1], "strategies": [
        {"name": "a", "filter": {"kind": "basic"}},
        {"name": "f", "sample": {"method": "top_fraction", "score": "flyt_score"}},
        {"name": "m", "sample": {"score": "mflyt_score"}, "seeds": [3, 4], "scorer_seeds": [0, 0]},
        {"name": "c", "filter": {"kind": "basic"}, "sample": {"score": "clip_b32_similarity_score"}}]})
    compare = Compare(cfg, echo=lambda s: None)
    a, f, m, c = cfg.strategies
    assert compare.plan(a) == [(0, None), (1, None)] and compare.plan(c) == [(0, None), (1, None)]
    assert compare.plan(f) == [(0, 0), (1, 1)]
    assert compare.plan(m) == [(3, 0), (4, 0)]
    assert compare.subset_path(f, 1) == tmp_path / "subsets" / "f" / "scorer_seed1" / "subset.npy"
    assert compare.subset_path(a, None) == tmp_path / "subsets" / "a" / "subset.npy"


def test_scs_draws_the_scales_samples_seen_in_rounds_scaled_to_the_pool(tmp_path):
    """FLYT's SCS builds the training stream: total = the run's samples seen, rounds of 100k per 128M."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    meta = tmp_path / "meta"
    meta.mkdir()
    uids = formats.random_uids(rng, 6000)
    pq.write_table(pa.table({"uid": uids, "clip_b32_similarity_score": rng.normal(0.3, 0.05, 6000)}),
                   meta / "00000000.parquet")
    cfg = config.from_dict(CompareConfig, {"out": str(tmp_path / "cmp"), "scale": "ci",
                                           "scale_overrides": ["samples_seen=9000"], "strategies": [
        {"name": "scs", "sample": {"method": "scs", "score": "clip_b32_similarity_score"}},
        {"name": "scs_set", "sample": {"method": "scs", "score": "clip_b32_similarity_score", "total": 700,
                                       "batch_size": 7}}]})
    compare = Compare(cfg, echo=lambda s: None)
    compare._cache["pipeline"] = meta  # the pool's metadata, as the pipeline step would return it
    default, explicit = (formats.read_subset(compare.subset(s)) for s in cfg.strategies)
    stats = json.loads((tmp_path / "cmp" / "subsets" / "scs" / "sample_stats.json").read_text())
    assert len(default) == stats["total"] == 9000 and stats["batch_size"] == 5  # 6000 x 100k / 128M
    assert len(np.unique(default)) < 9000  # the stream repeats high scorers
    stats = json.loads((tmp_path / "cmp" / "subsets" / "scs_set" / "sample_stats.json").read_text())
    assert len(explicit) == stats["total"] == 700 and stats["batch_size"] == 7  # named options win


def test_subset_jaccard_is_plain_for_top_k_and_counts_draws_for_samplers():
    from clipsift.compare.report import jaccard

    keys = formats.uids_to_u8u8([f"{i:032x}" for i in range(5)])
    assert jaccard(keys[[0, 1, 2]], keys[[1, 2, 3]]) == 0.5  # 2 shared of 4 examples
    assert jaccard(keys[[0, 1, 2]], keys[[0, 1, 2]]) == 1.0 and jaccard(keys[[0]], keys[[4]]) == 0.0
    # same examples, different repetition: Σ min (1 + 1) / Σ max (2 + 2)
    assert jaccard(keys[[0, 0, 1]], keys[[0, 1, 1]]) == 0.5


def _row(name, values, scorers=None):
    v = np.array(values)
    return {"strategy": name, "seeds": list(range(len(values))), "scorer_seeds": scorers,
            "scorer_varies": scorers is not None and len(set(scorers)) > 1,
            "average": {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}}


def test_verdict_holds_a_learned_strategy_to_its_scorer_and_training_spread():
    from clipsift.compare.report import verdict

    rows = [_row("base", [0.300, 0.302]), _row("other", [0.280, 0.282]),  # fixed subsets: std 0.14 points
            _row("learned", [0.31, 0.27], scorers=[0, 1]), _row("low", [0.20])]  # learned: std 2.8 points
    text = verdict(rows)
    assert "covers both sources of variance" in text and "learned: mean std 2.8" in text
    # 'other' is 2 points below the best: far beyond the fixed spread, within the learned one
    ties = text.split("Not separable from the best here: ")[1].split(".")[0]
    clear = text.split("Clearly below the best: ")[1]
    assert "base" in ties and "learned" in ties and "other" in clear and "low" in clear
    one = verdict([_row("base", [0.300, 0.302]), _row("learned", [0.29], scorers=[0])])
    assert "leaves out the scorer's own variance" in one


def test_only_must_name_known_strategies():
    with pytest.raises(config.ConfigError, match="unknown strategies"):
        config.from_dict(CompareConfig, {"strategies": [{"name": "a", "filter": {"kind": "basic"}}], "only": ["b"]})


def _fake_result(strategy: str, seed: int, average: float) -> dict:
    tasks = [{"name": name, "group": group, "type": "classification", "main_metric": "acc1", "value": average,
              "cached": False} for name, group in (("shapes", "main"), ("shapes_outline", "distribution shift"))]
    return {"strategy": strategy, "seed": seed, "subset_size": 10, "unique": 8, "train_seconds": 1.0,
            "summary": {"model": "m", "n_tasks": 2, "average": average, "tasks": tasks,
                        "groups": {"main": average, "distribution shift": average}}}


def test_finished_runs_are_not_run_again_and_the_report_aggregates_seeds(ci_world, tmp_path):
    """A killed compare resumes: strategy x seed results on disk are reused, nothing is retrained."""
    cfg = config.from_dict(CompareConfig, {
        "out": str(tmp_path / "cmp"), "world": str(ci_world), "seeds": [0, 1], "progress": False,
        "strategies": [{"name": "a", "filter": {"kind": "no_filter"}}, {"name": "b", "filter": {"kind": "basic"}}]})
    uids = formats.u8u8_to_uids(formats.uids_to_u8u8(
        __import__("clipsift.world.generate", fromlist=["x"]).load_ground_truth(ci_world).column("uid").to_pylist()))
    for name, avg in (("a", [0.2, 0.3]), ("b", [0.5, 0.7])):
        # b: 50 pairs, the first 10 drawn twice (repeats count in what a subset trains on)
        formats.write_subset(tmp_path / "cmp" / "subsets" / name / "subset.npy",
                             uids[:100] if name == "a" else uids[:50] + uids[:10])
        for seed, v in zip((0, 1), avg):
            write_json(tmp_path / "cmp" / "runs" / name / f"seed{seed}" / "result.json", _fake_result(name, seed, v))
    results = Compare(cfg, echo=lambda s: None).run()  # would train for minutes if it did not reuse them
    assert [(r["strategy"], r["seed"]) for r in results] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    report = json.loads((tmp_path / "cmp" / "report" / "results.json").read_text())
    rows = {r["strategy"]: r for r in report["rows"]}
    assert rows["b"]["average"]["mean"] == pytest.approx(0.6)
    assert rows["b"]["average"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    table = (tmp_path / "cmp" / "report" / "results.md").read_text()
    assert table.index("| b |") < table.index("| a |")  # best first
    # columns in the tasks' order, although the results were read back from JSON with sorted keys
    assert table.index("| shapes |") < table.index("| shapes_outline |") < table.index("| [main] |") \
        < table.index("| [distribution shift] |")
    kept = json.loads((tmp_path / "cmp" / "report" / "noise_kept.json").read_text())
    assert set(kept) == {"a", "b"} and all(0 <= v <= 1 for v in kept["a"].values())
    content = json.loads((tmp_path / "cmp" / "report" / "content_kept.json").read_text())
    gt = __import__("clipsift.world.generate", fromlist=["x"]).load_ground_truth(ci_world).to_pylist()
    draws = [2] * 10 + [1] * 40  # b, by hand
    shape_rows = [(r, n) for r, n in zip(gt[:50], draws) if r["family"] == "shape"]
    assert content["b"]["off_task"] == pytest.approx(sum(n for r, n in zip(gt[:50], draws) if r["family"] != "shape") / 60)
    assert content["b"]["outline"] == pytest.approx(sum(n for r, n in shape_rows if r["style"] == "outline")
                                                    / sum(n for _, n in shape_rows))
    assert content["b"]["three_objects"] == pytest.approx(sum(n for r, n in shape_rows if r["count"] == 3)
                                                          / sum(n for _, n in shape_rows))
    assert content["(pool)"]["outline"] == pytest.approx(
        np.mean([r["style"] == "outline" for r in gt if r["family"] == "shape"]))
    page = (tmp_path / "cmp" / "report" / "report.md").read_text()
    assert "![Average per strategy](average.png)" in page and (tmp_path / "cmp" / "report" / "average.png").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two FLYT scorers, a retrained one and four training runs on 2 shared cores
def test_compare_end_to_end_on_the_ci_world(ci_world, tmp_path):
    """World -> reference CLIPs -> pipeline -> FLYT (one scorer per seed) -> subsets -> training ->
    eval -> report, for real."""
    import pyarrow.parquet as pq

    from clipsift.training.config import TrainConfig

    cfg = config.load(CompareConfig, config.preset_path("compare", "ci"),
                      [f"out={tmp_path / 'cmp'}", f"world={ci_world}", "progress=false"])
    compare = Compare(cfg, echo=lambda s: None)
    results = compare.run()
    by = {(r["strategy"], r["seed"]): r for r in results}
    assert set(by) == {("no_filter", 0), ("clip_b32_top30", 0), ("flyt_scs", 0), ("flyt_scs", 1)}
    assert by["no_filter", 0]["unique"] > 2900  # every readable pool sample
    assert by["clip_b32_top30", 0]["unique"] == pytest.approx(0.3 * by["no_filter", 0]["unique"], rel=0.05)
    assert by["no_filter", 0]["scorer_seed"] is None
    samples_seen = config.load(TrainConfig, config.preset_path("train", "ci")).samples_seen
    for seed in (0, 1):  # each seed its own scorer, subset and training run
        scs = by["flyt_scs", seed]
        assert scs["scorer_seed"] == seed
        assert scs["subset_size"] == samples_seen > scs["unique"]  # SCS draws the run's samples seen, with repeats
        assert (tmp_path / "cmp" / "runs" / "flyt_scs" / f"seed{seed}_scorer{seed}" / "train").is_dir()
    for r in results:  # every run trained and was evaluated on every task, above chance on average
        assert r["summary"]["n_tasks"] == 5 and r["summary"]["average"] > 0.05

    def flyt_scores(seed):
        folder = compare.learned_dir("flyt", seed) / "scores"
        return np.concatenate([pq.read_table(f, columns=["flyt_score"]).column(0).to_numpy()
                               for f in sorted(folder.glob("*.parquet"))])

    s0, s1 = flyt_scores(0), flyt_scores(1)
    assert s0.shape == s1.shape and not np.array_equal(s0, s1)  # two scorers, two score columns
    assert np.abs(s0 - s1).max() > 1e-4
    subsets = [formats.read_subset(compare.subset_path(cfg.strategies[2], seed)) for seed in (0, 1)]
    assert not np.array_equal(subsets[0], subsets[1])

    report = tmp_path / "cmp" / "report"
    for name in ("results.md", "results.csv", "results.json", "report.md", "average.png", "noise_kept.png",
                 "scs_repetitions.png"):
        assert (report / name).is_file(), name
    data = json.loads((report / "results.json").read_text())
    row = next(r for r in data["rows"] if r["strategy"] == "flyt_scs")
    assert row["scorer_seeds"] == [0, 1] and row["scorer_varies"]
    overlap = data["subset_overlap"]["flyt_scs"]
    assert overlap["scorer_seeds"] == [0, 1] and 0 < overlap["jaccard"]["0-1"] < 1
    page = (report / "report.md").read_text()
    assert "covers both sources of variance" in page and "Subset stability across scorer seeds" in page

    # A second run is all cache: same results, nothing recomputed.
    again = Compare(cfg, echo=lambda s: None).run()
    assert again == results
    # The same scorer seed retrained from nothing reproduces its scores bit for bit.
    import shutil

    shutil.rmtree(compare.learned_dir("flyt", 0))
    Compare(cfg, echo=lambda s: None).score_folder("flyt_score", 0)
    assert np.array_equal(flyt_scores(0), s0)

    # workers=2: the same runs in two processes (the fixed subsets' runs one job each, the learned
    # strategy one job per scorer seed, scorer seed 0 retrained in its job) give the same results.
    parallel = tmp_path / "cmp2"
    shutil.copytree(tmp_path / "cmp", parallel, ignore=shutil.ignore_patterns("runs", "subsets", "report"))
    shutil.rmtree(parallel / "scores" / "flyt" / "seed0")
    lines: list[str] = []
    cfg2 = config.load(CompareConfig, config.preset_path("compare", "ci"),
                       [f"out={parallel}", f"world={ci_world}", "progress=false", "workers=2"])
    results2 = Compare(cfg2, echo=lines.append).run()
    assert "[compare] 4 runs in 4 jobs over 2 worker processes" in lines, lines
    def same(r):  # the model's hash covers its checkpoint's config and log (paths, timings) too
        return {**{k: v for k, v in r.items() if k != "train_seconds"},
                "summary": {k: v for k, v in r["summary"].items() if k != "model"}}

    assert [same(r) for r in results2] == [same(r) for r in results]
    weights = [torch.load(out / "runs" / "flyt_scs" / "seed0_scorer0" / "train" / "checkpoints" / "epoch_latest.pt",
                          weights_only=False)["state_dict"] for out in (tmp_path / "cmp", parallel)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # its scorer retrained in a worker

    # A scorer saved before downstream.left_out_groups existed (every task in its loss) is refused
    # with what to do, not reused as if it had the current default.
    import yaml

    saved = parallel / "scores" / "flyt" / "seed1" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["downstream"]["left_out_groups"]
    saved.write_text(yaml.safe_dump(old))
    with pytest.raises(config.ConfigError, match="seed1: trained before downstream.left_out_groups existed"):
        Compare(cfg2, echo=lines.append).run()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two tiny reference CLIPs, the DFN fine-tune, three embeds and a 4-step M-FLYT on 2 cores
def test_mflyt_inputs_are_computed_once_and_usable_by_filters_and_the_mix(ci_world, tmp_path):
    """negCLIPLoss, the DFN-style CLIP score and the linear classifier: computed on demand over the
    ci world, a filter strategy on negclip_score and an M-FLYT mix of all three; a rerun reuses them."""
    import shutil

    import pyarrow.parquet as pq
    import yaml

    world = tmp_path / "world"  # a copy: these tiny reference budgets must not replace the session world's models
    shutil.copytree(ci_world, world, ignore=shutil.ignore_patterns("models"))
    columns = ["clip_b32_similarity_score", "negclip_score", "clip_dfn_similarity_score", "linear_classifier_score"]
    cfg = config.from_dict(CompareConfig, {
        "out": str(tmp_path / "cmp"), "world": str(world), "scale": "ci", "progress": False,
        "reference_overrides": ["samples_seen=1280", "warmup=2"], "dfn_overrides": ["samples_seen=640", "warmup=2"],
        # the reference named in the overrides is the one the mixer learns through (the DFN-style model:
        # the b32 stand-in's architecture, trained before the mix because the mix reads its score)
        "learned": {"mflyt_overrides": ["steps=4", "checkpoint_every=2", f"reference.pretrained={world / 'models' / 'dfn'}"],
                    "mflyt_columns": columns},
        "strategies": [
            {"name": "negclip_top30", "filter": {"kind": "clip_score", "args": {"column": "negclip_score", "fraction": 0.3}}},
            {"name": "mflyt_top30", "sample": {"method": "top_fraction", "score": "mflyt_score", "fraction": 0.3}},
            {"name": "mean_top30", "filter": {"kind": "score_mean", "args": {"columns": columns, "fraction": 0.3}}}]})
    compare = Compare(cfg, echo=lambda s: None)
    negclip, mflyt, mean = cfg.strategies
    kept = formats.read_subset(compare.subset(negclip))
    mixed = formats.read_subset(compare.subset(mflyt, 0))

    def column(folder, name):
        return np.concatenate([pq.read_table(f, columns=[name]).column(0).to_numpy(zero_copy_only=False)
                               for f in sorted(folder.glob("*.parquet"))])

    pool = column(compare.metadata, "uid")
    for name in columns[1:]:
        values = column(compare.score_folder(name), name)
        assert len(values) == len(pool) > 2900 and np.isfinite(values).all() and values.std() > 0, name
    # the filter ran on the pool metadata with negclip_score joined in: exactly DataComp's top 30% of it
    joined = compare.filter_metadata(negclip.filter)
    scores = column(joined, "negclip_score")
    assert np.array_equal(column(joined, "uid"), pool)
    cut = np.sort(scores)[::-1][int(0.3 * len(scores))]
    assert np.array_equal(np.sort(kept), np.sort(formats.uids_to_u8u8(list(pool[scores >= cut]))))
    # the equal-weight mean of the same columns (a list argument): every one joined in, a top 30%
    joined_all = compare.filter_metadata(mean.filter)
    z = [(v - v.mean()) / v.std(ddof=1) for v in (column(joined_all, c).astype(np.float64) for c in columns)]
    averaged = np.mean(z, axis=0).astype(np.float32)
    top = formats.read_subset(compare.subset(mean))
    expected = pool[averaged >= top_fraction_threshold(averaged, 0.3)]
    assert 0.29 * len(pool) < len(top) < 0.31 * len(pool)
    assert np.array_equal(np.sort(top), np.sort(formats.uids_to_u8u8(list(expected))))
    # M-FLYT mixed exactly those columns and scored the pool
    mix = yaml.safe_load((compare.learned_dir("mflyt", 0) / "config.yaml").read_text())["mixer"]
    assert mix["columns"] == columns
    learned_cfg = yaml.safe_load((compare.learned_dir("mflyt", 0) / "config.yaml").read_text())
    assert learned_cfg["reference"]["pretrained"] == str(world / "models" / "dfn")
    assert np.isfinite(column(compare.score_folder("mflyt_score", 0), "mflyt_score")).all()
    assert 0.25 * len(pool) < len(mixed) < 0.35 * len(pool)

    # A rerun reuses every step: no data under out/ or the world's models is rewritten (an embed call
    # whose shards are all done still rewrites its run log: config.yaml, stats.json).
    def mtimes():
        return {p: p.stat().st_mtime_ns for root in (tmp_path / "cmp", world / "models") for p in root.rglob("*")
                if p.is_file() and p.name not in ("config.yaml", "stats.json")}

    before = mtimes()
    again = Compare(cfg, echo=lambda s: None)
    for name in columns[1:]:
        again.score_folder(name)
    assert again.filter_metadata(negclip.filter) == joined and again.subset(mflyt, 0) == compare.subset(mflyt, 0)
    assert mtimes() == before


def test_gpu_preset_runs_every_demo_strategy_and_mixes_every_input():
    from clipsift.compare.run import LEARNED

    tiny, gpu = (config.load(CompareConfig, config.preset_path("compare", p)) for p in ("tiny", "gpu"))
    names = [s.name for s in gpu.strategies]
    assert set(names) - {s.name for s in tiny.strategies} == {"negclip_top30", "dfn_top30", "mflyt_scs_a025_std3",
                                                              "score_mean_top30"}
    mean = next(s.filter for s in gpu.strategies if s.name == "score_mean_top30")
    assert set(mean.args["columns"]) == set(gpu.learned.mflyt_columns) - {"flyt_score"}  # M-FLYT's fixed inputs
    paper_scs = [s.sample for s in gpu.strategies if s.sample and s.sample.method == "scs" and not s.sample.logit_std]
    assert sorted(s.alpha for s in paper_scs) == [0.15, 0.25]  # the paper's SCS rows stay beside the deviation
    assert gpu.seeds == [0, 1, 2] and all(s.seeds is None for s in gpu.strategies)  # 3 seeds each
    assert (gpu.world, gpu.scale, gpu.learned.flyt_preset, gpu.learned.mflyt_preset) == ("bench",) * 4
    inputs = {"negclip_score", "clip_dfn_similarity_score", "linear_classifier_score"}
    assert inputs | {"clip_b32_similarity_score", "clip_l14_similarity_score", "normsim_score", "flyt_score"} \
        == set(gpu.learned.mflyt_columns) and inputs <= set(LEARNED)
    assert not inputs & set(tiny.learned.mflyt_columns)  # the demo's CPU budget leaves them out
