"""DataComp subset files: what clipsift writes loads with DataComp's conventions, numpy-made files
are accepted, and bad files get errors that say what is wrong."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from clipsift import cli, formats
from clipsift.filters.subset_cli import info

UIDS = ["ffffffffffffffff0000000000000001", "00000000000000010000000000000000", "0123456789abcdef0123456789abcdef",
        "00000000000000010000000000000000"]


def test_clipsift_subset_follows_datacomp_conventions(tmp_path):
    path = tmp_path / "s.npy"
    formats.write_subset(path, UIDS)
    arr = np.load(path)  # plain numpy, as DataComp's resharder reads it
    assert arr.dtype == np.dtype("u8,u8")
    pairs = sorted((int(u[:16], 16), int(u[16:], 16)) for u in UIDS)
    assert [(int(a), int(b)) for a, b in arr] == pairs  # sorted, repeats kept
    assert info(formats.read_subset(path)) == {"rows": 4, "unique_uids": 3, "max_repeats": 2, "repeated_uids": 1}


def test_numpy_written_subset_is_accepted(tmp_path):
    arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in UIDS], np.dtype("u8,u8"))
    arr = np.sort(arr, order=["f0", "f1"])
    np.save(tmp_path / "dc.npy", arr)
    got = formats.read_subset(tmp_path / "dc.npy")
    assert sorted(formats.u8u8_to_uids(got)) == sorted(UIDS)


def test_bad_subsets_get_clear_errors(tmp_path):
    arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in UIDS], np.dtype("u8,u8"))
    cases = {
        "unsorted.npy": (lambda p: np.save(p, arr), "not sorted .* index 1"),
        "strings.npy": (lambda p: np.save(p, np.array(UIDS)), "holds strings"),
        "pairs.npy": (lambda p: np.save(p, np.stack([arr["f0"], arr["f1"]], 1)), r"\(N, 2\) uint64 array"),
        "bigendian.npy": (lambda p: np.save(p, np.sort(arr, order=["f0", "f1"]).astype(">u8,>u8")), "big layout"),
        "named.npy": (lambda p: np.save(p, np.zeros(2, np.dtype([("hi", "<u8"), ("lo", "<u8")]))), r"\('hi', 'lo'\)"),
        "objects.npy": (lambda p: np.save(p, np.array([1, "a"], dtype=object), allow_pickle=True), "not a plain .npy"),
        "twod.npy": (lambda p: np.save(p, np.zeros((2, 2), np.dtype("u8,u8"))), "expected a 1-D array"),
        "uids.txt": (lambda p: p.write_text("\n".join(UIDS) + "\n"), "not a .npy file .*from_text"),
        "pickle.npy": (lambda p: p.write_bytes(pickle.dumps(UIDS)), "not a .npy file"),
    }
    for name, (make, message) in cases.items():
        make(tmp_path / name)
        with pytest.raises(formats.FormatError, match=message):
            formats.read_subset(tmp_path / name)
    with pytest.raises(formats.FormatError, match="does not exist"):
        formats.read_subset(tmp_path / "nothing.npy")


def test_text_conversion_round_trip_and_bad_lines(tmp_path, capsys):
    (tmp_path / "uids.txt").write_text("\n".join(UIDS) + "\n\n")
    assert cli.main(["subset", "-p", "from_text", f"input={tmp_path / 'uids.txt'}", f"output={tmp_path / 's.npy'}"]) == 0
    assert cli.main(["subset", "action=to_text", f"input={tmp_path / 's.npy'}", f"output={tmp_path / 'back.txt'}"]) == 0
    assert (tmp_path / "back.txt").read_text().split() == sorted(UIDS)
    assert cli.main(["subset", f"input={tmp_path / 's.npy'}"]) == 0
    assert "'unique_uids': 3" in capsys.readouterr().out
    (tmp_path / "bad.txt").write_text(UIDS[0] + "\n" + UIDS[2].upper() + "\n")
    assert cli.main(["subset", "action=from_text", f"input={tmp_path / 'bad.txt'}", f"output={tmp_path / 'x.npy'}"]) == 2
    assert "bad.txt:2:" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
