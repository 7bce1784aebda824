"""The embedded world: DataComp formats, planted noise at the configured rates, no leaks, determinism."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from clipsift import config, formats
from clipsift.shards import Sample, Skip, read_shard
from clipsift.world.config import WorldConfig
from clipsift.world.generate import NOISE_KINDS, generate_world, load_ground_truth


def _files(root: Path) -> dict[str, bytes]:
    """Every output file's bytes; stats.json without its timings (the one thing allowed to vary)."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    if "stats.json" in out:
        stats = json.loads(out["stats.json"])
        stats.pop("timings_s"), stats.pop("pairs_per_s")
        out["stats.json"] = json.dumps(stats, sort_keys=True).encode()
    return out


def _small(out: Path, **kw) -> WorldConfig:
    base = dict(out=str(out), pool_size=500, samples_per_shard=200, curated_size=200, train_per_class=4,
                test_per_class=4, fine_test_per_class=1, retrieval_size=20, duplicate_sources=5, workers=1)
    base.update(kw)
    return config.from_dict(WorldConfig, base)


def test_pool_shards_read_like_img2dataset_output(ci_world):
    shards = formats.list_shards(ci_world / "pool" / "shards")
    assert [s.name for s in shards] == ["00000000.tar", "00000001.tar", "00000002.tar"]
    n_ok = 0
    for shard in shards:
        idx = formats.shard_index(shard)
        stats = json.loads((shard.parent / formats.stats_name(idx)).read_text())
        status = pq.read_table(shard.parent / formats.status_name(idx))
        assert stats["count"] == status.num_rows == 1000 and stats["successes"] == 1000
        # Read exactly as a DataComp tool would: webdataset, raw bytes; the uid lives only in the json.
        for sample in wds.WebDataset(str(shard), shardshuffle=False, handler=wds.warn_and_continue):
            assert len(sample["__key__"]) == 12 and sample["__key__"].startswith(f"{idx:08d}")
            try:
                meta = json.loads(sample["json"])
            except (KeyError, ValueError):
                continue  # planted malformed json; counted in test_corrupt_samples_are_really_corrupt
            assert formats.is_uid(meta["uid"]) and meta["uid"] != sample["__key__"]
            assert meta["key"] == sample["__key__"]
            n_ok += 1
    assert n_ok > 2900


def test_metadata_parquet_has_datacomp_columns_and_u8u8_uids(ci_world):
    table = pq.read_table(ci_world / "pool" / "metadata")
    assert table.schema.names == formats.METADATA_COLUMNS
    assert table.schema.field("original_width").type == "int64"
    uids = table.column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 3000
    arr = formats.uids_to_u8u8(uids)
    assert formats.u8u8_to_uids(arr) == uids
    assert all(len(s) == 64 for s in table.column("sha256").to_pylist())
    gt = load_ground_truth(ci_world)
    assert set(gt.column("uid").to_pylist()) == set(uids)


def test_corrupt_samples_are_really_corrupt(ci_world):
    gt = {r["key"]: r for r in load_ground_truth(ci_world).to_pylist()}
    planted = {k: r["corrupt_kind"] for k, r in gt.items() if r["noise"] == "corrupt"}
    assert set(planted.values()) == {"truncated_jpeg", "missing_caption", "malformed_json"}
    found = {}
    for shard in formats.list_shards(ci_world / "pool" / "shards"):
        for rec in read_shard(shard):
            if isinstance(rec, Skip):
                found[rec.key] = rec.reason
                continue
            try:
                Image.open(io.BytesIO(rec.image)).load()
            except OSError:
                found[rec.key] = "corrupt_image"
    expected = {"truncated_jpeg": "corrupt_image", "missing_caption": "missing_text", "malformed_json": "malformed_json"}
    assert found == {k: expected[v] for k, v in planted.items()}


def test_noise_rates_match_config_within_sampling_error(ci_world):
    cfg = config.load(WorldConfig, ci_world / "world.yaml")
    counts = Counter(load_ground_truth(ci_world).column("noise").to_pylist())
    n = cfg.pool_size
    rates = dict(vars(cfg.noise), clean=1 - sum(vars(cfg.noise).values()))
    assert set(counts) <= set(NOISE_KINDS)
    for kind, p in rates.items():
        sd = np.sqrt(p * (1 - p) / n)
        assert abs(counts[kind] / n - p) < 4 * sd + 1e-9, (kind, counts[kind] / n, p)


