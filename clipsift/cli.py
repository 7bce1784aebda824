"""`clipsift <command>`: one thin entry point. Each command parses its config and calls one function.

Commands live in their own packages (world/, pipeline/, filters/, training/, eval/); this module
only knows their names and one-line help, and imports a command's module when it runs, so
`clipsift --help` is instant. A command module provides:

    CONFIG: the config dataclass          GROUP: the configs/<group>/ folder of its presets
    HELP:   a paragraph for --help        main(cfg, args) -> int | None: does the work
    add_arguments(parser) (optional):     extra flags, read back through `cfg` or `args`

Errors: a command raises; it never prints its own errors. An exception of USER_ERRORS (bad input,
config or folder) or a missing/unreadable file is printed here as ONE line,
`clipsift <command>: error: <file or key>: <what is wrong and what to do>`, with exit code 2;
`clipsift --debug <command> ...` shows its traceback instead. Anything else is a bug and keeps its
traceback. `python -m clipsift` and the `clipsift` script both come through main().
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import Any

from clipsift import config, runlog
from clipsift.runtime import keep_freed_memory

# Exceptions that mean "fix the input": one line, exit 2. Named by import path, so checking one
# imports nothing (a class whose module was never imported cannot have been raised).
USER_ERRORS = (
    "clipsift.config.ConfigError",
    "clipsift.formats.FormatError",
    "clipsift.runlog.LockError",
    "clipsift.pipeline.output.OutputError",
    "clipsift.pipeline.encoders.PlanError",
    "clipsift.pipeline.heads.HeadError",
    "clipsift.pipeline.raysession.ResourceError",
    "clipsift.filters.base.FilterError",
    "clipsift.filters.reshard.ReshardError",
    "clipsift.eval.models.ModelError",
    "clipsift.eval.tasks.TaskError",
    "clipsift.training.checkpoint.CheckpointError",
)
# OSErrors that are about the user's paths (a full disk or a bug's bad path are not listed).
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)

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


class UsageError(Exception):
    """A command line argparse would reject (it would print usage and exit on its own)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through main's error path, not usage + exit
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="clipsift",
        description="DataComp-style data filtering for CLIP pretraining. Run `clipsift <command> --help`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()),
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (any position)")
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
    debug = "--debug" in argv  # global, in any position (no override or value is spelled so)
    argv = [a for a in argv if a != "--debug"]
    name = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        if name is None:
            _parser().parse_args(argv[:1] or ["--help"])
            return 2
        return _run(name, argv[1:])
    except Exception as e:
        message = user_error_message(e)
        if debug or message is None:
            raise
        print(f"{'clipsift ' + name if name else 'clipsift'}: error: {message}", file=sys.stderr)
        return 2


def _run(name: str, rest: list[str]) -> int:
    keep_freed_memory()
    module = importlib.import_module(COMMANDS[name][0])
    parser = _Parser(prog=f"clipsift {name}", description=module.HELP,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, module.GROUP)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(rest)
    cfg = resolve_config(module.CONFIG, module.GROUP, args)
    out = getattr(cfg, "out", "")
    # one run per output (torchrun's other ranks run inside rank 0's)
    lock = runlog.output_lock(out) if out and os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        return int(module.main(cfg, args) or 0)


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error, or None for an exception that is a bug."""
    ray_errors = _loaded(("ray.exceptions.RayTaskError",))
    if ray_errors and isinstance(e, ray_errors[0]) and isinstance(e.cause, BaseException):
        e = e.cause  # a worker's exception, as raised there (Ray's message holds a traceback)
    if isinstance(e, _PATH_ERRORS):
        text = f"{e.filename}: {e.strerror.lower()}" if e.filename and e.strerror else str(e)
    elif isinstance(e, UsageError) or any(isinstance(e, cls) for cls in _loaded(USER_ERRORS)):
        text = str(e)
    else:
        return None
    return " ".join(text.split()) or type(e).__name__  # one line, whatever the message held


def _loaded(paths: tuple[str, ...]) -> list[type]:
    out = []
    for path in paths:
        module, _, cls = path.rpartition(".")
        if module in sys.modules and hasattr(sys.modules[module], cls):
            out.append(getattr(sys.modules[module], cls))
    return out


if __name__ == "__main__":
    sys.exit(main())
