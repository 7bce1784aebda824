"""Zero-shot metric math: pure numpy functions on embeddings, logits and labels.

Nothing here touches models or files, so every number can be checked against a hand computation.

Ranks and ties: an item is a top-k hit when its rank (the number of wrong candidates placed
before the right one) is < k. Classification counts every wrong class scoring at least as high as
the right one, so a collapsed model (all scores equal) scores 0, not 1. Retrieval places candidates
as a descending sort that keeps index order among equal scores: a wrong candidate tied with the
right one comes first only if its index is lower. That is what clip_benchmark's torch.topk gives
at k=1 (its ranking for DataComp's main metric mean_recall@1; measured on CPU torch 2.x), so a
caption shared by two images counts for the image listed first. A non-finite score for the right
candidate (a diverged model) is a miss either way.
"""
from __future__ import annotations

import numpy as np

RETRIEVAL_KS = (1, 5, 10)
_CHUNK = 1024  # rows of a similarity matrix held at once (memory stays O(chunk * candidates))
_MISS = np.iinfo(np.int64).max  # the rank of a non-finite score: a miss at every k


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); an all-zero row stays zero instead of NaN."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def class_weights(text_emb: np.ndarray) -> np.ndarray:
    """Standard CLIP zero-shot classifier from (classes, templates, dim) text embeddings.

    Each prompt embedding is normalised, averaged over templates, and the mean normalised
    again: one unit vector per class, shape (classes, dim).
    """
    if text_emb.ndim != 3:
        raise ValueError(f"text embeddings must be (classes, templates, dim), got shape {text_emb.shape}")
    return normalize(normalize(text_emb).mean(axis=1))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """acc1, acc5 (only with >= 5 classes) and mean_per_class_recall.

    logits: (n, classes); labels: (n,) ints in [0, classes). Mean per-class recall averages the
    recall of the classes that occur in `labels` (a class with no test sample has no recall).
    """
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n, n_classes = logits.shape
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"need >= 1 sample and one label per row; logits {logits.shape}, labels {labels.shape}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must lie in [0, {n_classes}); got [{labels.min()}, {labels.max()}]")
    true = logits[np.arange(n), labels]
    rank = (logits >= true[:, None]).sum(axis=1) - 1  # wrong classes scoring >= the right one
    rank[~np.isfinite(true)] = _MISS  # a NaN score is a miss, never a hit
    out = {"acc1": float(np.mean(rank < 1))}
    if n_classes >= 5:
        out["acc5"] = float(np.mean(rank < 5))
    present = np.unique(labels)
    hits = np.bincount(labels, weights=(rank < 1).astype(np.float64), minlength=n_classes)
    support = np.bincount(labels, minlength=n_classes)
    out["mean_per_class_recall"] = float(np.mean(hits[present] / support[present]))
    return out


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, ks: tuple[int, ...] = RETRIEVAL_KS
) -> dict[str, float]:
    """Recall@k both ways for image/caption retrieval with cosine similarity.

    image_emb: (n_images, dim); text_emb: (n_texts, dim); text_image[j] = index of the image that
    caption j describes (an image may have several captions; every image needs at least one).
    Names follow clip_benchmark: image_retrieval_recall@k = text -> image (the caption's image
    ranks in the top k of all images); text_retrieval_recall@k = image -> text (at least one of
    the image's captions ranks in the top k of all captions). mean_recall@1 is the mean of the
    two recall@1, DataComp's main retrieval metric.
    """
    img = normalize(image_emb)
    txt = normalize(text_emb)
    text_image = np.asarray(text_image, dtype=np.int64)
    n_img, n_txt = len(img), len(txt)
    if text_image.shape != (n_txt,) or n_txt == 0:
        raise ValueError(f"need one image index per caption; {n_txt} captions, index shape {text_image.shape}")
    if text_image.min() < 0 or text_image.max() >= n_img:
        raise ValueError(f"caption image indices must lie in [0, {n_img})")
    if np.bincount(text_image, minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption")

    # image -> text: rank of each image's best caption among the captions of other images
    i2t_rank = np.empty(n_img, dtype=np.int64)
    for s in range(0, n_img, _CHUNK):
        sim = img[s : s + _CHUNK] @ txt.T  # (chunk, n_txt)
        own = text_image[None, :] == np.arange(s, s + len(sim))[:, None]
        own_sim = np.where(own, sim, -np.inf)
        best = own_sim.max(axis=1)
        first = (own_sim == best[:, None]).argmax(axis=1)  # the lowest-index own caption scoring best
        i2t_rank[s : s + len(sim)] = np.where(np.isfinite(best), _placed_before(sim, best, first, own), _MISS)

    # text -> image: rank of each caption's image among the other images
    t2i_rank = np.empty(n_txt, dtype=np.int64)
    for s in range(0, n_txt, _CHUNK):
        sim = txt[s : s + _CHUNK] @ img.T  # (chunk, n_img)
        right_idx = text_image[s : s + _CHUNK]
        right = sim[np.arange(len(sim)), right_idx]
        own = np.arange(n_img)[None, :] == right_idx[:, None]
        t2i_rank[s : s + len(sim)] = np.where(np.isfinite(right), _placed_before(sim, right, right_idx, own), _MISS)

    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(t2i_rank < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(i2t_rank < k))
    if 1 in ks:
        out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    return out


def _placed_before(sim: np.ndarray, score: np.ndarray, index: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Per row: wrong candidates (not `own`) a stable descending sort puts before the one at `index`
    scoring `score`: those scoring higher, and those scoring the same at a lower index."""
    lower = np.arange(sim.shape[1])[None, :] < index[:, None]
    before = (sim > score[:, None]) | ((sim == score[:, None]) & lower)
    return (before & ~own).sum(axis=1)


# Metric names each task type produces; a task's main_metric must be one of them.
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = ("mean_recall@1",) + tuple(
    f"{way}_retrieval_recall@{k}" for way in ("image", "text") for k in RETRIEVAL_KS
)
METRICS = {"classification": CLASSIFICATION_METRICS, "retrieval": RETRIEVAL_METRICS}
