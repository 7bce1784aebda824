"""`clipsift compare`: which data makes the better CLIP at fixed compute?

    world ─► reference CLIPs ─► pipeline (embeddings + CLIP scores) ─► downstream embeddings
          ─► extra scores (NormSim, negCLIPLoss, DFN-style CLIP score, linear classifier, FLYT,
             M-FLYT; only when a strategy or the M-FLYT mix uses them)
          ─► per strategy: subset ─► per seed: train (fixed compute) ─► eval ─► result.json
          ─► table, plots, report

A strategy sampling by a learned score (flyt_score, mflyt_score) trains its scorer once per seed
(scorer seed = training seed, or the strategy's scorer_seeds): scorers under out/scores/<kind>/
seed<s>/, subsets under out/subsets/<name>/scorer_seed<s>/, runs under out/runs/<name>/
seed<t>_scorer<s>/, so the spread over its seeds holds the scorer's variance too.

Shared work is computed once and cached under `out/`: each step is resumable on its own (the
world, reference models, pipeline, filters and training all skip or resume finished work), and a
strategy × seed whose result.json exists is not run again, so a killed compare resumes where it
stopped.

An extra score column lives in its own uid-keyed folder (score_folder): a sampler or the M-FLYT mix
reads it there; a filter strategy naming it (e.g. clip_score with column: negclip_score) runs over
a copy of the pool metadata with the column joined in (out/pipeline_joined/<columns>/).
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipsift import config, formats
from clipsift.compare.config import SEEDED_SCORES, CompareConfig, StrategySpec, filter_columns
from clipsift.runlog import Timer, atomic_path, read_json, write_json

log = logging.getLogger("clipsift.compare")

# Score columns beyond the pipeline's, by the step that computes them (Compare._<step>).
LEARNED = {**SEEDED_SCORES, "normsim_score": "normsim", "negclip_score": "negclip",
           "clip_dfn_similarity_score": "dfn", "linear_classifier_score": "linear_classifier"}


def _check_saved_scorer(run: Path, kind: str, cfg) -> None:
    """A scorer saved before a key of EARLIER_DEFAULTS existed ran with that key's earlier value;
    reusing it as if it had a different current value would be silently wrong."""
    import yaml

    from clipsift.training.config import flat_config
    from clipsift.training.flyt.config import EARLIER_DEFAULTS

    saved = run / "config.yaml"
    if not saved.is_file():
        return
    before, now = flat_config(yaml.safe_load(saved.read_text()) or {}), flat_config(config.to_dict(cfg))
    for key, earlier in EARLIER_DEFAULTS.items():
        if key not in before and now[key] != earlier:
            raise config.ConfigError(
                f"{run}: trained before {key} existed (as with {key}={earlier}; now {now[key]}): delete {run} to "
                f"retrain, or keep it by adding \"{key}={earlier}\" to learned.{kind}_overrides")


class Compare:
    """One compare run: resolves shared inputs lazily, each once."""

    def __init__(self, cfg: CompareConfig, echo: Callable[[str], None] = print):
        self.cfg, self.echo = cfg, echo
        self.out = Path(cfg.out)
        self.timer = Timer()
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------ shared inputs
    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self.echo(f"[compare] {name} ...")
            t0 = time.perf_counter()
            with self.timer(name):
                self._cache[name] = fn()
            self.echo(f"[compare] {name} done in {time.perf_counter() - t0:.0f} s")
        return self._cache[name]

    @property
    def world(self) -> Path:
        def make() -> Path:
            from clipsift.world.config import WorldConfig
            from clipsift.world.generate import generate_world

            given = Path(self.cfg.world)
            if (given / "world.yaml").is_file():
                return given
            cfg = config.load(WorldConfig, config.preset_path("world", self.cfg.world), [f"out={self.out / 'world'}"])
            return generate_world(cfg, progress=self.cfg.progress)

        return self.step("world", make)

    @property
    def references(self) -> dict[str, Any]:
        def make():
            from clipsift.training.reference import ensure_reference_models

            refs = ensure_reference_models(self.world, self.cfg.reference_overrides, progress=self.cfg.progress)
            return {r.name: r for r in refs}

        return self.step("reference models", make)

    @property
    def metadata(self) -> Path:
        """The pool's DataComp metadata with embeddings and both CLIP scores."""

        def make() -> Path:
            return self._embed("pool", "pipeline", self.reference_specs())

        return self.step("pipeline", make)

    def reference_specs(self) -> dict[str, Any]:
        from clipsift.eval.models import ModelSpec

        return {n: ModelSpec(r.arch, str(r.checkpoint)) for n, r in self.references.items()}

    def _embed(self, split: str, folder: str, models: dict[str, Any], heads: dict[str, Any] | None = None) -> Path:
        """The world's `split` shards through `models` into out/<folder> (resumes; default heads: the CLIP scores)."""
        from clipsift.pipeline.config import EmbedConfig
        from clipsift.pipeline.embed import run_embed

        extra = {} if heads is None else {"heads": heads}
        cfg = EmbedConfig(input=str(self.world / split / "shards"), out=str(self.out / folder), models=models,
                          progress=self.cfg.progress, **extra)
        run_embed(cfg, echo=self.echo)
        return self.out / folder / "metadata"

    @property
    def downstream(self) -> Path:
        """Embeddings of the tasks' training images (what image_based and NormSim compare with)."""

        def make() -> Path:
            from clipsift.eval.evaluate import embed_task_images
            from clipsift.eval.models import ModelSpec

            path = self.out / "downstream" / f"{self.cfg.downstream_model}_train.npy"
            if not path.is_file():
                ref = self.references[self.cfg.downstream_model]
                emb = embed_task_images(ModelSpec(ref.arch, str(ref.checkpoint)), self.world / "tasks.yaml")
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, emb.astype(np.float16))
            return path

        return self.step("downstream embeddings", make)

    def score_folder(self, column: str, scorer_seed: int = 0) -> Path:
        """The folder of parquets holding `column` (uid-keyed), computing a learned score if needed;
        a seeded score (flyt_score, mflyt_score) is the one its scorer learned with scorer_seed."""
        kind = LEARNED.get(column)
        if kind is None:
            return self.metadata
        if column not in SEEDED_SCORES:
            return self.step(f"{kind} scores", getattr(self, f"_{kind}"))
        return self.step(f"{kind} scores (scorer seed {scorer_seed})", lambda: getattr(self, f"_{kind}")(scorer_seed))

    def learned_dir(self, kind: str, scorer_seed: int) -> Path:
        """Where the FLYT/M-FLYT run of one scorer seed lives (run dir; its scores/ holds the column)."""
        return self.out / "scores" / kind / f"seed{scorer_seed}"

    def _pool_score(self, kind: str, args: Callable[[], dict[str, Any]],
                    embeddings: Callable[[], str] | None = None) -> Path:
        """A pool-level filter's score over the pool metadata into out/scores/<kind> (scores.parquet:
        uid + <kind>_score); args() is only evaluated when the score is computed."""
        from clipsift.filters.base import FilterSpec
        from clipsift.filters.filter_cli import DownstreamConfig, FilterRunConfig, run

        out = self.out / "scores" / kind
        if not (out / "stats.json").is_file():
            down = DownstreamConfig(embeddings=embeddings() if embeddings else "")
            run(FilterRunConfig(metadata=str(self.metadata), out=str(out), filter=FilterSpec(kind=kind, args=args()),
                                downstream=down), log=self.echo)
        return out

    def _normsim(self) -> Path:
        return self._pool_score("normsim", lambda: {"embedding": f"{self.cfg.downstream_model}_img", "fraction": 1.0},
                                embeddings=lambda: str(self.downstream))

    def _negclip(self) -> Path:
        """negCLIPLoss with the l14 reference as teacher: its own training batch and learned temperature."""
        from clipsift.training.reference import logit_scale, reference_config

        def args() -> dict[str, Any]:
            batch = reference_config(self.world, "l14", self.cfg.reference_overrides).batch_size
            return {"model": "l14", "batch_size": batch,
                    "logit_scale": logit_scale(self.references["l14"].checkpoint)}

        return self._pool_score("negclip", args)

    def _dfn(self) -> Path:
        """The DFN-style model's CLIP score: its own embed of the pool (the main pipeline's models,
        hence its fingerprint, stay as they are); the folder joins by uid."""
        from clipsift.eval.models import ModelSpec
        from clipsift.pipeline.heads import HeadSpec
        from clipsift.training.reference import ensure_dfn_model

        self.references  # the DFN-style model is fine-tuned from the trained b32
        dfn = ensure_dfn_model(self.world, self.cfg.dfn_overrides, progress=self.cfg.progress)
        return self._embed("pool", "pipeline_dfn", {"dfn": ModelSpec(dfn.arch, str(dfn.checkpoint))},
                           {"clip_dfn_similarity_score": HeadSpec("clip_score", "dfn")})

    def _linear_classifier(self) -> Path:
        """Logistic regression on l14 embeddings: the world's curated split (embedded with the pool's
        models) against random pool rows."""
        return self._pool_score("linear_classifier", lambda: {
            "positives": str(self._embed("curated", "pipeline_curated", self.reference_specs()))})

    def filter_metadata(self, spec: Any) -> Path:
        """The metadata a filter tree runs over: the pool's, with any extra score column it names joined in."""
        wanted = sorted(filter_columns(spec) & set(LEARNED))  # never a seeded score: CompareConfig refuses it
        if not wanted:
            return self.metadata
        return self.step(f"metadata + {', '.join(wanted)}", lambda: self._joined(wanted))

    def _joined(self, columns: list[str]) -> Path:
        """The pool metadata (parquets; the npz embeddings linked) with `columns` added by uid."""
        out = self.out / "pipeline_joined" / "+".join(columns)
        done = out / "done.json"
        sources = {c: sorted(self.score_folder(c).glob("*.parquet")) for c in columns}
        files = sorted(self.metadata.glob("*.parquet"))
        # what the copy was made from: a recomputed source (new files or mtimes) makes it stale
        made_from = {str(f): f.stat().st_mtime_ns for f in [*files, *(f for fs in sources.values() for f in fs)]}
        if done.is_file() and read_json(done) == made_from:
            return out
        values = {c: pa.concat_tables([pq.read_table(f, columns=["uid", c]) for f in fs]) for c, fs in sources.items()}
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            table = pq.read_table(f)
            for c, t in values.items():
                idx = pc.index_in(table.column("uid"), value_set=t.column("uid"))
                if idx.null_count:
                    raise ValueError(f"{sources[c][0].parent}: {idx.null_count} uids of {f} have no {c}; delete that folder "
                                     "to recompute it over the current pool")
                table = table.append_column(c, t.column(c).take(idx))
            with atomic_path(out / f.name) as tmp:
                pq.write_table(table, tmp)
            npz = f.with_suffix(".npz")
            link = out / npz.name
            if npz.is_file() and not link.exists():
                link.symlink_to(npz.resolve())
        write_json(done, made_from)
        return out

    def _learned(self, kind: str, scorer_seed: int, overrides: list[str], fill: Callable[[Any], None]) -> Path:
        """Train (or resume) one FLYT-loop scorer with seed scorer_seed and score the pool."""
        from clipsift.training.flyt.train import run

        out = self.learned_dir(kind, scorer_seed)
        if not (out / "stats.json").is_file() or not read_json(out / "stats.json").get("scored"):
            cfg = self.loop_config(kind, [f"world={self.world}", f"metadata={self.metadata}", f"out={out}",
                                          "resume=latest", f"decode_cache={self.out / 'decoded'}",
                                          f"progress={str(self.cfg.progress).lower()}", *overrides,
                                          f"seed={scorer_seed}"])  # last: the scorer seed is compare's to set
            fill(cfg)
            # the world's b32 stand-in, unless the overrides name another reference
            cfg.reference.pretrained = cfg.reference.pretrained or str(self.references["b32"].checkpoint)
            run(cfg)
        return out / "scores"

    def loop_config(self, kind: str, overrides: list[str]):
        """The FLYT (kind flyt) or M-FLYT (mflyt) loop config: compare's preset for it plus overrides."""
        from clipsift.training.flyt.config import FlytConfig, MFlytConfig

        preset = getattr(self.cfg.learned, f"{kind}_preset")
        return config.load({"flyt": FlytConfig, "mflyt": MFlytConfig}[kind], config.preset_path(kind, preset), overrides)

    def _check_learned_runs(self, plan: list[tuple[StrategySpec, int, int | None]]) -> None:
        """Before reusing anything of the plan's scorer seeds: no scorer saved before a default it
        ran without changed (see _check_saved_scorer)."""
        seeds = sorted({s for _, _, s in plan if s is not None})
        for kind in ("flyt", "mflyt") if seeds else ():
            cfg = self.loop_config(kind, list(getattr(self.cfg.learned, f"{kind}_overrides")))
            for scorer_seed in seeds:
                _check_saved_scorer(self.learned_dir(kind, scorer_seed), kind, cfg)

    def _flyt(self, scorer_seed: int) -> Path:
        return self._learned("flyt", scorer_seed, self.cfg.learned.flyt_overrides, lambda cfg: None)

    def _mflyt(self, scorer_seed: int) -> Path:
        columns = list(self.cfg.learned.mflyt_columns)
        extra = [str(self.score_folder(c, scorer_seed)) for c in columns if c in LEARNED and c != "mflyt_score"]

        def fill(cfg) -> None:
            cfg.mixer.columns = columns
            cfg.mixer.extra_metadata = extra

        return self._learned("mflyt", scorer_seed, self.cfg.learned.mflyt_overrides, fill)

    # ------------------------------------------------------------ strategies
    def plan(self, strategy: StrategySpec) -> list[tuple[int, int | None]]:
        """(training seed, scorer seed) of each run of the strategy; scorer seed None: no learned score."""
        seeds = strategy.seeds or self.cfg.seeds
        if not strategy.learned:
            return [(seed, None) for seed in seeds]
        return list(zip(seeds, strategy.scorer_seeds or seeds))

    def subset_path(self, strategy: StrategySpec, scorer_seed: int | None) -> Path:
        folder = self.out / "subsets" / strategy.name
        return (folder if scorer_seed is None else folder / f"scorer_seed{scorer_seed}") / "subset.npy"

    def subset(self, strategy: StrategySpec, scorer_seed: int | None = None) -> Path:
        """The strategy's DataComp subset file (cached; one per scorer seed for a learned score)."""
        path = self.subset_path(strategy, scorer_seed)
        if path.is_file():
            return path
        kept = self.kept(strategy)
        if strategy.sample is None:
            formats.write_subset(path, formats.u8u8_to_uids(kept))
        else:
            self._sample(strategy, kept, path, scorer_seed or 0)
        return path

    def kept(self, strategy: StrategySpec) -> np.ndarray | None:
        """The rows (u8,u8 uids) the strategy's filter keeps (cached; shared by its scorer seeds), or
        None without a filter."""
        if strategy.filter is None:
            return None
        from clipsift.filters.filter_cli import DownstreamConfig, FilterRunConfig, run

        ffolder = self.out / "subsets" / strategy.name / "filter"
        if not (ffolder / "stats.json").is_file():
            needs_down = _uses(strategy.filter, ("image_based_world", "normsim"))
            concepts = str(self.world) if _uses(strategy.filter, ("text_based_world",)) else ""
            down = DownstreamConfig(embeddings=str(self.downstream) if needs_down else "", concepts=concepts)
            run(FilterRunConfig(metadata=str(self.filter_metadata(strategy.filter)), out=str(ffolder),
                                filter=strategy.filter, downstream=down), log=self.echo)
        return np.load(ffolder / "subset.npy")

    def train_config(self, overrides: list[str] = ()) -> Any:
        from clipsift.training.config import TrainConfig

        return config.load(TrainConfig, config.preset_path("train", self.cfg.scale),
                           [*overrides, *self.cfg.scale_overrides])

    def _sample(self, strategy: StrategySpec, kept: np.ndarray | None, path: Path, scorer_seed: int) -> None:
        from clipsift.filters import sampling
        from clipsift.filters.sample_cli import metadata_files, read_scores, sample_counts, scs_round_size

        spec = strategy.sample
        assert spec is not None
        folder = self.score_folder(spec.score, scorer_seed)
        rows, uids, scores = read_scores(metadata_files(str(folder)), spec.score)
        uid_list = uids.to_numpy(zero_copy_only=False)
        if kept is not None:  # sample among the rows the filter kept
            mask = np.isin(formats.uids_to_u8u8(uid_list), kept)
            uid_list, scores = uid_list[mask], scores[mask]
        cfg = replace(spec, metadata=str(folder), out=str(path), progress=False)
        if cfg.method in ("scs", "hcs") and cfg.total == 0:
            cfg.total = self.train_config().samples_seen  # FLYT: the stream is the training run's samples seen
        if cfg.method == "scs":
            cfg.batch_size = scs_round_size(len(scores), cfg.batch_size)
        counts = sample_counts(scores, cfg)
        keep = np.flatnonzero(counts)
        sampling.write_counts_subset(path, uid_list[keep], counts[keep])
        write_json(path.with_name("sample_stats.json"), {
            "method": cfg.method, "score": cfg.score, "scorer_seed": scorer_seed if strategy.learned else None,
            "candidates": int(len(scores)), "rows": rows.as_dict(), "total": int(counts.sum()),
            "unique": int(len(keep)), "repetition_histogram": sampling.repetition_histogram(counts),
            "batch_size": cfg.batch_size})
        config.dump(cfg, path.with_name("sample_config.yaml"))

    def run_folder(self, strategy: StrategySpec, seed: int, scorer_seed: int | None) -> Path:
        name = f"seed{seed}" if scorer_seed is None else f"seed{seed}_scorer{scorer_seed}"
        return self.out / "runs" / strategy.name / name

    def train_and_eval(self, strategy: StrategySpec, seed: int, scorer_seed: int | None = None) -> dict[str, Any]:
        from clipsift.eval.evaluate import evaluate
        from clipsift.eval.models import ModelSpec
        from clipsift.training.loop import train

        run = self.run_folder(strategy, seed, scorer_seed)
        result_path = run / "result.json"
        if result_path.is_file():
            return read_json(result_path)
        subset = self.subset(strategy, scorer_seed)
        tcfg = self.train_config([f"out={run / 'train'}", f"seed={seed}", f"data.shards={self.world / 'pool' / 'shards'}",
                                  f"data.subset={subset}", f"data.decode_cache={self.out / 'decoded'}",
                                  "resume=latest", f"progress={str(self.cfg.progress).lower()}"])
        t0 = time.perf_counter()
        train(tcfg)
        train_s = time.perf_counter() - t0
        summary = evaluate(ModelSpec(tcfg.model, str(run / "train")), self.world / "tasks.yaml", run / "eval")
        arr = formats.read_subset(subset)
        result = {"strategy": strategy.name, "seed": seed, "scorer_seed": scorer_seed, "subset_size": int(len(arr)),
                  "unique": int(len(np.unique(arr))), "train_seconds": round(train_s, 1), "summary": summary}
        write_json(result_path, result)
        return result

    def run(self) -> list[dict[str, Any]]:
        from clipsift.compare.report import write_report

        self.out.mkdir(parents=True, exist_ok=True)
        config.dump(self.cfg, self.out / "config.yaml")
        strategies = [s for s in self.cfg.strategies if not self.cfg.only or s.name in self.cfg.only]
        plan = [(s, seed, scorer) for s in strategies for seed, scorer in self.plan(s)]
        self._check_learned_runs(plan)
        if self.cfg.workers > 1:
            with self.timer("parallel runs"):
                self._run_in_workers(plan)
        results = []
        for i, (strategy, seed, scorer) in enumerate(plan):
            which = f"seed {seed}" + ("" if scorer is None else f", scorer seed {scorer}")
            self.echo(f"[compare] run {i + 1}/{len(plan)}: {strategy.name} ({which})")
            with self.timer(f"strategy/{strategy.name}"):
                res = self.train_and_eval(strategy, seed, scorer)
            results.append(res)
            self.echo(f"[compare]   {strategy.name} {which}: average {res['summary']['average']:.4f}, "
                      f"{res['unique']} unique / {res['subset_size']} in subset")
        write_json(self.out / "stats.json", {"timings_s": self.timer.as_dict(), "runs": len(results)})
        write_report(self, strategies, results)
        return results

    def _run_in_workers(self, plan: list[tuple[StrategySpec, int, int | None]]) -> None:
        """Run the plan's unfinished runs in cfg.workers processes. Everything two jobs could share is
        made here first (world, references, pipeline, every filter's rows, fixed subsets, the mix's
        fixed inputs); a job is one fixed-subset run, or every run of one scorer seed (its FLYT and
        M-FLYT scorers, subsets and runs, in plan order), so no two processes write the same file.
        Each run writes its result.json as in one process; run() then reads them in plan order."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        todo = [(s, seed, sc) for s, seed, sc in plan if not (self.run_folder(s, seed, sc) / "result.json").is_file()]
        for strategy, _, scorer in todo:
            if scorer is None:
                self.subset(strategy)
            else:
                self.kept(strategy)  # its filter's rows: every scorer seed's subset samples among them
        if any(s.sample is not None and s.sample.score == "mflyt_score" for s, _, _ in todo):
            for column in self.cfg.learned.mflyt_columns:
                if column in LEARNED and column not in SEEDED_SCORES:
                    self.score_folder(column)
        jobs: dict[tuple, list[tuple[str, int, int | None]]] = {}
        for strategy, seed, scorer in todo:
            key = ("scorer seed", scorer) if scorer is not None else (strategy.name, seed)
            jobs.setdefault(key, []).append((strategy.name, seed, scorer))
        if not jobs:
            return
        workers = min(self.cfg.workers, len(jobs))
        self.echo(f"[compare] {len(todo)} runs in {len(jobs)} jobs over {workers} worker processes")
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked into a child
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            running = {pool.submit(_run_job, self.cfg, items): key for key, items in jobs.items()}
            for done, future in enumerate(as_completed(running), 1):
                future.result()  # a job's error stops the run here, as it would in one process
                self.echo(f"[compare] job {done}/{len(jobs)} done: {' '.join(map(str, running[future]))}")


def _run_job(cfg: CompareConfig, items: list[tuple[str, int, int | None]]) -> None:
    """A worker process's job: these (strategy, seed, scorer seed) runs, in order."""
    import multiprocessing

    # A spawned process inherits "spawn" as its start method; the training's DataLoader workers get
    # the platform's default, as in a process started on its own (their datasets need not pickle).
    multiprocessing.set_start_method(None, force=True)
    compare = Compare(replace(cfg, progress=False), echo=lambda _line: None)
    by_name = {s.name: s for s in cfg.strategies}
    for name, seed, scorer in items:
        compare.train_and_eval(by_name[name], seed, scorer)


def _uses(spec, kinds: tuple[str, ...]) -> bool:
    return spec.kind in kinds or any(_uses(child, kinds) for child in spec.of)
