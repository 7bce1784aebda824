"""Hostile input and faults (issue 22): every bad input is one line naming the file or key and what
to do (exit code 2, no traceback unless --debug), or a counted skip; nothing is silently dropped.

Each test builds its bad input itself, mostly from the ci world. docs/reliability.md lists them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipsift import cli, formats, shards
from clipsift.runlog import output_lock, read_json

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"clipsift( \w+)?: error: \S.*")
U = "0123456789abcdef" * 2  # a valid uid


def fails(capsys, *argv: str, ray: bool = False) -> str:
    """Run the CLI; it must exit 2 with exactly one error line on stderr (after Ray's own INFO lines
    when Ray ran) and no traceback. Returns that line."""
    capsys.readouterr()
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and LINE.fullmatch(lines[-1]) and "Traceback" not in err, err
    assert len(lines) == 1 or (ray and all(re.search(r"\sINFO\s", line) for line in lines[:-1])), err
    return lines[-1]


def python_m(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "clipsift", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def copy_records(src: Path, dst: Path, shard: int, start: int, n: int, bad_uid_at: int | None = None) -> list[str]:
    """n samples of shard `src` from `start` into shard `shard` of `dst`; the one at bad_uid_at gets
    its uid followed by a newline. Returns the uids written (the bad one as written)."""
    recs = [r for r in shards.read_shard(src) if isinstance(r, shards.Sample)][start:start + n]
    uids = []
    with shards.ShardWriter(dst, shard) as w:
        for i, r in enumerate(recs):
            meta = {**r.meta, "uid": r.uid + "\n"} if i == bad_uid_at else r.meta
            w.add(formats.sample_key(shard, i), r.image, r.text, meta)
            uids.append(meta["uid"])
    return uids


# ---------------------------------------------------------------- 1: uids, StopIteration, vanishing shards
def test_uid_with_a_trailing_newline_is_not_a_uid(tmp_path):
    assert formats.is_uid(U) and not formats.is_uid(U + "\n") and not formats.is_uid(U + "\r\n")
    with pytest.raises(formats.FormatError, match=r"uid #1 .*\\n' is not 32 lowercase hex"):
        formats.uids_to_u8u8([U, U + "\n"])  # a FormatError, never a StopIteration
    with pytest.raises(formats.FormatError, match="row 1"):
        formats.check_uid_column("m.parquet", pa.chunked_array([[U, U + "\n"]]))


def test_train_counts_a_bad_uid_and_never_drops_its_shard(ci_world, tmp_path, capsys):
    """The shard holding a "<uid>\\n" is trained on; the bad record is one counted skip."""
    pool = ci_world / "pool" / "shards" / "00000000.tar"
    data = tmp_path / "shards"
    good = copy_records(pool, data, 0, 0, 12)
    other = copy_records(pool, data, 1, 12, 17, bad_uid_at=3)
    subset = tmp_path / "subset.npy"
    formats.write_subset(subset, good + [u for u in other if formats.is_uid(u)])
    out = tmp_path / "run"
    assert cli.main(["train", "-p", "ci", f"data.shards={data}", f"data.subset={subset}", f"out={out}",
                     "progress=false", "threads=1", "batch_size=8", "samples_seen=16", "data.workers=0"]) == 0
    records = read_json(out / "stats.json")["data"]["records"]
    assert records == {"seen": 29, "kept": 28, "dropped": {shards.NO_UID: 1}}


def test_reshard_counts_a_bad_uid_and_writes_every_subset_sample(ci_world, tmp_path):
    """Once a StopIteration ended reshard's scan map early ("missing scan file")."""
    pool = ci_world / "pool" / "shards" / "00000000.tar"
    data = tmp_path / "shards"
    uids = copy_records(pool, data, 0, 0, 10) + copy_records(pool, data, 1, 10, 10, bad_uid_at=2)
    subset = tmp_path / "subset.npy"
    formats.write_subset(subset, [u for u in uids if formats.is_uid(u)])
    out = tmp_path / "out"
    assert cli.main(["reshard", f"shards={data}", f"subset={subset}", f"out={out}", "workers=2"]) == 0
    stats = read_json(out / "stats.json")
    assert stats["counts"]["dropped"].get(shards.NO_UID) == 1
    written = [r.uid for t in formats.list_shards(out) for r in shards.read_shard(t) if isinstance(r, shards.Sample)]
    assert sorted(written) == sorted(u for u in uids if formats.is_uid(u))


