"""`clipsift compare`: which data makes the better CLIP at fixed compute?

    world ─► reference CLIPs ─► pipeline (embeddings + CLIP scores) ─► downstream embeddings
          ─► learned scores (NormSim, FLYT, M-FLYT; only when a strategy uses them)
          ─► per strategy: subset ─► per seed: train (fixed compute) ─► eval ─► result.json
          ─► table, plots, report

Shared work is computed once and cached under `out/`: each step is resumable on its own (the
world, reference models, pipeline, filters and training all skip or resume finished work), and a
strategy × seed whose result.json exists is not run again, so a killed compare resumes where it
stopped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clipsift import config, formats
from clipsift.compare.config import CompareConfig, StrategySpec
from clipsift.runlog import Timer, read_json, write_json

log = logging.getLogger("clipsift.compare")

LEARNED = {"flyt_score": "flyt", "mflyt_score": "mflyt", "normsim_score": "normsim"}


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
            from clipsift.eval.models import ModelSpec
            from clipsift.pipeline.config import EmbedConfig
            from clipsift.pipeline.embed import run_embed

            models = {n: ModelSpec(r.arch, str(r.checkpoint)) for n, r in self.references.items()}
            cfg = EmbedConfig(input=str(self.world / "pool" / "shards"), out=str(self.out / "pipeline"),
                              models=models, progress=self.cfg.progress)
            run_embed(cfg, echo=self.echo)
            return self.out / "pipeline" / "metadata"

        return self.step("pipeline", make)

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

    def score_folder(self, column: str) -> Path:
        """The folder of parquets holding `column` (uid-keyed), computing a learned score if needed."""
        kind = LEARNED.get(column)
        if kind is None:
            return self.metadata
        return self.step(f"{kind} scores", getattr(self, f"_{kind}"))

    def _normsim(self) -> Path:
        from clipsift.filters.base import FilterSpec
        from clipsift.filters.filter_cli import DownstreamConfig, FilterRunConfig, run

        out = self.out / "scores" / "normsim"
        if not (out / "stats.json").is_file():
            spec = FilterSpec(kind="normsim", args={"embedding": f"{self.cfg.downstream_model}_img", "fraction": 1.0})
            run(FilterRunConfig(metadata=str(self.metadata), out=str(out), filter=spec,
                                downstream=DownstreamConfig(embeddings=str(self.downstream))), log=self.echo)
        return out

    def _flyt(self) -> Path:
        from clipsift.training.flyt.config import FlytConfig
        from clipsift.training.flyt.train import run

        out = self.out / "scores" / "flyt"
        if not (out / "stats.json").is_file() or not read_json(out / "stats.json").get("scored"):
            cfg = config.load(FlytConfig, config.preset_path("flyt", self.cfg.learned.flyt_preset),
                              [f"world={self.world}", f"metadata={self.metadata}", f"out={out}", "resume=latest",
                               f"decode_cache={self.out / 'decoded'}",
                               f"progress={str(self.cfg.progress).lower()}", *self.cfg.learned.flyt_overrides])
            cfg.reference.pretrained = str(self.references["b32"].checkpoint)
            run(cfg)
        return out / "scores"

    def _mflyt(self) -> Path:
        from clipsift.training.flyt.config import MFlytConfig
        from clipsift.training.flyt.train import run

        out = self.out / "scores" / "mflyt"
        columns = list(self.cfg.learned.mflyt_columns)
        extra = [str(self.score_folder(c)) for c in columns if c in LEARNED and c != "mflyt_score"]
        if not (out / "stats.json").is_file() or not read_json(out / "stats.json").get("scored"):
            cfg = config.load(MFlytConfig, config.preset_path("mflyt", self.cfg.learned.mflyt_preset),
                              [f"world={self.world}", f"metadata={self.metadata}", f"out={out}", "resume=latest",
                               f"decode_cache={self.out / 'decoded'}",
                               f"progress={str(self.cfg.progress).lower()}", *self.cfg.learned.mflyt_overrides])
            cfg.mixer.columns = columns
            cfg.mixer.extra_metadata = extra
            cfg.reference.pretrained = str(self.references["b32"].checkpoint)
            run(cfg)
        return out / "scores"

    # ------------------------------------------------------------ strategies
    def subset(self, strategy: StrategySpec) -> Path:
        """The strategy's DataComp subset file (cached)."""
        folder = self.out / "subsets" / strategy.name
        path = folder / "subset.npy"
        if path.is_file():
            return path
        kept: np.ndarray | None = None
        if strategy.filter is not None:
            from clipsift.filters.filter_cli import DownstreamConfig, FilterRunConfig, run

            ffolder = folder / "filter"
            if not (ffolder / "stats.json").is_file():
                needs_down = _uses(strategy.filter, ("image_based", "normsim"))
                concepts = str(self.world) if _uses(strategy.filter, ("text_based",)) else ""
                down = DownstreamConfig(embeddings=str(self.downstream) if needs_down else "", concepts=concepts)
                run(FilterRunConfig(metadata=str(self.metadata), out=str(ffolder), filter=strategy.filter,
                                    downstream=down), log=self.echo)
            kept = np.load(ffolder / "subset.npy")
            if strategy.sample is None:
                formats.write_subset(path, formats.u8u8_to_uids(kept))
                return path
        self._sample(strategy, kept, path)
        return path

    def _sample(self, strategy: StrategySpec, kept: np.ndarray | None, path: Path) -> None:
        import pyarrow as pa

        from clipsift.filters import sampling
        from clipsift.filters.sample_cli import metadata_files, read_scores, sample_counts

        spec = strategy.sample
        assert spec is not None
        rows, uids, scores = read_scores(metadata_files(str(self.score_folder(spec.score))), spec.score)
        uid_list = uids.to_numpy(zero_copy_only=False)
        if kept is not None:  # sample among the rows the filter kept
            mask = np.isin(formats.uids_to_u8u8(uid_list), kept)
            uid_list, scores = uid_list[mask], scores[mask]
        cfg = replace(spec, metadata=str(self.score_folder(spec.score)), out=str(path), progress=False)
        if cfg.method == "scs" and cfg.batch_size > len(scores) // 10:
            cfg.batch_size = max(1, len(scores) // 100)  # ~100 rounds, as FLYT's 100k draws of 128M x 10
        counts = sample_counts(scores, cfg)
        keep = np.flatnonzero(counts)
        sampling.write_counts_subset(path, uid_list[keep], counts[keep])
        write_json(path.with_name("sample_stats.json"), {
            "method": cfg.method, "score": cfg.score, "candidates": int(len(scores)), "rows": rows.as_dict(),
            "total": int(counts.sum()), "unique": int(len(keep)),
            "repetition_histogram": sampling.repetition_histogram(counts), "batch_size": cfg.batch_size})
        config.dump(cfg, path.with_name("sample_config.yaml"))

    def train_and_eval(self, strategy: StrategySpec, seed: int) -> dict[str, Any]:
        from clipsift.eval.evaluate import evaluate
        from clipsift.eval.models import ModelSpec
        from clipsift.training.config import TrainConfig
        from clipsift.training.loop import train

        run = self.out / "runs" / strategy.name / f"seed{seed}"
        result_path = run / "result.json"
        if result_path.is_file():
            return read_json(result_path)
        subset = self.subset(strategy)
        tcfg = config.load(TrainConfig, config.preset_path("train", self.cfg.scale),
                           [f"out={run / 'train'}", f"seed={seed}", f"data.shards={self.world / 'pool' / 'shards'}",
                            f"data.subset={subset}", f"data.decode_cache={self.out / 'decoded'}", "resume=latest",
                            f"progress={str(self.cfg.progress).lower()}",
                            *self.cfg.scale_overrides])
        t0 = time.perf_counter()
        train(tcfg)
        train_s = time.perf_counter() - t0
        summary = evaluate(ModelSpec(tcfg.model, str(run / "train")), self.world / "tasks.yaml", run / "eval")
        arr = formats.read_subset(subset)
        result = {"strategy": strategy.name, "seed": seed, "subset_size": int(len(arr)),
                  "unique": int(len(np.unique(arr))), "train_seconds": round(train_s, 1), "summary": summary}
        write_json(result_path, result)
        return result

    def run(self) -> list[dict[str, Any]]:
        from clipsift.compare.report import write_report

        self.out.mkdir(parents=True, exist_ok=True)
        config.dump(self.cfg, self.out / "config.yaml")
        strategies = [s for s in self.cfg.strategies if not self.cfg.only or s.name in self.cfg.only]
        plan = [(s, seed) for s in strategies for seed in (s.seeds or self.cfg.seeds)]
        results = []
        for i, (strategy, seed) in enumerate(plan):
            self.echo(f"[compare] run {i + 1}/{len(plan)}: {strategy.name} (seed {seed})")
            with self.timer(f"strategy/{strategy.name}"):
                res = self.train_and_eval(strategy, seed)
            results.append(res)
            self.echo(f"[compare]   {strategy.name} seed {seed}: average {res['summary']['average']:.4f}, "
                      f"{res['unique']} unique / {res['subset_size']} in subset")
        write_json(self.out / "stats.json", {"timings_s": self.timer.as_dict(), "runs": len(results)})
        write_report(self, strategies, results)
        return results


def _uses(spec, kinds: tuple[str, ...]) -> bool:
    return spec.kind in kinds or any(_uses(child, kinds) for child in spec.of)
