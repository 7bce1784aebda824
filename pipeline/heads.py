"""Score heads: per-example scores computed from embeddings in the pipeline's model stage.

A head is built from a HeadSpec and has
    needs:     the inputs it reads, by name: embeddings ("b32_img", "b32_txt", ...), score columns
               of heads listed before it, or (metadata mode) numeric columns of the input parquet;
    to(dev):   moves any weights to the model stage's device (returns the head);
    __call__:  {name: float32 tensor (n, ...)} -> float32 tensor (n,), one score per example.
A learned head (FLYT, M-FLYT) is simply a torch.nn.Module with `needs`: it loads its weights from
`spec.checkpoint` in its constructor, and nn.Module already provides `to`.

Heads are looked up by `kind` in HEAD_KINDS, which maps a name to "module:attribute" and is
imported lazily (like cli.COMMANDS), so Ray workers find heads registered in other packages.
`kind` may also be a "module:attribute" path itself, for heads that live outside clipsift.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch


@dataclass
class HeadSpec:
    """One score column: which head computes it and from what."""

    kind: str = "clip_score"  # a HEAD_KINDS name, or "package.module:Factory"
    model: str = ""  # the embedding model a single-model head reads (clip_score: <model>_img, <model>_txt)
    checkpoint: str = ""  # weights of a learned head
    options: dict[str, Any] = field(default_factory=dict)  # anything else the head takes


class Head(Protocol):
    needs: tuple[str, ...]

    def to(self, device: torch.device | str) -> "Head": ...

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...


# kind -> "module:factory"; a factory takes (column, HeadSpec) and returns a Head.
HEAD_KINDS: dict[str, str] = {
    "clip_score": "clipsift.pipeline.heads:ClipScore",
    "flyt": "clipsift.training.flyt.heads:ScorerHead",  # checkpoint: a FLYT run's scorer.pt (or its folder)
    "mflyt": "clipsift.training.flyt.heads:ScorerHead",  # checkpoint: an M-FLYT run's scorer.pt
}


class HeadError(ValueError):
    """A head that cannot be built, or whose inputs do not exist."""


class ClipScore:
    """Cosine similarity of a model's image and text embeddings (DataComp's clip_*_similarity_score)."""

    def __init__(self, column: str, spec: HeadSpec):
        if not spec.model:
            raise HeadError(f"head {column}: clip_score needs `model` (the embedding model to score with)")
        if spec.checkpoint or spec.options:
            raise HeadError(f"head {column}: clip_score takes no checkpoint or options")
        self.needs = (f"{spec.model}_img", f"{spec.model}_txt")

    def to(self, device: torch.device | str) -> "ClipScore":
        return self

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        img, txt = (inputs[n].float() for n in self.needs)
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def head_factory(kind: str) -> Callable[[str, HeadSpec], Head]:
    target = HEAD_KINDS.get(kind, kind)
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise HeadError(f"unknown head kind {kind!r}; known: {', '.join(sorted(HEAD_KINDS))} "
                        f"(or give 'package.module:Factory')")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise HeadError(f"head kind {kind!r}: cannot import {target} ({e})") from None


def build_heads(specs: dict[str, HeadSpec], available: set[str] | list[str]) -> dict[str, Head]:
    """Build every head in config order, checking that each one's inputs exist before it runs.

    `available` are the inputs the mode provides (embedding names, and in metadata mode the input's
    numeric columns); each head's column becomes available to the heads after it.
    """
    known = set(available)
    heads: dict[str, Head] = {}
    for column, spec in specs.items():
        head = head_factory(spec.kind)(column, spec)
        missing = [n for n in head.needs if n not in known]
        if missing:
            raise HeadError(f"head {column} ({spec.kind}) needs {missing}, which this run does not provide; "
                            f"available: {', '.join(sorted(known)) or 'nothing'} (a head can only read "
                            f"heads listed before it)")
        heads[column] = head
        known.add(column)
    return heads


def run_heads(heads: dict[str, Head], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every head on one batch; returns {column: float32 (n,)}. `inputs` grows with each column."""
    inputs = dict(inputs)
    out: dict[str, torch.Tensor] = {}
    n = next(iter(inputs.values())).shape[0] if inputs else 0
    for column, head in heads.items():
        score = head({k: inputs[k] for k in head.needs}).float().reshape(-1)
        if score.shape[0] != n:
            raise HeadError(f"head {column} returned {score.shape[0]} scores for {n} examples")
        out[column] = inputs[column] = score
    return out
