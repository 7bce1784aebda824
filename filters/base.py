"""The filter component: batches of columns in, a keep mask and a reason per dropped row out.

A leaf filter is a dataclass of its parameters (so a YAML config is type-checked by
clipsift.config) with three methods:

    needs()      -> Needs: the metadata columns and embeddings it reads
    fit(pool)    -> dict: a pass over the whole pool before any mask (a threshold, k-means...);
                    returns what it learned, for stats.json. Most filters need none.
    apply(batch) -> Verdict: keep mask, a reason per dropped row, optionally a score

Filters compose into a tree of `all` (intersection) and `any` (union) groups. Every leaf is fitted
on the whole pool and evaluated on every row, independently of its siblings, as DataComp does for
image_based ∩ clip_score. Counting happens once, in `run_filters`: per leaf (what that rule alone
would drop, by reason) and for the whole tree (each dropped row attributed to the first leaf, in
config order, that rejected it).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol

import numpy as np

from clipsift import config, formats
from clipsift.runlog import Counts, Timer


class FilterError(ValueError):
    """A filter that cannot run on this input (missing column, bad resource file, bad parameter)."""


# ---------------------------------------------------------------- data passed to filters
@dataclass
class Batch:
    """Rows [offset, offset + len) of a pool: metadata columns and embeddings as numpy arrays.

    `cache` holds values derived from the batch that several filters share (language ids).
    """

    offset: int
    columns: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns["uid"])

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise FilterError(f"column {name!r} was not loaded; have {sorted(self.columns)}")
        return self.columns[name]

    def embedding(self, name: str) -> np.ndarray:
        if name not in self.embeddings:
            raise FilterError(f"embedding {name!r} was not loaded; have {sorted(self.embeddings)}")
        return self.embeddings[name]

    def derived(self, key: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


class Pool(Protocol):
    """What filters read: the whole pool as a sequence of batches, in a fixed row order."""

    num_rows: int

    def batches(self, columns: set[str], embeddings: set[str] = ..., batch_size: int = ...) -> Iterator[Batch]: ...

    def fingerprint(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Needs:
    columns: frozenset[str] = frozenset()
    embeddings: frozenset[str] = frozenset()

    def __or__(self, other: "Needs") -> "Needs":
        return Needs(self.columns | other.columns, self.embeddings | other.embeddings)


class Verdict:
    """A filter's answer for a batch: keep mask, a reason per dropped row ("" where kept), optional
    score, and (when known without counting `reason`) the drops per reason.

    `reason` may be given as rule codes (`codes` into `names`, 0 = kept) and is then built on first
    use: a single filter's run only needs `dropped`, and building an object array per batch was a
    large part of a cheap filter's time.
    """

    def __init__(self, keep: np.ndarray, reason: np.ndarray | None = None, score: np.ndarray | None = None,
                 dropped: dict[str, int] | None = None, codes: np.ndarray | None = None,
                 names: tuple[str, ...] = ()):
        if reason is None and codes is None:
            raise ValueError("Verdict needs reason or codes")
        self.keep, self.score, self.dropped = keep, score, dropped
        self._reason, self._codes, self._names = reason, codes, names

    @property
    def reason(self) -> np.ndarray:
        if self._reason is None:
            self._reason = np.array(["", *self._names], dtype=object)[self._codes]
        return self._reason

    @classmethod
    def from_rules(cls, n: int, rules: list[tuple[str, Any]], score: np.ndarray | None = None) -> "Verdict":
        """Keep rows that pass every rule; a dropped row gets the reason of its first failing rule.

        A rule is a bool mask, or a callable taking the rows still kept (a bool mask) and returning
        one: costly rules (language id) go last and only look at rows the cheap ones kept.
        """
        keep = np.ones(n, dtype=bool)
        codes = np.zeros(n, dtype=np.uint8)
        names: list[str] = []
        dropped: dict[str, int] = {}
        for name, ok in rules:
            if callable(ok):
                ok = ok(keep.copy())
            failed = keep & ~np.asarray(ok, dtype=bool)
            k = int(np.count_nonzero(failed))  # not .sum(): several times slower on bools
            if k:
                if name not in names:
                    names.append(name)
                # failed rows were kept, so their code is 0: adding sets it, without a masked store's cost
                codes += failed.view(np.uint8) * np.uint8(names.index(name) + 1)
                keep &= ~failed
                dropped[name] = dropped.get(name, 0) + k
        return cls(keep, score=score, dropped=dropped, codes=codes, names=tuple(names))


@dataclass
class Context:
    """Shared resources a filter may need, resolved once by the runner."""

    lang: Any = None  # clipsift.filters.lang.Languages
    downstream_embeddings: str = ""  # .npy of downstream training-image embeddings
    concepts: list[str] = field(default_factory=list)  # downstream class names (text_based_world)
    work_dir: Path | None = None  # where pool-level filters keep resumable state
    seed: int = 0
    batch_size: int = 65536
    log: Callable[[str], None] = print


class Filter:
    """Base class of leaf filters; subclasses are @dataclass and registered with @register."""

    kind: ClassVar[str] = ""
    ctx: Context
    name: str

    def setup(self, ctx: Context, name: str) -> None:
        self.ctx, self.name = ctx, name

    def needs(self) -> Needs:
        return Needs()

    def fit(self, pool: Pool) -> dict[str, Any]:
        return {}

    def apply(self, batch: Batch) -> Verdict:
        raise NotImplementedError


FILTERS: dict[str, type[Filter]] = {}


def register(kind: str) -> Callable[[type[Filter]], type[Filter]]:
    def deco(cls: type[Filter]) -> type[Filter]:
        cls.kind = kind
        FILTERS[kind] = cls
        return cls

    return deco


# ---------------------------------------------------------------- top-k / top fraction
def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's pool cut: the score at rank int(N * fraction) of the scores in descending order.

    Every row scoring >= it is kept, ties included, so int(N * fraction) + 1 rows or more pass
    (DataComp's get_threshold: -np.sort(-scores)[int(len(scores) * fraction)]). The product is
    truncated as Python's int() does (0.29 * 100 -> 28). Missing (NaN) scores rank last; a cut
    that falls on them is an error. The one definition behind clip_score, normsim and
    `clipsift sample method=top_fraction`.
    """
    if not 0.0 < fraction <= 1.0:
        raise FilterError(f"fraction must be in (0, 1], got {fraction}")
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        raise FilterError("cannot take a pool fraction of an empty pool")
    rank = min(int(len(s) * fraction), len(s) - 1)  # fraction 1.0 keeps the whole pool (DataComp: IndexError)
    missing = np.isnan(s)
    desc = -np.where(missing, -np.inf, s) if missing.any() else -s
    cut = float(-np.partition(desc, rank)[rank])
    if cut == -np.inf and missing.any():
        raise FilterError(f"the top {fraction} of {len(s)} rows reaches rows without a score "
                          f"({int(np.isnan(s).sum())} missing); use a smaller fraction or a threshold")
    return cut


