"""Zero-shot evaluation: metric math against hand computations, clip_benchmark task folders read
from real tars, real (tiny, random) open_clip models end to end, the results cache, the world."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image

from clipsift import cli
from clipsift.eval import ModelSpec, evaluate, load_model
from clipsift.eval import metrics as M
from clipsift.eval.data import TaskShards, task_loader
from clipsift.eval.models import ModelError
from clipsift.eval.results import RESULTS_FILE, SUMMARY_FILE, read_results
from clipsift.eval.tasks import TaskError, load_tasks

TINY = "clipsift-eval-tiny"  # a ViT small enough for a test, registered with open_clip below


@pytest.fixture(scope="module", autouse=True)
def tiny_arch(tmp_path_factory):
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("archs") / f"{TINY}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


# ---------------------------------------------------------------- metric math
def test_classification_metrics_match_hand_computation():
    labels = np.array([0, 1, 2, 5, 0, 3])
    logits = np.array([
        [5, 1, 0, 0, 0, 0],  # right (rank 0)
        [3, 2, 1, 0, 0, 0],  # class 0 beats the true class 1: rank 1, top-5 hit
        [6, 5, 4, 3, 2, 1],  # two wrong classes above: rank 2
        [6, 5, 4, 3, 2, 1],  # true class 5 is last: rank 5, a top-5 miss
        [0, 1, 0, 0, 0, 0],  # true 0 ties with four wrong classes and loses to one: rank 5
        [0, 0, 0, 7, 7, 0],  # a tie with a wrong class counts against: rank 1
    ], dtype=np.float32)
    got = M.classification_metrics(logits, labels)
    # top-1 hits: sample 0 only. top-5 hits: samples 0, 1, 2, 5.
    # per-class recall over the classes present {0: 1/2, 1: 0, 2: 0, 3: 0, 5: 0}.
    assert got == pytest.approx({"acc1": 1 / 6, "acc5": 4 / 6, "mean_per_class_recall": 0.1})

    four = M.classification_metrics(logits[:, :4], np.array([0, 1, 2, 3, 0, 3]))
    assert "acc5" not in four  # fewer than 5 classes: no acc5
    with pytest.raises(ValueError, match="labels must lie"):
        M.classification_metrics(logits, np.array([0, 1, 2, 6, 0, 3]))


def test_classification_metrics_agree_with_argmax_and_argsort_without_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 12)).astype(np.float32)
    labels = rng.integers(0, 12, size=500)
    got = M.classification_metrics(logits, labels)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert got["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert got["acc5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
    recalls = [np.mean(logits[labels == c].argmax(1) == c) for c in range(12)]
    assert got["mean_per_class_recall"] == pytest.approx(np.mean(recalls))


def test_collapsed_or_diverged_model_scores_zero_not_one():
    labels = np.arange(5)
    assert M.classification_metrics(np.ones((5, 5)), labels)["acc1"] == 0.0
    assert M.classification_metrics(np.full((5, 5), np.nan), labels)["acc5"] == 0.0
    r = M.retrieval_metrics(np.full((3, 4), np.nan), np.ones((3, 4)), np.arange(3))
    assert r["image_retrieval_recall@10"] == r["text_retrieval_recall@10"] == 0.0


def test_class_weights_is_normalised_mean_of_normalised_prompts():
    text = np.array([[[3, 4], [1, 0]],     # -> (0.6, 0.8) and (1, 0): mean (0.8, 0.4)
                     [[0, 2], [0, 5]]],    # -> (0, 1) twice
                    dtype=np.float32)
    w = M.class_weights(text)
    assert w == pytest.approx(np.array([[0.8, 0.4] / np.sqrt(0.8), [0, 1]]), abs=1e-6)


# Three images (orthonormal), five captions: image 0 has captions 0 and 1, image 1 has caption 2,
# image 2 has captions 3 and 4. The similarity matrix (image x caption) is then the caption
# coordinates:   img0 [1, 0, .6, 0, .8]   img1 [0, 1, .8, .6, 0]   img2 [0, 0, 0, .8, .6]
IMAGES = np.eye(3, dtype=np.float32)
CAPTIONS = np.array([[1, 0, 0], [0, 1, 0], [.6, .8, 0], [0, .6, .8], [.8, 0, .6]], dtype=np.float32)
CAPTION_IMAGE = np.array([0, 0, 1, 2, 2])


def test_retrieval_metrics_match_hand_computation():
    got = M.retrieval_metrics(IMAGES, CAPTIONS, CAPTION_IMAGE, ks=(1, 2, 5))
    # image -> text: img0's best own caption (t0, 1.0) beats all others: hit. img1's only caption
    # (t2, .8) is beaten by t1 (1.0): rank 1. img2's best (t3, .8) beats all others: hit.
    # text -> image: t0 -> img0 hit; t1 scores img1 (1) above img0 (0), and img2 (0) ties img0 but
    # comes after it (higher index): rank 1; t2 -> img1 (.8) beats img0 (.6): hit; t3 -> img2 (.8)
    # hit; t4 -> img0 (.8) beats img2 (.6): rank 1.
    assert got == pytest.approx({
        "text_retrieval_recall@1": 2 / 3, "text_retrieval_recall@2": 1.0, "text_retrieval_recall@5": 1.0,
        "image_retrieval_recall@1": 3 / 5, "image_retrieval_recall@2": 1.0, "image_retrieval_recall@5": 1.0,
        "mean_recall@1": (2 / 3 + 3 / 5) / 2,
    })
    # Cosine similarity: scaling embeddings or reordering captions changes nothing.
    # (with no tie at a top-k boundary: the order of candidates decides ties)
    perm = np.array([4, 2, 0, 3, 1])
    again = M.retrieval_metrics(IMAGES * 7, CAPTIONS[perm] * np.arange(1, 6)[:, None], CAPTION_IMAGE[perm], ks=(1, 5))
    assert again == pytest.approx({k: v for k, v in got.items() if "@2" not in k})
    with pytest.raises(ValueError, match="at least one caption"):
        M.retrieval_metrics(IMAGES, CAPTIONS[:2], CAPTION_IMAGE[:2])


def test_retrieval_metrics_agree_with_argsort_and_chunking(monkeypatch):
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(40, 8)), rng.normal(size=(90, 8))
    caption_image = np.concatenate([np.arange(40), rng.integers(0, 40, size=50)])
    sim = M.normalize(img) @ M.normalize(txt).T
    ref = {}
    for k in (1, 5, 10):
        top_txt = np.argsort(-sim, axis=1)[:, :k]
        ref[f"text_retrieval_recall@{k}"] = np.mean([(caption_image[top_txt[i]] == i).any() for i in range(40)])
        top_img = np.argsort(-sim.T, axis=1)[:, :k]
        ref[f"image_retrieval_recall@{k}"] = np.mean((top_img == caption_image[:, None]).any(1))
    ref["mean_recall@1"] = (ref["text_retrieval_recall@1"] + ref["image_retrieval_recall@1"]) / 2
    assert M.retrieval_metrics(img, txt, caption_image) == pytest.approx(ref)
    monkeypatch.setattr(M, "_CHUNK", 7)  # similarity rows processed 7 at a time: same answer
    assert M.retrieval_metrics(img, txt, caption_image) == pytest.approx(ref)


# ---------------------------------------------------------------- task folders on disk
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (200, 40, 210), (30, 210, 220)]
CLASSNAMES = ["red", "green", "blue", "yellow", "magenta", "cyan"]


def _image(colour, rng, fmt="JPEG") -> bytes:
    arr = np.clip(np.array(colour) + rng.normal(0, 12, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_classification_task(root: Path, per_class: int = 4, plant_bad: bool = True) -> dict[str, int]:
    """6 colour classes, JPEG and PNG images in two shards; optionally one bad sample of each kind.
    Returns the expected counts."""
    rng = np.random.default_rng(0)
    samples = []
    for c in range(len(CLASSNAMES)):
        for j in range(per_class):
            ext, fmt = ("png", "PNG") if j % 2 else ("jpg", "JPEG")
            samples.append([(f"{ext}", _image(COLOURS[c], rng, fmt)), ("cls", str(c).encode())])
    expected = {"kept": len(samples), "dropped": {}}
    if plant_bad:
        good_jpeg = _image(COLOURS[0], rng)
        samples.insert(3, [("jpg", good_jpeg[:-200]), ("cls", b"0")])  # truncated JPEG
        samples.insert(9, [("jpg", good_jpeg)])  # no label
        samples.insert(15, [("jpg", good_jpeg), ("cls", b"seven")])
        samples.insert(20, [("png", _image(COLOURS[1], rng, "PNG")), ("cls", b"6")])  # only 6 classes
        samples.insert(22, [("cls", b"1")])  # no image
        expected["dropped"] = {"corrupt_image": 1, "missing_label": 1, "malformed_label": 1,
                               "label_out_of_range": 1, "missing_image": 1}
    half = len(samples) // 2
    for shard, part in enumerate([samples[:half], samples[half:]]):
        members = [(f"s{shard}{i:05d}.{ext}", data) for i, sample in enumerate(part) for ext, data in sample]
        _write_tar(root / "test" / f"{shard}.tar", members)
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c} square.\n{c}\n")
    return expected


def write_retrieval_task(root: Path, n: int = 12) -> list[list[str]]:
    rng = np.random.default_rng(1)
    captions = []
    members = []
    for i in range(n):
        c = i % len(COLOURS)
        caps = [f"a {CLASSNAMES[c]} square", f"something {CLASSNAMES[c]}"][: 1 + i % 2]
        captions.append(caps)
        members += [(f"r{i:05d}.jpg", _image(COLOURS[c], rng)), (f"r{i:05d}.txt", "\n".join(caps).encode())]
    _write_tar(root / "test" / "0.tar", members)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    return captions


def write_tasks_yaml(root: Path) -> Path:
    expected = write_classification_task(root / "tasks" / "colours")
    write_retrieval_task(root / "tasks" / "colour_captions")
    path = root / "tasks.yaml"
    path.write_text(yaml.safe_dump([
        {"name": "colours", "path": "tasks/colours", "type": "classification", "main_metric": "acc1", "group": "main"},
        {"name": "colours_balanced", "path": "tasks/colours", "type": "classification",
         "main_metric": "mean_per_class_recall", "group": "main"},
        {"name": "colour_captions", "path": "tasks/colour_captions", "type": "retrieval",
         "main_metric": "mean_recall@1", "group": "retrieval"},
    ]))
    return path, expected


def _read(dataset: TaskShards, num_workers: int):
    counts, orders, targets, images, skips = {}, [], [], [], []
    for batch in task_loader(dataset, batch_size=5, num_workers=num_workers):
        for order, skip in batch.skips:
            counts[skip.reason] = counts.get(skip.reason, 0) + 1
            skips.append(skip)
        orders += batch.orders
        targets += batch.targets
        if batch.images is not None:
            images.append(batch.images)
    return counts, orders, targets, torch.cat(images), skips


def test_reads_clip_benchmark_task_folder_and_counts_bad_samples(tmp_path):
    expected = write_classification_task(tmp_path / "colours")
    (tasks,) = _yaml_tasks(tmp_path, [{"name": "colours", "path": "colours", "type": "classification",
                                      "main_metric": "acc5", "group": "g"}])
    assert tasks.classnames() == CLASSNAMES
    assert tasks.templates() == ["a photo of a {c} square.", "{c}"]
    _, preprocess, _ = load_model(TINY, "", "cpu")
    dataset = TaskShards(tasks.shards(), "classification", preprocess, n_classes=6)
    counts, orders, labels, images, skips = _read(dataset, num_workers=0)
    assert len(labels) == expected["kept"] == 24 and images.shape == (24, 3, 32, 32)
    assert counts == expected["dropped"]
    corrupt = next(s for s in skips if s.reason == "corrupt_image")
    assert "truncated" in corrupt.detail.lower() and "0x" not in corrupt.detail  # PIL's reason, no address
    assert sorted(labels) == sorted(c for c in range(6) for _ in range(4))

    # Two workers split the shards; in tar order the samples are exactly the same.
    counts2, orders2, labels2, images2, _ = _read(dataset, num_workers=2)
    assert counts2 == counts
    idx = sorted(range(len(orders2)), key=orders2.__getitem__)
    assert [orders2[i] for i in idx] == orders and [labels2[i] for i in idx] == labels
    assert torch.equal(images2[idx], images)


def test_reads_retrieval_captions_one_per_line(tmp_path):
    captions = write_retrieval_task(tmp_path / "caps")
    (task,) = _yaml_tasks(tmp_path, [{"name": "caps", "path": "caps", "type": "retrieval",
                                     "main_metric": "mean_recall@1", "group": "r"}])
    task.check_dataset_type()
    _, preprocess, _ = load_model(TINY, "", "cpu")
    counts, _, targets, images, _ = _read(TaskShards(task.shards(), "retrieval", preprocess), 0)
    assert counts == {} and targets == captions and len(images) == 12
    assert sum(len(c) for c in targets) == 18  # every other image has two captions


def _yaml_tasks(root: Path, entries: list[dict]) -> list:
    path = root / "tasks.yaml"
    path.write_text(yaml.safe_dump(entries))
    return load_tasks(path)


def test_bad_task_lists_and_folders_fail_with_a_clear_error(tmp_path):
    write_classification_task(tmp_path / "t", plant_bad=False)
    ok = {"name": "t", "path": "t", "type": "classification", "main_metric": "acc1", "group": "g"}
    for entry, message in [
        ({**ok, "path": "nowhere"}, "does not exist"),
        ({**ok, "main_metric": "recall@1"}, "not a classification metric"),
        ({**ok, "type": "detection"}, "not one of"),
        ({**ok, "colour": "red"}, "unknown keys"),
        ({k: v for k, v in ok.items() if k != "group"}, "missing keys"),
    ]:
        with pytest.raises(TaskError, match=message):
            _yaml_tasks(tmp_path, [entry])
    with pytest.raises(TaskError, match="repeat"):
        _yaml_tasks(tmp_path, [ok, ok])

    (task,) = _yaml_tasks(tmp_path, [ok])
    (tmp_path / "t" / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(TaskError, match="2.tar missing"):
        task.shards()
    (tmp_path / "t" / "zeroshot_classification_templates.txt").write_text("a photo of a {}\n")
    with pytest.raises(TaskError, match="no {c} placeholder"):
        task.templates()
    (tmp_path / "t" / "classnames.txt").write_text("red\n\ngreen\n")
    with pytest.raises(TaskError, match="blank line"):
        task.classnames()
    (tmp_path / "t" / "dataset_type.txt").write_text("retrieval\n")
    with pytest.raises(TaskError, match="says 'retrieval'"):
        task.check_dataset_type()


def test_command_line_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert cli.main(["eval", f"tasks={tmp_path / 'none.yaml'}", f"out={tmp_path}"]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err
    assert cli.main(["eval", f"out={tmp_path}"]) == 2
    assert "needs tasks=" in capsys.readouterr().err


# ---------------------------------------------------------------- models
def test_load_model_from_checkpoint_file_and_run_folder(tmp_path):
    torch.manual_seed(3)
    model, preprocess, tokenizer = load_model(TINY, "", "cpu")
    tokens = tokenizer(["a red square", "cyan"])
    ref = model.encode_text(tokens, normalize=True)
    # open_clip's training checkpoint layout, saved from a DDP-wrapped model ("module." prefix)
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    torch.manual_seed(99)  # a different random init underneath: the checkpoint must replace it
    for source in (str(ckpt), str(tmp_path / "run")):
        loaded = load_model(TINY, source, "cpu")
        assert torch.equal(loaded.model.encode_text(tokens, normalize=True), ref)
        assert not loaded.model.training
    assert not torch.equal(load_model(TINY, "", "cpu").model.encode_text(tokens, normalize=True), ref)

    with pytest.raises(ModelError, match="unknown model architecture"):
        load_model("no-such-arch", "", "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(TINY, str(tmp_path / "missing.pt"), "cpu")
    with pytest.raises(FileNotFoundError, match="epoch_latest.pt"):
        load_model(TINY, str(tmp_path), "cpu")
    with pytest.raises(ModelError, match="neither a file"):
        load_model(TINY, "laion2b_s34b_b79k", "cpu")


# ---------------------------------------------------------------- end to end
def _independent_acc1(task_dir: Path, model, preprocess, tokenizer) -> float:
    """acc1 the long way: webdataset reads the tars, open_clip builds the zero-shot classifier."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    classnames = (task_dir / "classnames.txt").read_text().split("\n")[:-1]
    templates = [lambda c, t=t: t.replace("{c}", c)
                 for t in (task_dir / "zeroshot_classification_templates.txt").read_text().split("\n")[:-1]]
    weights = build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=None)
    hits = n = 0
    tars = [str(task_dir / "test" / f"{i}.tar") for i in range(2)]
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        image = sample.get("jpg", sample.get("png"))
        label = sample.get("cls", b"").decode()
        if image is None or not label.isdigit() or int(label) >= len(classnames):
            continue
        try:
            img = Image.open(io.BytesIO(image))
            img.load()
        except OSError:
            continue
        with torch.no_grad():
            f = model.encode_image(preprocess(img.convert("RGB"))[None], normalize=True)
        hits += int((f @ weights).argmax().item() == int(label))
        n += 1
    assert n == 24
    return hits / n


