"""Resharding the world's pool shards with a subset that repeats uids."""
from __future__ import annotations

import collections
import hashlib
import shutil

import numpy as np
import pytest

from clipsift import cli, config, formats
from clipsift.filters.reshard import ReshardConfig, ReshardError, reshard
from clipsift.runlog import read_json
from clipsift.shards import BAD_JSON, CORRUPT_IMAGE, MISSING_TEXT, SIZES_FILE, Sample, read_shard, write_sizes_json
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
    """Every 3rd readable uid, repeated 1-3 times, the world's truncated JPEGs, corrupt samples and
    2 uids that are not in the pool."""
    gt = load_ground_truth(ci_world).to_pandas()
    good = gt[gt.noise != "corrupt"].uid.tolist()
    rng = np.random.default_rng(0)
    chosen = good[::3]
    reps = {u: int(rng.integers(1, 4)) for u in chosen}
    corrupt = gt[gt.corrupt_kind.isin(["missing_caption", "malformed_json"])].uid.tolist()[:2]
    truncated = gt[gt.corrupt_kind == "truncated_jpeg"].uid.tolist()
    assert truncated
    absent = ["0" * 31 + "1", "f" * 32]
    path = tmp_path_factory.mktemp("subset") / "subset.npy"
    formats.write_subset(path, [u for u, r in reps.items() for _ in range(r)] + corrupt + truncated + absent)
    return {"path": path, "reps": reps, "corrupt": corrupt, "truncated": truncated, "absent": absent}


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
    # sample_ids.npy is the subset file as DataComp writes it (sorted u8,u8); the output order has its own file.
    assert (out / "sample_ids.npy").read_bytes() == subset["path"].read_bytes()
    ids = np.load(out / "sample_ids.npy")
    assert ids.dtype == np.dtype("u8,u8") and (np.sort(ids, order=["f0", "f1"]) == ids).all()
    assert formats.u8u8_to_uids(np.load(out / "written_ids.npy")) == uids
    # Subset uids that cannot be written are reported: absent from the pool, corrupt samples, truncated JPEGs.
    lost = subset["absent"] + subset["corrupt"] + subset["truncated"]
    assert meta["subset_uids_not_found"] == len(lost)
    assert set(formats.u8u8_to_uids(np.load(out / "uids_not_found.npy"))) == set(lost)
    stats = read_json(out / "stats.json")
    dropped = stats["counts"]["dropped"]
    assert dropped[BAD_JSON] > 0 and dropped[MISSING_TEXT] > 0  # the world's corrupt samples, counted by reason
    # The decode check (on by default) drops the truncated JPEGs and says why.
    assert dropped[CORRUPT_IMAGE] == meta["corrupt_images"] == len(subset["truncated"])
    assert sum(stats["corrupt_images"].values()) == len(subset["truncated"])
    assert all("truncated" in k.lower() for k in stats["corrupt_images"]), stats["corrupt_images"]
    assert meta["duplicate_uid_copies"] == 0
    # sizes.json (open_clip_train's sample count) is what a reader of the written shards counts.
    sizes = read_json(out / SIZES_FILE)
    assert sizes == write_sizes_json(out) and sum(sizes.values()) == total


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
    # A finished shard is known by its marker, not by a .tar of that name: a stray tar is rewritten.
    (part / "00000002.tar").write_bytes(b"not this run's shard")
    stats = reshard(ReshardConfig(out=str(part), workers=1, **cfg), log=lambda s: None)
    assert stats["output_shards_written_this_run"] == 1 and digests(part) == digests(full)
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


def test_out_folder_overlapping_inputs_or_holding_other_tars_is_refused(ci_world, subset, tmp_path, capsys):
    shards = ci_world / "pool" / "shards"
    capsys.readouterr()
    assert cli.main(["reshard", f"shards={shards}", f"subset={subset['path']}", f"out={shards}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "overlaps the input shard folder" in err[0], err  # one line, no traceback
    for out in (shards, shards / "sub", shards.parent):
        with pytest.raises(config.ConfigError, match="overlaps the input shard folder"):
            reshard(ReshardConfig(shards=str(shards), subset=str(subset["path"]), out=str(out)), log=lambda s: None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "00000000.tar").write_bytes(b"x")
    with pytest.raises(ReshardError, match="no clipsift reshard wrote here"):
        reshard(ReshardConfig(shards=str(shards), subset=str(subset["path"]), out=str(other)), log=lambda s: None)
    assert not (shards / "sub").exists() and not (other / "state.json").exists()


def test_duplicate_input_uids_keep_every_copy(ci_world, subset, tmp_path):
    """A pool whose shard 3 repeats shard 0: each subset uid of shard 0 is written for both copies."""
    shards = tmp_path / "shards"
    shutil.copytree(ci_world / "pool" / "shards", shards)
    for suffix in (".tar", "_stats.json", ".parquet"):
        shutil.copy(shards / f"00000000{suffix}", shards / f"00000099{suffix}")
    in_shard0 = {r.uid for r in read_shard(shards / "00000000.tar") if isinstance(r, Sample)}
    out = tmp_path / "out"
    stats = reshard(ReshardConfig(shards=str(shards), subset=str(subset["path"]), out=str(out), workers=1),
                    log=lambda s: None)
    uids, keys = read_back(out)
    copied = {u: r for u, r in subset["reps"].items() if u in in_shard0}
    assert copied
    expected = collections.Counter({u: r * (2 if u in copied else 1) for u, r in subset["reps"].items()})
    assert collections.Counter(uids) == expected
    assert len(set(keys)) == len(keys)  # keys stay unique: j runs over every copy of the uid
    assert stats["meta"]["duplicate_uid_copies"] == len(copied)
    assert stats["meta"]["unique_uids_written"] == len(subset["reps"])


def test_decode_check_modes_name_what_is_wrong():
    import io

    from PIL import Image

    from clipsift.filters.reshard import decode_problem

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    png = buf.getvalue()
    for mode in ("quick", "draft", "full"):
        assert decode_problem(jpeg, mode) == "" and decode_problem(png, mode) == ""
        assert decode_problem(jpeg[: len(jpeg) // 2], mode)  # cut off: every mode catches it
        assert decode_problem(png[: len(png) // 2], mode)
        assert "UnidentifiedImageError" in decode_problem(b"not an image at all", mode)
    assert "no JPEG end-of-image marker" in decode_problem(jpeg[:-2], "quick")
    # a PNG cut inside its last chunks still decodes; its missing IEND chunk shows
    assert decode_problem(png[:-20], "full") == "" and "no PNG IEND chunk" in decode_problem(png[:-20], "quick")