def top_fraction_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Rows kept by the top `fraction` rule (top_fraction_threshold), compared in the scores' dtype."""
    scores = np.asarray(scores)
    cut = top_fraction_threshold(scores, fraction)
    dtype = scores.dtype if np.issubdtype(scores.dtype, np.floating) else np.dtype(np.float64)
    return scores >= dtype.type(cut)


# ---------------------------------------------------------------- the config tree
@dataclass
class FilterSpec:
    """One node of a filter config: a leaf (`kind` + `args`) or a group (`kind: all|any` + `of`)."""

    kind: str = "no_filter"
    name: str = ""  # label in stats.json; defaults to kind (numbered if repeated)
    args: dict[str, Any] = field(default_factory=dict)
    of: list["FilterSpec"] = field(default_factory=list)


GROUPS = ("all", "any")


@dataclass
class Node:
    name: str
    op: str  # "leaf", "all", "any"
    filter: Filter | None = None
    children: list["Node"] = field(default_factory=list)

    def leaves(self) -> list["Node"]:
        return [self] if self.op == "leaf" else [leaf for c in self.children for leaf in c.leaves()]

    def needs(self) -> Needs:
        out = Needs(frozenset({"uid"}))
        for leaf in self.leaves():
            out = out | leaf.filter.needs()  # type: ignore[union-attr]
        return out


def build(spec: FilterSpec, ctx: Context, _names: set[str] | None = None, _path: str = "filter") -> Node:
    """Turn a FilterSpec into a tree of ready filters; unknown kinds / bad args raise ConfigError."""
    names = set() if _names is None else _names
    from clipsift.filters import registry  # noqa: F401  (imports the modules that register filters)

    name = spec.name or spec.kind
    if name in names:  # a second clip_score becomes clip_score#2
        i = 2
        while f"{name}#{i}" in names:
            i += 1
        name = f"{name}#{i}"
    names.add(name)
    if spec.kind in GROUPS:
        if spec.args:
            raise config.ConfigError(f"{_path}: a {spec.kind!r} group takes `of`, not `args`")
        if not spec.of:
            raise config.ConfigError(f"{_path}: a {spec.kind!r} group needs at least one filter in `of`")
        children = [build(s, ctx, names, f"{_path}.of[{i}]") for i, s in enumerate(spec.of)]
        return Node(name, spec.kind, children=children)
    if spec.of:
        raise config.ConfigError(f"{_path}: only `all`/`any` groups take `of` (kind is {spec.kind!r})")
    if spec.kind not in FILTERS:
        raise config.ConfigError(f"{_path}.kind: unknown filter {spec.kind!r}; known: {', '.join(sorted(FILTERS) + list(GROUPS))}")
    flt = config.from_dict(FILTERS[spec.kind], spec.args, f"{_path}.args.")
    flt.setup(ctx, name)
    return Node(name, "leaf", filter=flt)