def test_evaluate_end_to_end_writes_datacomp_lines_and_reuses_them(tmp_path, capsys):
    tasks_yaml, expected = write_tasks_yaml(tmp_path / "data")
    out = tmp_path / "eval"
    spec = ModelSpec(TINY, "")
    # device=cpu: the numbers below are compared with an fp32 CPU computation (auto picks a GPU and bf16).
    summary = evaluate(spec, tasks_yaml, out, batch_size=8, seed=5, device="cpu")

    lines, bad = read_results(out / RESULTS_FILE)
    assert bad == 0 and [l["key"] for l in lines] == ["colours", "colours_balanced", "colour_captions"]
    for line in lines:
        assert set(line) == {"key", "dataset", "metrics", "clipsift"} and line["dataset"] == line["key"]
    cls, bal, ret = (l["metrics"] for l in lines)
    assert set(cls) == {"acc1", "acc5", "mean_per_class_recall", "main_metric"}
    assert cls["main_metric"] == cls["acc1"] and bal["main_metric"] == bal["mean_per_class_recall"]
    assert set(ret) == set(M.RETRIEVAL_METRICS) | {"main_metric"} and ret["main_metric"] == ret["mean_recall@1"]

    # The same number computed independently (webdataset + open_clip's classifier builder).
    torch.manual_seed(5)
    model, preprocess, tokenizer = load_model(TINY, "", "cpu")
    assert cls["acc1"] == pytest.approx(_independent_acc1(tmp_path / "data" / "tasks" / "colours",
                                                          model, preprocess, tokenizer))

    stats = json.loads((out / "stats.json").read_text())
    assert stats["tasks"]["colours"]["counts"] == {"seen": 29, "kept": 24, "dropped": expected["dropped"]}
    assert stats["tasks"]["colour_captions"]["captions"] == 18
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == {"arch": TINY, "pretrained": ""}

    mains = [l["metrics"]["main_metric"] for l in lines]
    assert summary == json.loads((out / SUMMARY_FILE).read_text())
    assert summary["average"] == pytest.approx(np.mean(mains))
    assert summary["groups"] == pytest.approx({"main": np.mean(mains[:2]), "retrieval": mains[2]})

    # Second run: everything comes from the cache, nothing is appended, the summary is the same.
    again = evaluate(spec, tasks_yaml, out, batch_size=8, seed=5, device="cpu")
    assert json.loads((out / "stats.json").read_text())["computed"] == []
    assert len(read_results(out / RESULTS_FILE)[0]) == 3
    assert [t["cached"] for t in again["tasks"]] == [True] * 3
    assert again["average"] == summary["average"]

    # force recomputes (deterministic: same numbers, another batch size); another model recomputes.
    forced = evaluate(spec, tasks_yaml, out, batch_size=5, seed=5, device="cpu", force=True, only=["colours"])
    assert len(read_results(out / RESULTS_FILE)[0]) == 4
    assert forced["tasks"][0]["value"] == pytest.approx(cls["acc1"])
    other = evaluate(ModelSpec(TINY, ""), tasks_yaml, out, batch_size=8, seed=6, device="cpu")
    assert not any(t["cached"] for t in other["tasks"]) and len(read_results(out / RESULTS_FILE)[0]) == 7

    # The command line: a thin wrapper over the same function (all cached, prints the table).
    assert cli.main(["eval", f"tasks={tasks_yaml}", f"out={out}", f"model.arch={TINY}", "seed=5", "device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "average of 3 main metrics" in printed and "(cached)" in printed
    assert len(read_results(out / RESULTS_FILE)[0]) == 7


def test_evaluate_on_the_world_tasks(ci_world, tmp_path):
    tasks = load_tasks(ci_world / "tasks.yaml")
    summary = evaluate(ModelSpec("world-rn-s", ""), ci_world / "tasks.yaml", tmp_path / "eval", batch_size=128)
    stats = json.loads((tmp_path / "eval" / "stats.json").read_text())
    assert [t["name"] for t in summary["tasks"]] == [t.name for t in tasks]
    for t in tasks:
        n_samples = sum(1 for p in t.shards() for m in tarfile.open(p).getnames() if m.endswith(".jpg"))
        assert stats["tasks"][t.name]["counts"] == {"seen": n_samples, "kept": n_samples, "dropped": {}}
    assert summary["average"] == pytest.approx(np.mean([t["value"] for t in summary["tasks"]]))
    assert set(summary["groups"]) == {t.group for t in tasks}


def test_embed_task_images_gives_one_unit_vector_per_train_image(ci_world):
    """The downstream training images that image_based filtering and NormSim compare the pool with."""
    from clipsift.eval.evaluate import embed_task_images
    from clipsift.eval.models import ModelSpec

    emb = embed_task_images(ModelSpec("world-rn-s", ""), ci_world / "tasks.yaml", only=["shapes", "retrieval"],
                            device="cpu")
    stats = json.loads((ci_world / "stats.json").read_text())["tasks"]
    assert emb.shape == (stats["shapes"]["train"] + stats["retrieval"]["train"], 128)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_tokenizer_shortcut_gives_open_clips_tokens_on_world_and_web_captions(ci_world):
    import open_clip
    import pyarrow.parquet as pq

    from clipsift.eval.models import tokenizer

    world_texts = [t for p in sorted((ci_world / "pool" / "metadata").glob("*.parquet"))
                   for t in pq.read_table(p, columns=["text"]).column("text").to_pylist() if t is not None]
    web = ["  IMG_0412.JPG ", "Fish &amp; Chips", "tom &amp;amp; jerry", "caf\u00c3\u00a9 au lait", "na\u00efve caf\u00e9",
           "line\r\nbreak", "tab\tseparated", "\u201ccurly\u201d quotes", "\ufb01ne ligature", "<b>bold</b> &lt;3",
           "\x1b[31mred\x1b[0m", "emoji \U0001f600", "", "   ", "A  LOT   of    SPACE", "don't stop", "\u4e2d\u6587 text"]
    for arch in ("world-rn-s", "ViT-B-32"):
        ours, theirs = tokenizer(arch), open_clip.get_tokenizer(arch)
        assert ours.clean_fn is not theirs.clean_fn  # the shortcut is in place
        texts = world_texts[:2000] + web
        assert torch.equal(ours(texts), theirs(texts)), arch


# ---------------------------------------------------------------- retrieval ties (issue 22, item 10)
def test_retrieval_ties_go_to_the_lower_index_as_clip_benchmarks_topk():
    # Two images with the same caption text (identical caption embeddings): each image ties its own
    # caption with the other's. The caption listed first wins: image 0 finds t0 (its own) first, a
    # hit; image 1's own caption t1 comes after t0, a miss at k=1 (a tie counted as a miss before).
    images = np.array([[1, 0, 0], [.96, .28, 0], [0, 0, 1]], dtype=np.float32)
    captions = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    got = M.retrieval_metrics(images, captions, np.array([0, 1, 2]), ks=(1, 2))
    assert got["text_retrieval_recall@1"] == pytest.approx(2 / 3)  # images 0 and 2
    assert got["text_retrieval_recall@2"] == 1.0
    # text -> image: t0 and t1 both rank image 0 first (1.0 vs .96): t1 misses at k=1 without a tie.
    # Two identical images tie instead: a caption of the second one misses, of the first one hits.
    same = M.retrieval_metrics(images[[0, 0, 2]], captions, np.array([0, 1, 2]), ks=(1,))
    assert same["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert same["text_retrieval_recall@1"] == pytest.approx(2 / 3)

    # Many ties (coarse embeddings) against a stable descending sort at every k, and at k=1 against
    # torch.topk itself, the call clip_benchmark ranks with (stable there for rows of >= 100).
    rng = np.random.default_rng(3)
    img = rng.integers(-1, 2, size=(120, 4)).astype(np.float32)
    img[np.all(img == 0, axis=1)] = 1
    txt = np.concatenate([img, img[rng.integers(0, 120, size=40)]])  # 40 captions shared with another image
    caption_image = np.concatenate([np.arange(120), rng.integers(0, 120, size=40)])
    sim = M.normalize(img) @ M.normalize(txt).T
    ref = {}
    for k in (1, 5, 10):
        top_txt = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        ref[f"text_retrieval_recall@{k}"] = np.mean([(caption_image[top_txt[i]] == i).any() for i in range(120)])
        top_img = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
        ref[f"image_retrieval_recall@{k}"] = np.mean((top_img == caption_image[:, None]).any(1))
    ref["mean_recall@1"] = (ref["text_retrieval_recall@1"] + ref["image_retrieval_recall@1"]) / 2
    got = M.retrieval_metrics(img, txt, caption_image)
    assert got == pytest.approx(ref)
    assert 0 < ref["text_retrieval_recall@1"] < 1  # ties decided both ways: the test can tell the rules apart
    scores = torch.from_numpy(sim.T.copy())  # clip_benchmark: texts x images, top-k over images
    top1 = torch.topk(scores, 1, dim=1)[1][:, 0].numpy()
    assert got["image_retrieval_recall@1"] == pytest.approx(np.mean(top1 == caption_image))
    top1 = torch.topk(torch.from_numpy(sim.copy()), 1, dim=1)[1][:, 0].numpy()
    assert got["text_retrieval_recall@1"] == pytest.approx(np.mean(caption_image[top1] == np.arange(120)))
