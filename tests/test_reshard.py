"""Resharding the world's pool shards with a subset that repeats uids."""
from __future__ import annotations

import collections
import hashlib
import shutil

import numpy as np
import pytest

from clipsift import cli, formats
from clipsift.filters.reshard import ReshardConfig, ReshardError, reshard
from clipsift.runlog import read_json
from clipsift.shards import BAD_JSON, MISSING_TEXT, Sample, read_shard
from clipsift.world.generate import load_ground_truth


def read_back(folder) -> tuple[list[str], list[str]]:
    uids, keys = [], []
    for shard in formats.list_shards(folder):
        for rec in read_shard(shard):
            assert isinstance(rec, Sample), rec
            uids.append(rec.uid)
            keys.append(rec.key)
    return uids, keys


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in (".tar", ".json", ".npy", ".parquet") and p.name != "stats.json"}


@pytest.fixture(scope="module")
def subset(ci_world, tmp_path_factory):
    """Every 3rd readable uid, repeated 1-3 times, plus 2 uids that are not in the pool."""
    gt = load_ground_truth(ci_world).to_pandas()
    good = gt[gt.noise != "corrupt"].uid.tolist()
    rng = np.random.default_rng(0)
    chosen = good[::3]
    reps = {u: int(rng.integers(1, 4)) for u in chosen}
    corrupt = gt[gt.corrupt_kind.isin(["missing_caption", "malformed_json"])].uid.tolist()[:2]
    absent = ["0" * 31 + "1", "f" * 32]
    path = tmp_path_factory.mktemp("subset") / "subset.npy"
    formats.write_subset(path, [u for u, r in reps.items() for _ in range(r)] + corrupt + absent)
    return {"path": path, "reps": reps, "corrupt": corrupt, "absent": absent}


def test_reshard_writes_each_uid_once_per_repeat(ci_world, subset, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["reshard", f"shards={ci_world / 'pool' / 'shards'}", f"subset={subset['path']}",
                     f"out={out}", "samples_per_shard=700", "workers=2"]) == 0
    uids, keys = read_back(out)
    expected = collections.Counter({u: r for u, r in subset["reps"].items()})
    assert collections.Counter(uids) == expected
    assert len(set(keys)) == len(keys) and all(k.rsplit("-", 1)[0] in subset["reps"] for k in keys)
    total = sum(expected.values())
    meta = read_json(out / "meta.json")
    assert meta["written_samples"] == total and meta["output_shard_count"] == -(-total // 700)
    assert [read_json(out / formats.stats_name(i))["successes"] for i in range(meta["output_shard_count"])] == \
        [min(700, total - 700 * i) for i in range(meta["output_shard_count"])]
    assert formats.u8u8_to_uids(np.load(out / "sample_ids.npy")) == uids
    # Subset uids that cannot be written are reported: absent from the pool, or corrupt samples.
    assert meta["subset_uids_not_found"] == 4
    assert set(formats.u8u8_to_uids(np.load(out / "uids_not_found.npy"))) == set(subset["absent"] + subset["corrupt"])
    dropped = read_json(out / "stats.json")["counts"]["dropped"]
    assert dropped[BAD_JSON] > 0 and dropped[MISSING_TEXT] > 0  # the world's corrupt samples, counted by reason


def test_reshard_resumes_to_identical_output(ci_world, subset, tmp_path):
    cfg = dict(shards=str(ci_world / "pool" / "shards"), subset=str(subset["path"]), samples_per_shard=500)
    full = tmp_path / "full"
    reshard(ReshardConfig(out=str(full), workers=2, **cfg), log=lambda s: None)
    # A run killed midway: some output shards and the final files missing, one scan cache missing.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for name in ("00000001.tar", "00000003.tar", "meta.json", "sample_ids.npy"):
        (part / name).unlink()
    (part / "scan" / "00000002.json").unlink()
    stats = reshard(ReshardConfig(out=str(part), workers=1, **cfg), log=lambda s: None)
    assert (stats["output_shards_written_this_run"], stats["input_shards_scanned_this_run"]) == (2, 1)
    assert digests(part) == digests(full)
    with pytest.raises(ReshardError, match="another subset"):
        reshard(ReshardConfig(out=str(part), **{**cfg, "samples_per_shard": 400}), log=lambda s: None)


def test_missing_stats_and_unreadable_shards_are_loud_or_reported(ci_world, subset, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(ci_world / "pool" / "shards", shards)
    (shards / formats.stats_name(1)).unlink()
    cfg = dict(shards=str(shards), subset=str(subset["path"]), workers=1)
    with pytest.raises(ReshardError, match="00000001.tar: no 00000001_stats.json"):
        reshard(ReshardConfig(out=str(tmp_path / "a"), **cfg), log=lambda s: None)
    stats = reshard(ReshardConfig(out=str(tmp_path / "b"), on_missing_stats="skip", **cfg), log=lambda s: None)
    assert stats["meta"]["skipped_input_shards"] == {"00000001.tar": "missing_stats_file"}
    in_shard1 = {r.uid for r in read_shard(ci_world / "pool" / "shards" / "00000001.tar") if isinstance(r, Sample)}
    written, _ = read_back(tmp_path / "b")
    assert written and not set(written) & in_shard1
    shutil.copy(ci_world / "pool" / "shards" / formats.stats_name(1), shards / formats.stats_name(1))
    (shards / "00000002.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ReshardError, match="00000002.tar: unreadable shard"):
        reshard(ReshardConfig(out=str(tmp_path / "c"), **cfg), log=lambda s: None)
    stats = reshard(ReshardConfig(out=str(tmp_path / "d"), on_unreadable_shard="skip", **cfg), log=lambda s: None)
    assert stats["meta"]["skipped_input_shards"] == {"00000002.tar": "unreadable_shard"}
    assert stats["counts"]["dropped"]["unreadable_shard"] == 1