# ---------------------------------------------------------------- running a tree over a pool
@dataclass
class FilterResult:
    keep: np.ndarray  # bool per pool row
    uids: np.ndarray  # kept uids as DataComp's u8,u8 pairs (formats.SUBSET_DTYPE), pool order, unsorted
    counts: Counts  # the whole tree
    per_filter: dict[str, Counts]  # each leaf on its own
    fits: dict[str, dict[str, Any]]  # what each leaf learned in its pool pass
    scores: dict[str, np.ndarray]  # leaf name -> score per pool row (filters that compute one)
    timings: Timer

    def stats(self) -> dict[str, Any]:
        return {
            "counts": self.counts.as_dict(),
            "filters": {
                name: {"counts": c.as_dict(), "fit": self.fits.get(name, {})} for name, c in self.per_filter.items()
            },
            "seconds": self.timings.as_dict(),
        }


def run_filters(tree: Node, pool: Pool, batch_size: int = 65536) -> FilterResult:
    timer = Timer()
    fits: dict[str, dict[str, Any]] = {}
    for leaf in tree.leaves():
        with timer(f"fit/{leaf.name}"):
            fits[leaf.name] = leaf.filter.fit(pool) or {}  # type: ignore[union-attr]
    needs = tree.needs()
    total = Counts()
    per_filter = {leaf.name: Counts() for leaf in tree.leaves()}
    keep_parts: list[np.ndarray] = []
    uid_parts: list[np.ndarray] = []
    score_parts: dict[str, list[np.ndarray]] = {}
    with timer("apply"):
        for batch in pool.batches(set(needs.columns), set(needs.embeddings), batch_size):
            keep, reason = _evaluate(tree, batch, per_filter, score_parts, top=tree.op == "leaf")
            if tree.op != "leaf":
                _count(total, keep, reason)
            keep_parts.append(keep)
            # converted batch by batch: the kept uid strings are read while still in cache
            uid_parts.append(formats.uids_to_u8u8(batch.column("uid")[keep]))
    if tree.op == "leaf":  # one rule: the tree's counts are the leaf's, under the leaf's name
        leaf = per_filter[tree.name]
        total.keep(leaf.kept)
        for why, k in leaf.dropped.items():
            total.drop(f"{tree.name}:{why}", k)
    keep_all = np.concatenate(keep_parts) if keep_parts else np.zeros(0, dtype=bool)
    uids = np.concatenate(uid_parts) if uid_parts else np.zeros(0, dtype=formats.SUBSET_DTYPE)
    scores = {k: np.concatenate(v) for k, v in score_parts.items()}
    return FilterResult(keep_all, uids, total, per_filter, fits, scores, timer)


def _evaluate(node: Node, batch: Batch, per_filter: dict[str, Counts],
              scores: dict[str, list[np.ndarray]], top: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    if node.op == "leaf":
        v = node.filter.apply(batch)  # type: ignore[union-attr]
        if v.keep.shape != (len(batch),) or v.keep.dtype != bool:
            raise FilterError(f"filter {node.name!r} returned a keep mask of shape {v.keep.shape} / {v.keep.dtype}")
        if v.dropped is not None:
            per_filter[node.name].keep(int(np.count_nonzero(v.keep)))
            for why, k in v.dropped.items():
                per_filter[node.name].drop(why or "unspecified", k)
        else:
            _count(per_filter[node.name], v.keep, v.reason)
        if v.score is not None:
            scores.setdefault(node.name, []).append(np.asarray(v.score, dtype=np.float32))
        return v.keep, (None if top else _prefixed(node.name, v.keep, v.reason))  # top: counted above, no reasons
    results = [_evaluate(c, batch, per_filter, scores) for c in node.children]
    keeps = np.stack([k for k, _ in results])
    keep = keeps.all(0) if node.op == "all" else keeps.any(0)
    # Attribute a drop to the first child that rejected the row.
    first = np.argmax(~keeps, axis=0)
    reasons = np.stack([r for _, r in results])
    reason = np.where(keep, "", reasons[first, np.arange(len(batch))]).astype(object)
    return keep, reason


def _prefixed(name: str, keep: np.ndarray, reason: np.ndarray) -> np.ndarray:
    """"name:reason" for dropped rows, "" for kept ones (a handful of distinct reasons: set per reason)."""
    out = np.full(len(keep), "", dtype=object)
    dropped = np.flatnonzero(~keep)
    if len(dropped):
        r = reason[dropped]
        for why in set(r.tolist()):
            out[dropped[r == why]] = f"{name}:{why}"
    return out


def _count(counts: Counts, keep: np.ndarray, reason: np.ndarray) -> None:
    counts.keep(int(np.count_nonzero(keep)))
    if not keep.all():
        for name, k in collections.Counter(reason[~keep].tolist()).items():
            counts.drop(str(name) or "unspecified", int(k))

