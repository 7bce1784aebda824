"""The tar reader: the memory-mapped fast path and tarfile read every tar the same way."""
from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from clipsift import shards


def _members(n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        key = f"{i:09d}"
        out += [(f"{key}.jpg", bytes([i % 251]) * (300 + 97 * i)), (f"{key}.txt", f"caption {i}".encode()),
                (f"{key}.json", b'{"uid": "%032x"}' % i)]
    return out


def _tar_bytes(members, fmt=tarfile.USTAR_FORMAT, dirs=False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if dirs:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, data in members:
            shards.add_member(tar, name, data)
    return buf.getvalue()


def _both(path):
    """What iter_groups yields, and what it yields when every tar goes through tarfile."""
    fast = [_plain(g) for g in shards.iter_groups(path)]
    original = shards._plain_tar_index
    shards._plain_tar_index = lambda p: None
    try:
        slow = [_plain(g) for g in shards.iter_groups(path)]
    finally:
        shards._plain_tar_index = original
    return fast, slow


def _plain(group):
    return (group.key, group.reason, group.detail) if isinstance(group, shards.Skip) else group


def test_writer_tars_take_the_fast_path_and_read_the_same(tmp_path):
    path = tmp_path / "00000000.tar"
    members = _members(5) + [(f"deep/{'d' * 90}/{'x' * 60}.txt", b"long name in the ustar prefix field")]
    path.write_bytes(_tar_bytes(members, dirs=True))
    assert shards._plain_tar_index(path) is not None
    fast, slow = _both(path)
    assert fast == slow and len(fast) == 6
    assert fast[0] == ("000000000", {"jpg": members[0][1], "txt": b"caption 0", "json": members[2][1]})


@pytest.mark.parametrize("kind", ["pax", "gnu", "gzip", "empty", "garbage"])
def test_other_tars_fall_back_to_tarfile(tmp_path, kind):
    members = _members(3) + [("x" * 120 + ".txt", b"a name too long for ustar")]
    data = {"pax": lambda: _tar_bytes(members, tarfile.PAX_FORMAT),
            "gnu": lambda: _tar_bytes(members, tarfile.GNU_FORMAT),
            "gzip": lambda: gzip.compress(_tar_bytes(members[:-1]), mtime=0),
            "empty": lambda: b"",
            "garbage": lambda: b"not a tar at all" * 100}[kind]()
    path = tmp_path / "00000000.tar"
    path.write_bytes(data)
    assert shards._plain_tar_index(path) is None
    fast, slow = _both(path)
    assert fast == slow
    if kind in ("empty", "garbage"):
        assert [g[1] for g in fast] == [shards.UNREADABLE_SHARD]
    else:
        assert len(fast) == (4 if kind != "gzip" else 3) and not any(isinstance(g[1], str) and g[1] == shards.TRUNCATED_TAR for g in fast)


def test_a_tar_cut_anywhere_reads_the_same_both_ways(tmp_path):
    whole = _tar_bytes(_members(4))
    data_end = len(whole.rstrip(b"\0")) // 512 * 512 + 512  # after the last member's last block
    cuts = sorted(set(range(0, data_end + 1024, 512)) | {data_end + 700, 1000, 1500, 2600})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(whole[:cut])
        fast, slow = _both(path)
        assert fast == slow, cut
        truncated = [g for g in fast if g[1] == shards.TRUNCATED_TAR]
        if 0 < cut < data_end + 1024:  # everything short of the two end-of-archive blocks is reported
            assert len(truncated) == 1, (cut, fast)


def test_a_damaged_header_reads_the_same_both_ways(tmp_path):
    whole = bytearray(_tar_bytes(_members(3)))
    second = 512 + 512  # the header of the second member (the first one's data is 300 bytes)
    whole[second + 10] ^= 0x55  # breaks its checksum
    path = tmp_path / "00000000.tar"
    path.write_bytes(bytes(whole))
    assert shards._plain_tar_index(path) is None
    fast, slow = _both(path)
    assert fast == slow and any(g[1] == shards.TRUNCATED_TAR for g in fast)


# ---------------------------------------------------------------- img2dataset names, sizes.json (issue 22)
def _img2dataset_folder(folder, digits: int = 5):
    """Shards as img2dataset names them by default (oom_shard_count=5): 00000.tar, 00000_stats.json."""
    import json

    folder.mkdir()
    for shard in range(2):
        stem = f"{shard:0{digits}d}"
        (folder / f"{stem}.tar").write_bytes(_tar_bytes(_members(3 + shard)))
        (folder / f"{stem}_stats.json").write_text(json.dumps(
            {"count": 10, "successes": 3 + shard, "failed_to_download": 6 - shard, "failed_to_resize": 1 + shard,
             "status_dict": {"success": 3 + shard}}))
    return folder


def test_stats_are_read_beside_any_shard_name(tmp_path):
    from clipsift import formats

    folder = _img2dataset_folder(tmp_path / "i2d")
    tars = formats.list_shards(folder)
    assert [p.name for p in tars] == ["00000.tar", "00001.tar"]
    assert [formats.shard_index(p) for p in tars] == [0, 1]
    assert formats.stats_path(tars[1]) == folder / "00001_stats.json"
    assert shards.read_stats(tars[1])["successes"] == 4
    assert shards.download_failures(shards.read_stats(tars[1])) == {"failed_to_download": 5, "failed_to_resize": 2}
    assert shards.download_failures(None) == {}
    assert formats.stats_path(tmp_path / "00000012.tar").name == "00000012_stats.json"
    (folder / "00001_stats.json").unlink()
    assert shards.read_stats(tars[1]) is None
    # one index under two names: which one is meant cannot be told
    (folder / "00000000.tar").write_bytes((folder / "00000.tar").read_bytes())
    with pytest.raises(formats.FormatError, match="00000.tar and 00000000.tar are both shard 0"):
        formats.list_shards(folder)


def test_sizes_json_counts_what_open_clip_train_loads(tmp_path):
    import json

    from open_clip_train.data import get_dataset_size

    folder = _img2dataset_folder(tmp_path / "i2d", digits=8)
    members = _members(4)
    members = [m for m in members if m[0] != "000000001.txt"]  # a sample without a caption: not loaded
    (folder / "00000002.tar").write_bytes(_tar_bytes(members))
    sizes = shards.write_sizes_json(folder)
    assert sizes == {"00000000.tar": 3, "00000001.tar": 4, "00000002.tar": 3}
    assert json.loads((folder / shards.SIZES_FILE).read_text()) == sizes
    # open_clip_train's loader takes brace-expanded shard lists and sums sizes.json over them
    assert get_dataset_size(str(folder / "{00000000..00000002}.tar")) == (10, 3)
