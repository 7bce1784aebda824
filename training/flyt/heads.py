"""Trained FLYT / M-FLYT scorers as pipeline score heads, and the file they are saved in.

<run>/scorer.pt holds what scoring needs and nothing else:
    {"kind": "flyt" | "mflyt", "spec": scorer spec, "state_dict": ..., "inputs": [names], "column": ...}
`inputs` are the pipeline names the scorer reads: FLYT the two embeddings ("b32_img", "b32_txt"),
M-FLYT its score columns. ScorerHead follows pipeline.heads' protocol (`needs`, `to`, call on a
{name: tensor} batch), so `{kind: "clipsift.training.flyt.heads:ScorerHead", checkpoint: RUN}` works
in a pipeline config today; `score_embeddings` / `score_columns` are the same for numpy callers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipsift.training.flyt.data import psi
from clipsift.training.flyt.scorer import build_scorer

SCORER_FILE = "scorer.pt"


def scorer_path(path: str | Path) -> Path:
    """A scorer file, or a FLYT/M-FLYT run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no trained scorer at {path} (give a scorer.pt or a flyt/mflyt run folder)")
    return path


def load_scorer(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(scorer in eval mode, the saved payload without its weights)."""
    payload = torch.load(scorer_path(path), map_location="cpu", weights_only=True)
    scorer = build_scorer(payload["spec"])
    scorer.load_state_dict(payload["state_dict"])
    scorer.eval()
    return scorer, {k: v for k, v in payload.items() if k != "state_dict"}


def features_from_inputs(kind: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The scorer input from the named pipeline arrays, in `inputs` order."""
    if kind == "flyt":
        return psi(*inputs)
    return torch.stack([x.float().reshape(-1) for x in inputs], dim=1)


class ScorerHead(nn.Module):
    """A trained scorer as a pipeline head: {name: tensor} -> one float32 score per example."""

    def __init__(self, column: str, spec: Any):
        super().__init__()
        if not getattr(spec, "checkpoint", ""):
            raise ValueError(f"head {column}: a FLYT/M-FLYT head needs `checkpoint` (a scorer.pt or its run folder)")
        self.scorer, self.meta = load_scorer(spec.checkpoint)
        self.needs = tuple(self.meta["inputs"])

    @torch.no_grad()
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features_from_inputs(self.meta["kind"], [inputs[n] for n in self.needs])
        return self.scorer(x.to(next(self.scorer.parameters()).device)).float()


def score_embeddings(path: str | Path, img: np.ndarray, txt: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """FLYT scores (float32) of examples given their image and text embeddings."""
    scorer, meta = load_scorer(path)
    if meta["kind"] != "flyt":
        raise ValueError(f"{path} is an {meta['kind']} scorer; use score_columns")
    return _batched(scorer, meta["kind"], [img, txt], batch_size)


def score_columns(path: str | Path, columns: dict[str, np.ndarray], batch_size: int = 65536) -> np.ndarray:
    """M-FLYT scores (float32) from the score columns the mixer was trained on (NaN = missing)."""
    scorer, meta = load_scorer(path)
    missing = [c for c in meta["inputs"] if c not in columns]
    if missing:
        raise ValueError(f"M-FLYT scorer {path} needs columns {missing}")
    return _batched(scorer, meta["kind"], [columns[c] for c in meta["inputs"]], batch_size)


@torch.no_grad()
def _batched(scorer: nn.Module, kind: str, arrays: list[np.ndarray], batch_size: int) -> np.ndarray:
    n = len(arrays[0])
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, batch_size):
        part = [torch.from_numpy(np.asarray(a[start : start + batch_size])) for a in arrays]
        out[start : start + batch_size] = scorer(features_from_inputs(kind, part)).numpy()
    return out
