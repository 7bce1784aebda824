"""Loading an open_clip model for inference, shared by eval, the pipeline and training.

`load_model(arch, pretrained, device)` returns (model, preprocess, tokenizer). `pretrained` says
where the weights come from:

    ""                      random initialisation (seed torch first for a reproducible model)
    "datacomp_s128m_b4k"    an open_clip pretrained tag for `arch` (downloads unless cached)
    "hf-hub:org/repo"       an open_clip model on the Hugging Face hub (`arch` is not used)
    "path/to/ckpt.pt"       a local checkpoint: open_clip training format ({"state_dict": ...},
                            "module." prefixes allowed), a bare state_dict, or .safetensors
    "path/to/run"           a training run folder: its checkpoints/epoch_latest.pt

The project's own small architectures (training/model_configs/*.json, e.g. world-rn-s) are
registered with open_clip on first use, so `arch` may name them without importing training.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

log = logging.getLogger(__name__)

RUN_CHECKPOINT = Path("checkpoints") / "epoch_latest.pt"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class ModelSpec:
    """Which model to evaluate: an open_clip architecture name and where its weights come from."""

    arch: str = "world-rn-s"
    pretrained: str = ""  # "" (random init), an open_clip tag, "hf-hub:org/repo", a checkpoint or a run folder


class ModelError(ValueError):
    """An architecture open_clip does not know, or a `pretrained` that names no weights."""


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, H, W) tensor, the eval transform
    tokenizer: Callable[[list[str]], torch.Tensor]


def project_model_configs() -> Path:
    """training/model_configs/: the JSON architectures clipsift ships (world-rn-s, ...)."""
    import clipsift.training

    return Path(clipsift.training.__file__).resolve().parent / "model_configs"


def ensure_arch(arch: str) -> None:
    """Make `arch` known to open_clip, registering the project's configs if needed; else a clear error."""
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")) or arch in open_clip.list_models():
        return
    folder = project_model_configs()
    if folder.is_dir():
        open_clip.add_model_config(folder)
    if arch not in open_clip.list_models():
        raise ModelError(f"unknown model architecture {arch!r}: not an open_clip model and not in {folder}")


@lru_cache(maxsize=None)
def tokenizer(arch: str):
    """open_clip's tokenizer for `arch` (the project's configs registered), the one every stage uses.

    Its cleaning runs ftfy and html.unescape on every caption, ~40% of a training data worker's CPU
    on small images. Both return printable ASCII without '&' unchanged, so such captions skip them;
    every other caption, and tokenizers of other kinds, go the full way (tested to give equal tokens).
    """
    import open_clip

    ensure_arch(arch)
    tok = open_clip.get_tokenizer(arch)
    rest = _clean_after_ftfy(getattr(tok, "clean_fn", None))
    if rest is not None:
        full = tok.clean_fn

        def clean(text: str) -> str:
            if text.isascii() and text.isprintable() and "&" not in text:
                return rest(text.strip())
            return full(text)

        tok.clean_fn = clean
    return tok


def _clean_after_ftfy(clean_fn):
    """What open_clip's clean function `clean_fn` does after ftfy/html.unescape/strip, if known."""
    from open_clip import tokenizer as T

    known = {getattr(T, "_clean_lower", None): lambda t: T.whitespace_clean(t).lower(),
             getattr(T, "_clean_whitespace", None): getattr(T, "whitespace_clean", None),
             getattr(T, "_clean_canonicalize", None): getattr(T, "canonicalize_text", None)}
    known.pop(None, None)
    return known.get(clean_fn) if clean_fn is not None else None


def resolve_pretrained(arch: str, pretrained: str) -> str:
    """The weights source as open_clip will take it: a tag, an hf-hub id, a checkpoint file or ""."""
    if not pretrained or pretrained.startswith(("hf-hub:", "local-dir:")):
        return pretrained
    path = Path(pretrained)
    if path.is_dir():
        ckpt = path / RUN_CHECKPOINT
        if not ckpt.is_file():
            raise FileNotFoundError(f"{path} is a folder without {RUN_CHECKPOINT}; pass a checkpoint file or a run folder")
        return str(ckpt)
    if path.is_file():
        return str(path)
    import open_clip

    if open_clip.get_pretrained_cfg(arch, pretrained):
        return pretrained
    if path.suffix in _CHECKPOINT_SUFFIXES or "/" in pretrained:
        raise FileNotFoundError(f"checkpoint {pretrained} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    raise ModelError(f"pretrained {pretrained!r} is neither a file, a run folder, 'hf-hub:...', nor a tag of "
                     f"{arch} (tags: {', '.join(tags) or 'none'})")


def load_model(arch: str, pretrained: str = "", device: str | torch.device = "cpu") -> LoadedModel:
    """An open_clip model in eval mode on `device` (fp32 weights), its eval transform and tokenizer."""
    import open_clip

    source = resolve_pretrained(arch, pretrained)
    hub = source.startswith(("hf-hub:", "local-dir:"))
    name = source if hub else arch
    ensure_arch(name)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if hub else (source or None), device=device
        )
    except (RuntimeError, AssertionError, KeyError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
        # how torch and open_clip fail on a damaged file or on weights of another architecture
        if hub or not Path(source).is_file() or isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        from clipsift.training.checkpoint import explain_load_failure

        raise explain_load_failure(source, arch, e) from None
    model.eval()
    return LoadedModel(model, preprocess, tokenizer(name))


def weights_id(arch: str, pretrained: str, seed: int) -> str:
    """A string that changes whenever the weights would: the content hash of a checkpoint file,
    the tag or hub id otherwise, and the seed for a random initialisation."""
    source = resolve_pretrained(arch, pretrained)
    if not source:
        return f"{arch}|random(seed={seed})"
    if Path(source).is_file():
        return f"{arch}|sha256:{file_sha256(source)}"
    return f"{arch}|{source}"


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