def test_noise_kinds_look_like_what_they_claim(ci_world):
    rows = load_ground_truth(ci_world).to_pylist()
    by = lambda kind: [r for r in rows if r["noise"] == kind]  # noqa: E731
    assert all(r["family"] in ("letter", "pattern") for r in by("off_task"))
    assert all(r["family"] == "shape" for r in by("clean"))
    assert {r["language"] for r in by("foreign")} == {"de", "fr", "es"}
    exact = by("exact_duplicate")
    groups = Counter(r["dup_group"] for r in exact)
    meta = {r["uid"]: r for r in pq.read_table(ci_world / "pool" / "metadata").to_pylist()}
    for g in groups:  # exact duplicates share the image bytes and the caption
        members = [meta[r["uid"]] for r in exact if r["dup_group"] == g]
        assert len({m["sha256"] for m in members}) == 1 and len({m["text"] for m in members}) == 1
    small = [r for r in rows if r["small"]]
    assert 0.03 < len(small) / len(rows) < 0.2
    junk_small = np.mean([r["small"] for r in by("junk")])
    clean_small = np.mean([r["small"] for r in by("clean")])
    assert junk_small > 2 * clean_small  # thumbnails and icons are mostly junk, as on the web


def test_tasks_in_clip_benchmark_layout_and_no_test_image_in_pool(ci_world):
    tasks = yaml.safe_load((ci_world / "tasks.yaml").read_text())
    assert [t["name"] for t in tasks] == ["shapes", "shapes_outline", "colour_shape", "count", "retrieval"]
    pool_hashes = set(pq.read_table(ci_world / "pool" / "metadata").column("sha256").to_pylist())
    for t in tasks:
        root = ci_world / t["path"]
        assert (root / "dataset_type.txt").read_text().strip() == t["type"]
        for split in ("train", "test"):
            nshards = int((root / split / "nshards.txt").read_text())
            labels = []
            for i in range(nshards):
                with tarfile.open(root / split / f"{i}.tar") as tar:
                    names = tar.getnames()
                    for name in names:
                        if name.endswith(".jpg"):
                            data = tar.extractfile(name).read()
                            Image.open(io.BytesIO(data)).load()
                            if split == "test":
                                assert hashlib.sha256(data).hexdigest() not in pool_hashes
                        if name.endswith(".cls"):
                            labels.append(int(tar.extractfile(name).read()))
            if t["type"] == "classification":
                classes = (root / "classnames.txt").read_text().splitlines()
                templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
                assert all("{c}" in tmpl for tmpl in templates)
                assert set(labels) == set(range(len(classes)))


def test_same_seed_gives_byte_identical_world_and_parallel_equals_serial(tmp_path):
    a = generate_world(_small(tmp_path / "a"), progress=False)
    b = generate_world(_small(tmp_path / "b", workers=2), progress=False)
    fa, fb = _files(a), _files(b)
    fa.pop("world.yaml"), fb.pop("world.yaml")  # records `workers`, which does not change the output
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    c = generate_world(_small(tmp_path / "c", seed=1), progress=False)
    assert _files(c)["pool/metadata/00000000.parquet"] != fa["pool/metadata/00000000.parquet"]


def test_killed_generation_resumes_to_the_same_bytes(tmp_path):
    a = generate_world(_small(tmp_path / "a"), progress=False)
    reference = _files(a)
    # Simulate a run killed after the first pool shard: later outputs and the done marker are gone.
    for rel in list(reference):
        if rel.startswith(("pool/shards/00000001", "pool/shards/00000002", "curated/", "tasks/", "stats.json",
                           "pool/ground_truth/00000001", "pool/ground_truth/00000002")):
            (a / rel).unlink()
    counts = json.loads((a / "pool/shards/.counts.json").read_text())
    (a / "pool/shards/.counts.json").write_text(json.dumps({"0": counts["0"]}))
    generate_world(_small(tmp_path / "a"), progress=False)
    assert _files(a) == reference


def test_a_different_config_in_the_same_folder_is_refused(tmp_path):
    generate_world(_small(tmp_path / "a"), progress=False)
    with pytest.raises(FileExistsError, match="another config"):
        generate_world(_small(tmp_path / "a", pool_size=600), progress=False)


def test_a_copied_world_is_the_same_world(tmp_path):
    import shutil

    a = generate_world(_small(tmp_path / "a"), progress=False)
    reference = _files(a)
    shutil.copytree(a, tmp_path / "b")  # e.g. a compare folder copied for an ablation
    b = generate_world(_small(tmp_path / "b"), progress=False)
    got = _files(b)
    assert got.pop("world.yaml") != reference.pop("world.yaml")  # now records its new folder
    assert got == reference


def test_cli_generates_and_reports(tmp_path, capsys):
    from clipsift.cli import main

    assert main(["world", "--preset", "ci", f"out={tmp_path / 'w'}", "pool_size=300", "curated_size=100",
                 "samples_per_shard=100"]) == 0
    assert "world written to" in capsys.readouterr().out
    assert len(formats.list_shards(tmp_path / "w" / "pool" / "shards")) == 3
