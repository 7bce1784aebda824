"""The compare report: results table (markdown, CSV, JSON), plots, and one markdown page with both.

Written into out/report/: results.{md,csv,json}, report.md and PNG plots:
average per strategy with error bars over seeds, per-task bars, score distributions per planted
noise type, the fraction of each noise type each strategy kept, SCS repetition histograms and
M-FLYT's learned weights. A strategy sampling by a learned score ran each seed with its own
scorer: its spread covers the scorer's variance too, and the report gives the overlap (Jaccard)
of its subsets across scorer seeds.
"""
from __future__ import annotations

import csv
import io
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from clipsift import formats
from clipsift.runlog import atomic_write_text, read_json, write_json


def aggregate(strategies, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per strategy: mean ± std over seeds of every task's main metric, groups, average."""
    rows = []
    for s in strategies:
        runs = [r for r in results if r["strategy"] == s.name]
        if not runs:
            continue
        tasks = [t["name"] for t in runs[0]["summary"]["tasks"]]
        # groups in the tasks' order (tasks.yaml), not the summary dict's: a resumed run reads its
        # results back from JSON written with sorted keys, and must write the same report
        groups = list(dict.fromkeys(t["group"] for t in runs[0]["summary"]["tasks"]))
        value = lambda r, t: next(x["value"] for x in r["summary"]["tasks"] if x["name"] == t)  # noqa: E731

        def stat(values):
            v = np.array(values, dtype=float)
            return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

        scorers = [r.get("scorer_seed") for r in runs]
        rows.append({
            "strategy": s.name, "seeds": [r["seed"] for r in runs],
            # learned score: the scorer seed of each run; several distinct = the spread covers the scorer too
            "scorer_seeds": scorers if s.learned else None,
            "scorer_varies": s.learned and len(set(scorers)) > 1,
            "average": stat([r["summary"]["average"] for r in runs]),
            "tasks": {t: stat([value(r, t) for r in runs]) for t in tasks},
            "groups": {g: stat([r["summary"]["groups"][g] for r in runs]) for g in groups},
            "subset_size": runs[0]["subset_size"], "unique": runs[0]["unique"],
        })
    return rows


def _fmt(s: dict[str, float], n: int) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if n > 1 else f"{100 * s['mean']:.1f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no results)\n"
    tasks, groups = list(rows[0]["tasks"]), list(rows[0]["groups"])
    head = ["strategy", "seeds", "subset", "unique", *tasks, *(f"[{g}]" for g in groups), "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -r["average"]["mean"]):
        n = len(r["seeds"])
        cells = [r["strategy"], f"{n}*" if r.get("scorer_varies") else str(n), str(r["subset_size"]), str(r["unique"]),
                 *(_fmt(r["tasks"][t], n) for t in tasks), *(_fmt(r["groups"][g], n) for g in groups),
                 f"**{_fmt(r['average'], n)}**"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("scorer_varies") for r in rows):
        lines.append("\n\\* each seed a different learned scorer and a different training run (subset and "
                     "unique: the first scorer seed's)")
    return "\n".join(lines) + "\n"


def _mean_std(rows: list[dict[str, Any]]) -> float | None:
    return 100 * float(np.mean([r["average"]["std"] for r in rows])) if rows else None


def verdict(rows: list[dict[str, Any]]) -> str:
    """Are the differences between strategies larger than the seed-to-seed spread? Said plainly.

    Two kinds of spread: a fixed subset varies only the training seed; a learned score varies its
    scorer too (each seed retrains it). A strategy's spread is its kind's mean std (the overall
    mean where its kind has no multi-seed strategy); a gap counts when it exceeds twice the larger
    of the two strategies' spreads."""
    if len(rows) < 2:
        return "Only one strategy: nothing to compare."
    multi = [r for r in rows if len(r["seeds"]) > 1]
    order = sorted(rows, key=lambda r: -r["average"]["mean"])
    best, worst = order[0], order[-1]
    gap = lambda r: 100 * (best["average"]["mean"] - r["average"]["mean"])  # noqa: E731
    if not multi:
        return (f"Best ({best['strategy']}) minus worst ({worst['strategy']}): {gap(worst):.1f} points. Every strategy "
                "ran with one seed, so the seed-to-seed spread is unknown: run with more seeds before trusting an order.")
    both = [r for r in multi if r.get("scorer_varies")]
    fixed = [r for r in multi if r.get("scorer_seeds") is None]
    sd_all, sd_both, sd_fixed = _mean_std(multi), _mean_std(both), _mean_std(fixed)

    def spread(r: dict[str, Any]) -> float:
        own = sd_both if r.get("scorer_seeds") is not None else sd_fixed
        return own if own is not None else sd_all

    clear = [r["strategy"] for r in order[1:] if gap(r) > 2 * max(spread(best), spread(r))]
    ties = [r["strategy"] for r in order if r["strategy"] not in clear]
    names = lambda rs: ", ".join(r["strategy"] for r in rs)  # noqa: E731
    parts = [f"Seed-to-seed spread (std of the average over seeds, mean over the {len(multi)} strategies run with "
             f"several seeds): {sd_all:.1f} points."]
    if both:
        parts.append(f"It covers both sources of variance: for a learned score each seed is a different scorer and a "
                     f"different training run ({names(both)}: mean std {sd_both:.1f})"
                     + (f"; a fixed subset varies only the training seed ({names(fixed)}: {sd_fixed:.1f})."
                        if fixed else "."))
    elif any(r.get("scorer_seeds") is not None for r in rows):
        parts.append("No learned strategy ran with several scorer seeds, so this spread leaves out the scorer's own "
                     "variance (retraining it moves its subset), the larger source for learned scores: treat their "
                     "gaps with care.")
    s_best = spread(best)
    parts.append(f"Best ({best['strategy']}) minus worst ({worst['strategy']}): {gap(worst):.1f} points, "
                 f"{gap(worst) / s_best if s_best else float('inf'):.1f}x the best's spread. A gap counts when it "
                 f"exceeds twice the larger spread of the two strategies (a learned strategy's is the scorer-and-"
                 f"training spread). Not separable from the best here: {', '.join(ties)}. "
                 f"Clearly below the best: {', '.join(clear) or 'none'}.")
    return " ".join(parts)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard overlap of two subsets as multisets (one entry per draw): Σ min / Σ max of each
    example's draws; for subsets without repeats (a top-k) the plain Jaccard of their examples."""
    keys, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ca = np.bincount(inverse[: len(a)], minlength=len(keys))
    cb = np.bincount(inverse[len(a):], minlength=len(keys))
    return float(np.minimum(ca, cb).sum() / max(1, np.maximum(ca, cb).sum()))


def subset_overlap(compare, strategies) -> dict[str, dict[str, Any]]:
    """Per learned strategy with several scorer seeds: the Jaccard overlap of its subsets between
    every pair of scorer seeds (how stable the selection is when only the scorer's seed changes)."""
    from clipsift import formats

    out = {}
    for s in strategies:
        scorers = sorted(sc for sc in _scorer_seeds(compare, s) if sc is not None)
        paths = {sc: compare.subset_path(s, sc) for sc in scorers}
        subsets = {sc: np.asarray(formats.read_subset(p)) for sc, p in paths.items() if p.is_file()}
        if len(subsets) < 2:
            continue
        pairs = {f"{a}-{b}": jaccard(subsets[a], subsets[b]) for a, b in combinations(sorted(subsets), 2)}
        out[s.name] = {"scorer_seeds": sorted(subsets),
                       "unique": {str(k): int(len(np.unique(v))) for k, v in subsets.items()},
                       "jaccard": pairs, "mean": float(np.mean(list(pairs.values()))),
                       "min": float(min(pairs.values()))}
    return out


def csv_table(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if not rows:
        return ""
    tasks, groups = list(rows[0]["tasks"]), list(rows[0]["groups"])
    w = csv.writer(buf)
    w.writerow(["strategy", "seeds", "subset_size", "unique", "average_mean", "average_std",
                *(f"{t}_mean" for t in tasks), *(f"group_{g}_mean" for g in groups)])
    for r in rows:
        w.writerow([r["strategy"], len(r["seeds"]), r["subset_size"], r["unique"], r["average"]["mean"],
                    r["average"]["std"], *(r["tasks"][t]["mean"] for t in tasks),
                    *(r["groups"][g]["mean"] for g in groups)])
    return buf.getvalue()


def _scorer_seeds(compare, strategy) -> list[int | None]:
    """The scorer seeds a strategy's runs used, in order ([None] without a learned score)."""
    return list(dict.fromkeys(sc for _, sc in compare.plan(strategy)))


def subset_draws(compare, strategies) -> tuple[Any, dict[str, list[np.ndarray]]]:
    """The world's ground truth and, per strategy, each scorer seed's subset as draws per ground-truth
    row (0 = not in the subset; repeats counted). Strategies without a subset on disk are left out."""
    from clipsift.world.generate import load_ground_truth

    gt = load_ground_truth(compare.world)
    keys = formats.uids_to_u8u8(gt.column("uid").to_pylist())
    order = np.argsort(keys)
    out = {}
    for s in strategies:
        per_seed = []
        for p in (compare.subset_path(s, sc) for sc in _scorer_seeds(compare, s)):
            if not p.is_file():
                continue
            uids, n = np.unique(np.load(p), return_counts=True)
            at = order[np.searchsorted(keys[order], uids)]
            hit = keys[at] == uids
            draws = np.zeros(len(keys))
            draws[at[hit]] = n[hit]
            per_seed.append(draws)
        if per_seed:
            out[s.name] = per_seed
    return gt, out


def noise_kept(gt, drawn: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per strategy, the fraction of each planted noise kind whose uid is in the subset (world only);
    a learned strategy's is the mean over its scorer seeds' subsets."""
    kinds = np.array(gt.column("noise").to_pylist())
    out = {}
    for name, per_seed in drawn.items():
        inside = np.mean([d > 0 for d in per_seed], axis=0)
        out[name] = {k: float(inside[kinds == k].mean()) for k in sorted(set(kinds))}
    return out


def content_kept(gt, drawn: dict[str, list[np.ndarray]]) -> dict[str, dict[str, float]]:
    """What each subset trains on, by the world's ground truth, counted per draw (repeats count, as
    training sees them; a learned strategy's mean over its scorer seeds), with the pool as a
    reference row: the share of off-task pairs, and among shape pairs the share of outline drawings
    (the shift task's style), of three-object scenes (counting's hardest class) and the ratio of the
    commonest to the rarest shape (1 = balanced; the pool's long tail is Zipf)."""
    family, style = np.array(gt.column("family").to_pylist()), np.array(gt.column("style").to_pylist())
    count, shape = np.array(gt.column("count").to_pylist()), np.array(gt.column("shape").to_pylist())
    is_shape = family == "shape"
    shapes = sorted(set(shape[is_shape]))

    def composition(draws: np.ndarray) -> dict[str, float]:
        per_shape = np.array([draws[is_shape & (shape == k)].sum() for k in shapes], dtype=float)
        n_shape = max(draws[is_shape].sum(), 1)
        return {"off_task": float(draws[~is_shape].sum() / max(draws.sum(), 1)),
                "outline": float(draws[is_shape & (style == "outline")].sum() / n_shape),
                "three_objects": float(draws[is_shape & (count == 3)].sum() / n_shape),
                # None: some shape never drawn (no finite ratio; JSON has no infinity)
                "shape_max_over_min": float(per_shape.max() / per_shape.min()) if per_shape.min() > 0 else None}

    out = {"(pool)": composition(np.ones(len(is_shape)))}
    for name, per_seed in drawn.items():
        rows = [composition(d) for d in per_seed]
        out[name] = {k: None if any(r[k] is None for r in rows) else float(np.mean([r[k] for r in rows]))
                     for k in rows[0]}
    return out


def score_by_noise(compare, columns: list[str], scorer_seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Score values per planted noise kind, for each score column this run has computed (none is
    computed here: the report only reads what the strategies produced); learned scores of one seed."""
    import pyarrow.parquet as pq

    from clipsift.compare.config import SEEDED_SCORES
    from clipsift.world.generate import load_ground_truth

    gt = load_ground_truth(compare.world)
    kind_of = dict(zip(gt.column("uid").to_pylist(), gt.column("noise").to_pylist()))
    out = {}
    for col in columns:
        folder = (compare.learned_dir(SEEDED_SCORES[col], scorer_seed) / "scores" if col in SEEDED_SCORES
                  else compare.out / "pipeline" / "metadata")
        files = [f for f in sorted(folder.glob("*.parquet")) if col in pq.read_schema(f).names]
        by: dict[str, list[float]] = {}
        for f in files:
            t = pq.read_table(f, columns=["uid", col])
            for uid, v in zip(t.column("uid").to_pylist(), t.column(col).to_pylist()):
                if v is not None and uid in kind_of:
                    by.setdefault(kind_of[uid], []).append(v)
        if by:
            out[col] = {k: np.array(v) for k, v in by.items()}
    return out


def mixer_weights(compare) -> dict[int, dict[str, float]]:
    """M-FLYT's learned weights per scorer seed that ran."""
    out = {}
    for stats in sorted((compare.out / "scores" / "mflyt").glob("seed*/stats.json")):
        weights = read_json(stats).get("mixer_weights")
        if weights:
            out[int(stats.parent.name[len("seed"):])] = weights
    return dict(sorted(out.items()))


def write_report(compare, strategies, results: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = compare.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(strategies, results)
    overlap = subset_overlap(compare, strategies)
    write_json(out / "results.json", {"rows": rows, "runs": results, "subset_overlap": overlap})
    atomic_write_text(out / "results.md", markdown_table(rows) + "\n" + verdict(rows) + "\n")
    atomic_write_text(out / "results.csv", csv_table(rows))
    figures = []
    order = sorted(rows, key=lambda r: -r["average"]["mean"])

    if order:  # average with error bars
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(order) + 1.5))
        names = [r["strategy"] for r in order][::-1]
        means = [100 * r["average"]["mean"] for r in order][::-1]
        stds = [100 * r["average"]["std"] for r in order][::-1]
        ax.barh(names, means, xerr=stds, color="#4C72B0", capsize=3)
        ax.set_xlabel("average zero-shot main metric (%)")
        ax.set_title("Average over tasks at fixed compute (error bars: std over seeds;\n"
                     "a learned score's seeds are different scorers too)", fontsize=9)
        figures.append(_save(fig, out / "average.png", "Average per strategy"))

        tasks = list(order[0]["tasks"])
        fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(tasks) * len(order) / 4), 4.5))
        width = 0.8 / len(order)
        for i, r in enumerate(order):
            ax.bar(np.arange(len(tasks)) + i * width, [100 * r["tasks"][t]["mean"] for t in tasks], width,
                   yerr=[100 * r["tasks"][t]["std"] for t in tasks], label=r["strategy"], capsize=2)
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
        ax.set_ylabel("main metric (%)")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("Per-task results")
        figures.append(_save(fig, out / "per_task.png", "Per-task results"))

    gt, drawn = subset_draws(compare, strategies)
    kept = noise_kept(gt, drawn)
    if kept:
        kinds = sorted({k for v in kept.values() for k in v})
        names = [r["strategy"] for r in order if r["strategy"] in kept]
        grid = np.array([[kept[n][k] for k in kinds] for n in names])
        fig, ax = plt.subplots(figsize=(1.0 * len(kinds) + 3, 0.4 * len(names) + 1.5))
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(kinds)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.5 else "black")
        fig.colorbar(im, ax=ax, label="fraction kept")
        ax.set_title("Fraction of each planted noise kind kept (world ground truth)")
        figures.append(_save(fig, out / "noise_kept.png", "Planted noise kept by each strategy"))
        write_json(out / "noise_kept.json", kept)
    content = content_kept(gt, drawn) if kept else {}
    if content:
        write_json(out / "content_kept.json", content)

    cols = ["clip_b32_similarity_score", "clip_l14_similarity_score", "flyt_score", "mflyt_score"]
    first = min((sc for s in strategies for sc in _scorer_seeds(compare, s) if sc is not None), default=0)
    dists = score_by_noise(compare, cols, first)
    if dists:
        fig, axes = plt.subplots(1, len(dists), figsize=(4.2 * len(dists), 3.8), squeeze=False)
        for ax, (col, by) in zip(axes[0], dists.items()):
            kinds = sorted(by)
            ax.boxplot([by[k] for k in kinds], showfliers=False)
            ax.set_xticks(range(1, len(kinds) + 1), kinds, rotation=45, ha="right", fontsize=7)
            ax.set_title(col, fontsize=9)
        fig.suptitle(f"Score distributions per planted noise kind (learned scores: scorer seed {first})")
        figures.append(_save(fig, out / "scores_by_noise.png", "Score distributions per noise kind"))

    hists = {}
    for s in strategies:  # the first scorer seed's subset
        stats_path = compare.subset_path(s, _scorer_seeds(compare, s)[0]).with_name("sample_stats.json")
        if stats_path.is_file() and read_json(stats_path)["method"] in ("scs", "hcs"):
            hists[s.name] = {int(k): v for k, v in read_json(stats_path)["repetition_histogram"].items()}
    if hists:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, h in hists.items():
            ks = sorted(h)
            ax.plot(ks, [h[k] for k in ks], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("times an example is repeated")
        ax.set_ylabel("examples")
        ax.legend()
        ax.set_title("Soft Cap Sampling: repetition histogram")
        figures.append(_save(fig, out / "scs_repetitions.png", "SCS repetition histogram"))

    weights = mixer_weights(compare)
    if weights:
        names = list(next(iter(weights.values())))
        grid = np.array([[w.get(n, np.nan) for n in names] for w in weights.values()])
        fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
        ax.barh(names, np.nanmean(grid, axis=0), xerr=np.nanstd(grid, axis=0) if len(grid) > 1 else None,
                color="#DD8452", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"M-FLYT learned weights (standardised inputs; mean over scorer seeds {list(weights)})",
                     fontsize=9)
        figures.append(_save(fig, out / "mflyt_weights.png", "M-FLYT weights"))

    page = ["# clipsift compare report", "",
            f"World: `{compare.world}` · scale: `{compare.cfg.scale}` {' '.join(compare.cfg.scale_overrides)} · "
            f"seeds: {sorted({seed for r in rows for seed in r['seeds']})} (each strategy's in the table)", "",
            "Main metric per task (acc1, or mean recall@1 for retrieval), in %; mean ± std over seeds.", "",
            markdown_table(rows), "", f"**Spread vs. differences.** {verdict(rows)}"]
    if kept:
        kinds = sorted({k for v in kept.values() for k in v})
        page += ["", "## Planted noise kept", "", "| strategy | " + " | ".join(kinds) + " |",
                 "|" + "---|" * (len(kinds) + 1)]
        page += [f"| {n} | " + " | ".join(f"{kept[n][k]:.2f}" for k in kinds) + " |" for n in kept]
    if content:
        page += ["", "## What the subsets train on", "",
                 "Per draw (repeats count), by the world's ground truth: the share of off-task pairs; among "
                 "shape pairs the share of outline drawings and of three-object scenes, and the commonest "
                 "shape's draws over the rarest's.", "",
                 "| strategy | off-task | outline | three objects | commonest / rarest shape |", "|---|---|---|---|---|"]
        ratio = lambda r: "—" if r is None else f"{r:.1f}"  # noqa: E731
        page += [f"| {n} | {c['off_task']:.3f} | {c['outline']:.3f} | {c['three_objects']:.3f} | "
                 f"{ratio(c['shape_max_over_min'])} |" for n, c in content.items()]
    if overlap:
        page += ["", "## Subset stability across scorer seeds", "",
                 "Jaccard overlap of each learned strategy's subsets, one per scorer seed: for a top-k the "
                 "share of its k examples the two seeds agree on; for a sampler the multiset version (Σ min / "
                 "Σ max of each example's draws). 1 = the same subset.", "",
                 "| strategy | scorer seeds | unique per seed | Jaccard (pairs) | mean |", "|---|---|---|---|---|"]
        page += [f"| {n} | {o['scorer_seeds']} | {', '.join(str(u) for u in o['unique'].values())} | "
                 f"{', '.join(f'{k}: {v:.2f}' for k, v in o['jaccard'].items())} | {o['mean']:.2f} |"
                 for n, o in overlap.items()]
    if weights:
        page += ["", "## M-FLYT weights", "", "| input | " + " | ".join(f"scorer seed {k}" for k in weights) + " |",
                 "|---|" + "---|" * len(weights)]
        page += [f"| `{n}` | " + " | ".join(f"{w.get(n, float('nan')):+.3f}" for w in weights.values()) + " |"
                 for n in next(iter(weights.values()))]
    page += ["", "## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for name, title in figures]
    atomic_write_text(out / "report.md", "\n".join(page) + "\n")
    return out


def _save(fig, path: Path, title: str) -> tuple[str, str]:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name, title
