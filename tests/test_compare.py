"""`clipsift compare`: config parsing, caching and resume (fast), and one end-to-end run (slow)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clipsift import config, formats
from clipsift.compare.config import CompareConfig
from clipsift.compare.run import Compare
from clipsift.runlog import write_json


def test_presets_parse_into_typed_strategies():
    tiny = config.load(CompareConfig, config.preset_path("compare", "tiny"))
    names = [s.name for s in tiny.strategies]
    for expected in ("no_filter", "basic", "clip_b32_top30", "clip_l14_top30", "laion2b", "image_based",
                     "image_based_clip_l14_top30", "semdedup_clip_l14_top30", "flyt_top30", "mflyt_top30",
                     "mflyt_scs_a015", "mflyt_scs_a025"):
        assert expected in names
    combo = next(s for s in tiny.strategies if s.name == "image_based_clip_l14_top30")
    assert combo.filter.kind == "all" and [c.kind for c in combo.filter.of] == ["image_based", "clip_score"]
    scs = next(s for s in tiny.strategies if s.name == "mflyt_scs_a025")
    assert scs.sample.method == "scs" and scs.sample.alpha == 0.25 and scs.filter is None


@pytest.mark.parametrize("strategies, message", [
    ([{"name": "a"}], "give a filter, a sample, or both"),
    ([{"name": "a", "filter": {"kind": "basic"}}, {"name": "a", "filter": {"kind": "basic"}}], "repeat"),
    ([{"name": "bad name", "filter": {"kind": "basic"}}], "letters, digits"),
    ([{"name": "a", "sample": {"method": "softcap"}}], "strategies\\[0\\].sample.method"),
    ([{"name": "a", "filtr": {"kind": "basic"}}], "unknown key strategies\\[0\\].filtr"),
])
def test_bad_strategies_are_clear_errors(strategies, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(CompareConfig, {"strategies": strategies})


def test_only_must_name_known_strategies():
    with pytest.raises(config.ConfigError, match="unknown strategies"):
        config.from_dict(CompareConfig, {"strategies": [{"name": "a", "filter": {"kind": "basic"}}], "only": ["b"]})


def _fake_result(strategy: str, seed: int, average: float) -> dict:
    tasks = [{"name": "shapes", "group": "main", "type": "classification", "main_metric": "acc1", "value": average,
              "cached": False}]
    return {"strategy": strategy, "seed": seed, "subset_size": 10, "unique": 8, "train_seconds": 1.0,
            "summary": {"model": "m", "n_tasks": 1, "average": average, "groups": {"main": average}, "tasks": tasks}}


def test_finished_runs_are_not_run_again_and_the_report_aggregates_seeds(ci_world, tmp_path):
    """A killed compare resumes: strategy x seed results on disk are reused, nothing is retrained."""
    cfg = config.from_dict(CompareConfig, {
        "out": str(tmp_path / "cmp"), "world": str(ci_world), "seeds": [0, 1], "progress": False,
        "strategies": [{"name": "a", "filter": {"kind": "no_filter"}}, {"name": "b", "filter": {"kind": "basic"}}]})
    uids = formats.u8u8_to_uids(formats.uids_to_u8u8(
        __import__("clipsift.world.generate", fromlist=["x"]).load_ground_truth(ci_world).column("uid").to_pylist()))
    for name, avg in (("a", [0.2, 0.3]), ("b", [0.5, 0.7])):
        formats.write_subset(tmp_path / "cmp" / "subsets" / name / "subset.npy", uids[: 100 if name == "a" else 50])
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
    kept = json.loads((tmp_path / "cmp" / "report" / "noise_kept.json").read_text())
    assert set(kept) == {"a", "b"} and all(0 <= v <= 1 for v in kept["a"].values())
    page = (tmp_path / "cmp" / "report" / "report.md").read_text()
    assert "![Average per strategy](average.png)" in page and (tmp_path / "cmp" / "report" / "average.png").is_file()


@pytest.mark.slow
def test_compare_end_to_end_on_the_ci_world(ci_world, tmp_path):
    """World -> reference CLIPs -> pipeline -> FLYT -> subsets -> training -> eval -> report, for real."""
    cfg = config.load(CompareConfig, config.preset_path("compare", "ci"),
                      [f"out={tmp_path / 'cmp'}", f"world={ci_world}", "progress=false"])
    results = Compare(cfg, echo=lambda s: None).run()
    by = {r["strategy"]: r for r in results}
    assert set(by) == {"no_filter", "clip_b32_top30", "flyt_scs"}
    assert by["no_filter"]["unique"] > 2900  # every readable pool sample
    assert by["clip_b32_top30"]["unique"] == pytest.approx(0.3 * by["no_filter"]["unique"], rel=0.05)
    scs = by["flyt_scs"]
    assert scs["subset_size"] > scs["unique"]  # soft cap sampling repeats high scorers
    for r in results:  # every run trained and was evaluated on every task, above chance on average
        assert r["summary"]["n_tasks"] == 5 and r["summary"]["average"] > 0.05
    report = tmp_path / "cmp" / "report"
    for name in ("results.md", "results.csv", "results.json", "report.md", "average.png", "noise_kept.png",
                 "scs_repetitions.png"):
        assert (report / name).is_file(), name
    # A second run is all cache: same results, nothing recomputed.
    again = Compare(cfg, echo=lambda s: None).run()
    assert again == results