def test_filter_names_the_file_and_row_of_a_bad_uid(ci_world, tmp_path, capsys):
    meta = tmp_path / "metadata"
    meta.mkdir()
    table = pq.read_table(ci_world / "pool" / "metadata" / "00000000.parquet").slice(0, 50)
    uids = table.column("uid").to_pylist()
    uids[7] += "\n"
    pq.write_table(table.set_column(0, "uid", pa.array(uids)), meta / "00000000.parquet")
    line = fails(capsys, "filter", "-p", "no_filter", f"metadata={meta}", f"out={tmp_path / 'f'}")
    assert "00000000.parquet: row 7: uid" in line and "not 32 lowercase hex" in line


# ---------------------------------------------------------------- 3, 8: metadata mode (score)
def metadata(ci_world, folder: Path, files: int = 2, rows: int = 30) -> list[Path]:
    """`files` DataComp metadata files from the ci world's pool, each with a row-aligned npz of
    float16 embeddings b32_img / b32_txt."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(files):
        table = pq.read_table(ci_world / "pool" / "metadata" / f"{i:08d}.parquet").slice(0, rows)
        path = folder / f"{i:08d}.parquet"
        pq.write_table(table, path)
        np.savez(path.with_suffix(".npz"), b32_img=rng.standard_normal((rows, 8)).astype(np.float16),
                 b32_txt=rng.standard_normal((rows, 8)).astype(np.float16))
        out.append(path)
    return out


def score(capsys, src: Path, out: Path, *extra: str, ray: bool = False) -> str:
    return fails(capsys, "score", f"input={src}", f"out={out}", "heads={s: {kind: clip_score, model: b32}}",
                 "progress=false", "ray.num_cpus=2", *extra, ray=ray)


def test_score_refuses_bad_metadata_before_any_work(ci_world, tmp_path, capsys):
    """Each bad file is the 2nd of two, so only the up-front check (headers) can name it."""
    cases = {
        "no uid": (lambda p: pq.write_table(pq.read_table(p).drop_columns(["uid"]), p), "no uid column"),
        "integer uid": (lambda p: pq.write_table(pq.read_table(p).set_column(0, "uid", pa.array(range(30))), p),
                        "uid is a int64 column"),
        "string embeddings": (lambda p: np.savez(p.with_suffix(".npz"), b32_img=np.array(["0.1"] * 30),
                                                 b32_txt=np.zeros((30, 8), np.float16)), "not numbers"),
        "short npz": (lambda p: np.savez(p.with_suffix(".npz"), b32_img=np.zeros((29, 8), np.float16),
                                         b32_txt=np.zeros((29, 8), np.float16)), "expected (30, dim)"),
        "array missing": (lambda p: np.savez(p.with_suffix(".npz"), b32_img=np.zeros((30, 8), np.float16)),
                          "no array b32_txt"),
        "no npz": (lambda p: p.with_suffix(".npz").unlink(), "missing, no npz beside 00000001.parquet"),
        "not an npz": (lambda p: p.with_suffix(".npz").write_text("hello"), "not an npz"),
        "not a parquet": (lambda p: p.write_bytes(b"PAR1 not really"), "not a parquet file"),
    }
    for name, (damage, message) in cases.items():
        src = tmp_path / name.replace(" ", "_")
        second = metadata(ci_world, src)[1]
        damage(second)
        t0 = time.perf_counter()
        line = score(capsys, src, tmp_path / f"out_{src.name}")
        assert message in line and second.stem in line, (name, line)
        assert time.perf_counter() - t0 < 20 and not (tmp_path / f"out_{src.name}" / "metadata").exists(), name


def test_score_counts_nonfinite_embeddings_and_names_a_bad_uid(ci_world, tmp_path, capsys):
    src = tmp_path / "in"
    first, second = metadata(ci_world, src)
    with np.load(second.with_suffix(".npz")) as z:
        img, txt = z["b32_img"].copy(), z["b32_txt"].copy()
    img[4, 2], txt[9, 0], img[9, 1] = np.nan, np.inf, -np.inf  # rows 4 and 9
    np.savez(second.with_suffix(".npz"), b32_img=img, b32_txt=txt)
    out = tmp_path / "out"
    assert cli.main(["score", f"input={src}", f"out={out}", "heads={s: {kind: clip_score, model: b32}}",
                     "progress=false", "ray.num_cpus=2"]) == 0
    assert "2 rows have NaN/inf inputs" in capsys.readouterr().out
    stats = read_json(out / "stats.json")
    assert stats["shards"][second.stem]["notes"] == {"nonfinite_inputs": 2} and not stats["shards"][first.stem]["notes"]
    scores = pq.read_table(out / "metadata" / second.name).column("s").to_numpy()
    assert np.isnan(scores[[4, 9]]).all() and np.isfinite(np.delete(scores, [4, 9])).all()
    # a uid value that is no uid is found where the rows are read (in a Ray actor): still one line
    uids = pq.read_table(first).column("uid").to_pylist()
    uids[5] = uids[5].upper()
    pq.write_table(pq.read_table(first).set_column(0, "uid", pa.array(uids)), first)
    line = score(capsys, src, tmp_path / "out2", ray=True)
    assert f"{first}: row 5: uid" in line


# ---------------------------------------------------------------- 4: sizes in every config
@pytest.mark.parametrize("argv,key", [
    (["world", "-p", "ci", "pool_size=-5"], "pool_size"),
    (["world", "-p", "ci", "samples_per_shard=0"], "samples_per_shard"),
    (["world", "-p", "ci", "noise.junk=1.5"], "noise.junk"),
    (["train", "-p", "ci", "batch_size=0"], "batch_size"),
    (["train", "-p", "ci", "data.workers=-1"], "data.workers"),
    (["train", "-p", "ci", "lr=.nan"], "lr"),
    (["embed", "-p", "ci", "batch_size=-1"], "batch_size"),
    (["embed", "-p", "ci", "ray.num_cpus=-2"], "ray.num_cpus"),
    (["score", "batch_size=0"], "batch_size"),
    (["filter", "-p", "basic", "batch_size=0"], "batch_size"),
    (["flyt", "-p", "ci", "steps=0"], "steps"),
    (["mflyt", "-p", "ci", "mixer.lr=0"], "mixer.lr"),
    (["sample", "-p", "scs", "total=-1"], "total"),
    (["eval", "batch_size=0"], "batch_size"),
])
def test_every_size_is_checked_when_the_config_loads(argv, key, tmp_path, capsys):
    line = fails(capsys, *argv, f"out={tmp_path / 'o'}")
    assert f"error: {key}: " in line and "out of range; use a value" in line
    assert not (tmp_path / "o").exists()


def test_sizes_are_checked_for_configs_built_in_python(tmp_path):
    from clipsift.config import ConfigError
    from clipsift.pipeline.config import EmbedConfig, ScoreConfig
    from clipsift.pipeline.embed import run_embed
    from clipsift.pipeline.score import run_score
    from clipsift.world.config import NoiseRates, WorldConfig

    with pytest.raises(ConfigError, match="^noise.junk: 1.5 is out of range"):
        WorldConfig(noise=NoiseRates(junk=1.5))
    # checked before the input is looked at (tmp_path holds no shards or metadata)
    with pytest.raises(ConfigError, match="^max_image_pixels: -1 is out of range"):
        run_embed(EmbedConfig(input=str(tmp_path), out=str(tmp_path / "o"), max_image_pixels=-1))
    with pytest.raises(ConfigError, match="^batch_size: 0 is out of range"):
        run_score(ScoreConfig(input=str(tmp_path), out=str(tmp_path / "o"), batch_size=0))


def test_every_preset_is_in_range():
    import importlib

    from clipsift import config

    for name, (module, _) in cli.COMMANDS.items():
        m = importlib.import_module(module)
        for preset in sorted((config.CONFIG_DIR / m.GROUP).glob("*.yaml")):
            config.check(config.load(m.CONFIG, preset))


# ---------------------------------------------------------------- 5: one run per output folder
def test_an_output_in_use_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken(ci_world, tmp_path,
                                                                                         capsys):
    out = tmp_path / "filtered"
    args = ["filter", "-p", "no_filter", f"metadata={ci_world / 'pool' / 'metadata'}", f"out={out}"]
    # the holder forks a child that outlives it, as a DataLoader worker winding down would
    script = ("import os, time\nfrom clipsift.runlog import output_lock\n"
              f"with output_lock({str(out)!r}):\n"
              "    child = os.fork()\n"
              "    if child == 0:\n        time.sleep(600)\n        os._exit(0)\n"
              "    print(child, flush=True)\n    time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        line = fails(capsys, *args, "seed=1")  # another config into the same folder
        assert f"{out}: another clipsift run is writing it (pid {holder.pid} on" in line
        assert not out.exists()
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops its lock, its pid stays in the file
        holder.wait()
        assert f"pid {holder.pid}" in (tmp_path / ".filtered.lock").read_text()
        assert cli.main(args) == 0 and (out / "subset.npy").is_file()  # the child alive, the lock free
        with output_lock(out):  # released when the command ended
            pass
    finally:
        for pid in (holder.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        holder.wait()


# ---------------------------------------------------------------- 7: one error path
def test_config_file_errors_are_one_line(tmp_path, capsys):
    line = fails(capsys, "world", "-c", str(tmp_path / "missing.yaml"))
    assert f"{tmp_path / 'missing.yaml'}: cannot read the config file" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool_size: 10\nnoise: [1,\n")
    assert f"{bad}: not valid YAML (line 3" in fails(capsys, "world", "-c", str(bad))
    assert "unknown key pool_sise" in fails(capsys, "world", "-p", "ci", "pool_sise=10")
    assert "unrecognized arguments: --frobnicate" in fails(capsys, "train", "--frobnicate")


def test_python_m_goes_through_the_same_path_and_debug_shows_the_traceback(tmp_path):
    plain = python_m("world", "-c", "missing.yaml", cwd=tmp_path)
    assert plain.returncode == 2 and plain.stderr.splitlines() == [
        "clipsift world: error: missing.yaml: cannot read the config file (No such file or directory); check the "
        "-c path or use -p <preset>"]
    debug = python_m("--debug", "world", "-c", "missing.yaml", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError: missing.yaml" in debug.stderr


def test_reshard_names_a_bad_subset(ci_world, tmp_path, capsys):
    text = tmp_path / "uids.npy"
    text.write_text(U + "\n")
    line = fails(capsys, "reshard", f"shards={ci_world / 'pool' / 'shards'}", f"subset={text}", f"out={tmp_path / 'o'}")
    assert f"{text}: not a .npy file" in line and "clipsift subset action=from_text" in line
    wrong = tmp_path / "ints.npy"
    np.save(wrong, np.arange(3, dtype=np.int64))
    assert f"{wrong}: dtype int64 is not DataComp's u8,u8" in fails(
        capsys, "reshard", f"shards={ci_world / 'pool' / 'shards'}", f"subset={wrong}", f"out={tmp_path / 'o'}")


@pytest.mark.parametrize("content,message", [("[]", "a JSON list, not img2dataset's object of counts"),
                                             ('{"successes": "many"}', "successes is 'many', not a count"),
                                             ("{oops", "not JSON")])
def test_a_malformed_stats_json_is_named(ci_world, tmp_path, capsys, content, message):
    data = tmp_path / "shards"
    copy_records(ci_world / "pool" / "shards" / "00000000.tar", data, 0, 0, 8)
    stats = data / formats.stats_name(0)
    stats.write_text(content)
    for argv in (["embed", "-p", "ci", f"input={data}"], ["train", "-p", "ci", f"data.shards={data}"]):
        line = fails(capsys, *argv, f"out={tmp_path / argv[0]}")
        assert f"{stats}: {message}" in line and "fix or delete" in line


def test_train_resume_errors_are_one_line(ci_world, tmp_path, capsys):
    data = tmp_path / "shards"
    copy_records(ci_world / "pool" / "shards" / "00000000.tar", data, 0, 0, 16)
    run = tmp_path / "run"
    quick = ["-p", "ci", f"data.shards={data}", "progress=false", "threads=1", "batch_size=8", "samples_seen=16",
             "data.workers=0"]
    assert cli.main(["train", *quick, f"out={run}", "stop_after_steps=1"]) == 0
    ckpt = run / "checkpoints" / "epoch_latest.pt"
    line = fails(capsys, "train", *quick, f"out={run}")
    assert f"{run} already holds a checkpoint; pass resume=latest" in line
    line = fails(capsys, "train", *quick, f"out={run}", "resume=latest", "lr=0.5")
    assert f"resume: {ckpt} was trained with a different config (lr: 0.002 -> 0.5)" in line
    data_bytes = ckpt.read_bytes()
    for name, content, message in [("truncated.pt", data_bytes[: len(data_bytes) // 2], "PytorchStreamReader"),
                                   ("text.pt", b"hello\n", "KeyError: 101"),
                                   ("garbage.pt", bytes(range(256)) * 8, "not a readable torch checkpoint")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        line = fails(capsys, "train", *quick, f"out={tmp_path / ('r_' + name)}", f"resume={bad}")
        assert f"{bad}: not a readable torch checkpoint" in line and message in line and "copy it again" in line
    weights_only = tmp_path / "weights.pt"
    torch.save({"state_dict": torch.load(ckpt, weights_only=True)["state_dict"]}, weights_only)
    line = fails(capsys, "train", *quick, f"out={tmp_path / 'r_w'}", f"resume={weights_only}")
    assert f"{weights_only}: not a clipsift training checkpoint (no optimizer" in line


def test_eval_names_a_checkpoint_of_another_architecture_or_a_broken_one(ci_world, tmp_path, capsys):
    import open_clip

    from clipsift.eval.models import ensure_arch
    from clipsift.training import checkpoint

    ensure_arch("world-rn-s")
    ckpt = tmp_path / "rn_s.pt"
    checkpoint.save(ckpt, {"state_dict": open_clip.create_model("world-rn-s").state_dict(), "name": "world-rn-s"})
    args = ["eval", f"tasks={ci_world / 'tasks.yaml'}", "device=cpu"]
    line = fails(capsys, *args, "model.arch=world-rn-l", f"model.pretrained={ckpt}", f"out={tmp_path / 'e1'}")
    assert f"{ckpt}: its weights do not fit architecture 'world-rn-l'" in line
    assert "pos_embed width changed" in line and "it was trained as 'world-rn-s'" in line
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    line = fails(capsys, *args, "model.arch=world-rn-s", f"model.pretrained={cut}", f"out={tmp_path / 'e2'}")
    assert f"{cut}: not a readable torch checkpoint" in line


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only user errors are one line: an internal error (here a TypeError) is not hidden."""
    assert cli.user_error_message(TypeError("unsupported operand")) is None
    assert cli.user_error_message(FileNotFoundError(2, "No such file or directory", "x.yaml")) == \
        "x.yaml: no such file or directory"


def test_every_error_class_of_the_project_is_a_user_error():
    """A new *Error class must be listed in cli.USER_ERRORS, or its message would come with a traceback."""
    import importlib

    folders = {"clipsift": "clipsift", "world": "clipsift.world", "pipeline": "clipsift.pipeline",
               "filters": "clipsift.filters", "training": "clipsift.training", "eval": "clipsift.eval",
               "compare": "clipsift.compare"}
    found = set()
    for folder, package in folders.items():
        for path in (REPO / folder).rglob("*.py"):
            module = ".".join([package, *path.relative_to(REPO / folder).with_suffix("").parts])
            found |= {f"{module}.{name}" for name in re.findall(r"^class (\w+Error)\(", path.read_text(), re.M)}
    assert found - {"clipsift.cli.UsageError"} == set(cli.USER_ERRORS)
    for dotted in cli.USER_ERRORS:
        module, _, name = dotted.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), name), Exception)
