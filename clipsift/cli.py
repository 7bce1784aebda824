"""`clipsift <command>`: one thin entry point. Each command parses its config and calls one function.

Commands live in their own packages (world/, pipeline/, filters/, training/, eval/); this module
only knows their names and one-line help, and imports a command's module when it runs, so
`clipsift --help` is instant. A command module provides:

    CONFIG: the config dataclass          GROUP: the configs/<group>/ folder of its presets
    HELP:   a paragraph for --help        main(cfg, args) -> int | None: does the work
    add_arguments(parser) (optional):     extra flags, read back through `cfg` or `args`
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from clipsift import config
from clipsift.runtime import keep_freed_memory

# name -> (module, one-line summary). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("clipsift.world.cli", "generate the embedded synthetic benchmark world (pool, tasks, ground truth)"),
    "embed": ("clipsift.pipeline.cli", "Ray pipeline: img2dataset shards -> embeddings + score columns, DataComp layout"),
    "score": ("clipsift.pipeline.score_cli", "score heads over DataComp metadata (parquet + npz embeddings), no images"),
    "filter": ("clipsift.filters.filter_cli", "DataComp baselines, SemDeDup, NormSim over pool metadata -> a subset file"),
    "sample": ("clipsift.filters.sample_cli", "one score column -> a subset: Soft Cap Sampling, hard cap, top fraction, threshold"),
    "flyt": ("clipsift.training.flyt.cli", "train FLYT's learned data scorer (hypergradient through a reference CLIP) -> flyt_score"),
    "mflyt": ("clipsift.training.flyt.mflyt_cli", "M-FLYT: learn a linear mix of score columns with the FLYT loop -> mflyt_score"),
    "subset": ("clipsift.filters.subset_cli", "inspect, validate and convert DataComp subset files (.npy <-> hex uids)"),
    "reshard": ("clipsift.filters.reshard_cli", "pool shards + a subset -> new shards of just that subset (repeats kept)"),
    "train": ("clipsift.training.cli", "fixed-compute CLIP training on shards (+ a subset file) -> open_clip checkpoint"),
    "eval": ("clipsift.eval.cli", "zero-shot evaluation of a CLIP on a DataComp-style task list"),
    "compare": ("clipsift.compare.cli", "the main job: strategies x (subset -> fixed-compute training -> eval) -> table, plots, report"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipsift",
        description="DataComp-style data filtering for CLIP pretraining. Run `clipsift <command> --help`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()),
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="command")
    return p


def add_config_arguments(parser: argparse.ArgumentParser, group: str) -> None:
    presets = sorted(p.stem for p in (config.CONFIG_DIR / group).glob("*.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override any config field, e.g. seed=3 or train.lr=1e-3")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("-c", "--config", help="YAML config file")
    src.add_argument("-p", "--preset", help=f"named config under configs/{group}/ ({', '.join(presets) or 'none'})")


def resolve_config(cls: type, group: str, args: argparse.Namespace) -> Any:
    path = config.preset_path(group, args.preset) if args.preset else args.config
    return config.load(cls, path, args.overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        _parser().parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    keep_freed_memory()
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"clipsift {name}", description=module.HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, module.GROUP)
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        cfg = resolve_config(module.CONFIG, module.GROUP, args)
    except config.ConfigError as e:
        parser.error(str(e))
    return int(module.main(cfg, args) or 0)


if __name__ == "__main__":
    sys.exit(main())
