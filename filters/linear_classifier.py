"""A linear quality classifier: logistic regression on a CLIP's [image, text] embeddings, trained to
tell a high-quality set (positives) from random pool rows (negatives); the score is its logit.

FLYT's M-FLYT mixes two linear-classifier scores among its inputs; this is the cheap form the world
allows: positives are the pipeline's output over a high-quality set embedded with the same models
(on the world, its curated split: `clipsift embed input=WORLD/curated/shards ...`), negatives a
seeded uniform sample of the pool (as many as positives unless set). The pool holds clean pairs
too, so a negative is "a random web pair", not "a bad pair" -- the classifier learns what sets the
high-quality set apart from the pool, whatever that is. Being linear in [image, text], it sees what
a pair is about (content, style, caption language), not whether image and caption agree (that is a
product of the two): it complements the CLIP scores rather than repeating them.

Full-batch L-BFGS on the (unit-norm) features with an L2 penalty on the weights: deterministic
given the seed, seconds for 10^5 examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipsift import config
from clipsift.filters import kmeans
from clipsift.filters.base import Batch, Filter, FilterError, Needs, Pool, Verdict, register
from clipsift.filters.baselines import check_cut, score_cut, score_verdict
from clipsift.filters.image_based import gather
from clipsift.filters.pool import MetadataPool


def features(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    return np.concatenate([kmeans.normalize(img), kmeans.normalize(txt)], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Weights and bias minimising mean log-loss + l2/2 |w|^2 (full-batch L-BFGS, float64)."""
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        logits = xt @ w + b
        acc = float(((logits > 0).double() == yt).double().mean())
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, yt))
    return w.detach().numpy(), float(b.detach()), {"train_accuracy": round(acc, 4), "train_log_loss": round(loss, 4)}


@register("linear_classifier")
@dataclass
class LinearClassifier(Filter):
    model: str = "l14"  # features: [<model>_img, <model>_txt], unit-norm
    positives: str = ""  # metadata folder of the high-quality set, embedded with the same model
    negatives: int = 0  # pool rows sampled as negatives (0: as many as positives, at most the pool)
    l2: float = 1e-3  # weight penalty (on the mean log-loss's scale)
    iterations: int = 200  # L-BFGS iterations
    seed: int | None = None  # None: the run's seed
    threshold: float | None = None  # neither: a score only, nothing dropped
    fraction: float | None = None

    def __post_init__(self) -> None:
        check_cut(self.threshold, self.fraction, "linear_classifier", required=False)
        if not self.positives:
            raise config.ConfigError("linear_classifier: set positives=<metadata folder of the high-quality set> "
                                     "(the pipeline's output over it, with the same models as the pool)")
        if self.negatives < 0 or self.l2 < 0 or self.iterations < 1:
            raise config.ConfigError("linear_classifier: negatives and l2 must be >= 0, iterations >= 1")

    def needs(self) -> Needs:
        return Needs(embeddings=frozenset({f"{self.model}_img", f"{self.model}_txt"}))

    def fit(self, pool: Pool) -> dict[str, Any]:
        seed = self.ctx.seed if self.seed is None else self.seed
        names = (f"{self.model}_img", f"{self.model}_txt")
        hq = MetadataPool(self.positives)
        pos = [features(b.embedding(names[0]), b.embedding(names[1]))
               for b in hq.batches(set(), set(names), self.ctx.batch_size)]
        pos_x = np.concatenate(pos) if pos else np.zeros((0, 0), np.float32)  # an empty set: the error below
        k = min(pool.num_rows, self.negatives or len(pos_x))
        if k == 0 or len(pos_x) == 0:
            raise FilterError(f"linear_classifier: needs positives ({len(pos_x)} in {self.positives}) and pool rows "
                              f"({pool.num_rows})")
        rows = np.sort(np.random.default_rng(seed).choice(pool.num_rows, k, replace=False))
        neg_x = np.concatenate([gather(pool, n, rows, self.ctx.batch_size) for n in names], axis=1)
        if neg_x.shape[1] != pos_x.shape[1]:
            raise FilterError(f"linear_classifier: {self.positives} has {pos_x.shape[1]}-d features, the pool "
                              f"{neg_x.shape[1]}-d: embed both with the same model")
        x = np.concatenate([pos_x, neg_x]).astype(np.float32)
        y = np.concatenate([np.ones(len(pos_x)), np.zeros(len(neg_x))]).astype(np.float32)
        self._w, self._b, report = fit_logistic(x, y, self.l2, self.iterations)
        parts = [self._logits(b) for b in pool.batches(set(), set(names), self.ctx.batch_size)]
        self._scores = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        self._threshold, cut = score_cut(self._scores, self.threshold, self.fraction)
        report.update(positives=int(len(pos_x)), negatives=int(k), seed=seed, **cut)
        return report

    def _logits(self, b: Batch) -> np.ndarray:
        x = features(b.embedding(f"{self.model}_img"), b.embedding(f"{self.model}_txt")).astype(np.float64)
        return (x @ self._w + self._b).astype(np.float32)

    def apply(self, batch: Batch) -> Verdict:
        return score_verdict(batch, self._scores, self._threshold)
