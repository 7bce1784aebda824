"""The scoring models q_φ: FLYT's GLU head on frozen CLIP embeddings, and M-FLYT's linear mixer.

Both map one feature vector Ψ_i per example to one logit s_i; FLYT trains them the same way.
A scorer is rebuilt from a small spec dict (saved in checkpoints), so scoring needs no config.

    GLUScorer   Ψ = [û; t̂] (normalised image and text embeddings of a frozen CLIP), blocks
                y = W2( SiLU(W1 x + b1) ⊙ (W3 x + b3) ) + b2; `depth` blocks of width `hidden`,
                the last one with one output. Optional start as (≈) scale · cos(û, t̂).
                The CLIP body stays frozen: Ψ is read from the pipeline's stored embeddings, so
                training needs no image decoding for the scorer. Fine-tuning the body (an option
                in the paper) is not implemented.
    LinearMixer Ψ = scores other methods gave the example; s = Σ_k a_k z_k + b with z the scores
                standardised by the pool mean/std kept in the module (missing values -> 0);
                PyTorch's default init (the paper's) or all zeros.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class GLU(nn.Module):
    """y = W2( SiLU(W1 x + b1) ⊙ (W3 x + b3) ) + b2."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.w1 = nn.Linear(dim_in, hidden)
        self.w3 = nn.Linear(dim_in, hidden)
        self.w2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GLUScorer(nn.Module):
    def __init__(self, input_dim: int, hidden: int | None = None, depth: int = 1):
        super().__init__()
        if depth < 1:
            raise ValueError(f"scorer depth must be >= 1, got {depth}")
        hidden = hidden or input_dim
        dims = [input_dim] + [hidden] * (depth - 1) + [1]
        self.blocks = nn.ModuleList(GLU(dims[i], hidden, dims[i + 1]) for i in range(depth))
        self.spec = {"kind": "glu", "input_dim": input_dim, "hidden": hidden, "depth": depth}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.squeeze(-1)

    @torch.no_grad()
    def zero_output(self) -> None:
        """Every score 0 at the start (uniform weights); the hidden layers keep their random init,
        so the first gradients reach the output layer and then the rest."""
        self.blocks[-1].w2.weight.zero_()
        self.blocks[-1].w2.bias.zero_()

    @torch.no_grad()
    def init_as_clip_score(self, scale: float, offset: float = 8.0) -> None:
        """Start as s ≈ scale · ⟨û, t̂⟩ for Ψ = [û; t̂] (needs depth 1 and hidden >= input dim).

        With D = input_dim / 2, hidden unit k < D computes SiLU(M + û_k) · t̂_k and unit D + k
        computes SiLU(M) · t̂_k (M = offset); W2 gives them ±scale / SiLU'(M). Their sum is
        scale · Σ_k t̂_k (SiLU(M + û_k) − SiLU(M)) / SiLU'(M) = scale · ⟨û, t̂⟩ + O(SiLU''(M) û_k²):
        SiLU is almost linear far right of 0 (M = 8: |SiLU''| ≈ 2e-3). Units past 2D start at 0
        output weight. Every weight stays trainable.
        """
        (block,) = self.blocks if len(self.blocks) == 1 else (None,)
        input_dim, hidden = self.spec["input_dim"], self.spec["hidden"]
        if block is None or hidden < input_dim or input_dim % 2:
            raise ValueError("clip_score init needs depth 1, an even input dim ([image; text]) and hidden >= input dim")
        d = input_dim // 2
        sig = 1 / (1 + math.exp(-offset))
        slope = sig * (1 + offset * (1 - sig))  # SiLU'(M)
        eye = torch.eye(d)
        block.w1.weight.zero_()
        block.w1.weight[:d, :d] = eye
        block.w1.bias[: 2 * d] = offset
        block.w3.weight.zero_()
        block.w3.weight[:d, d:] = eye
        block.w3.weight[d : 2 * d, d:] = eye
        block.w3.bias.zero_()
        block.w2.weight.zero_()
        block.w2.weight[0, :d] = scale / slope
        block.w2.weight[0, d : 2 * d] = -scale / slope
        block.w2.bias.zero_()


class LinearMixer(nn.Module):
    """s = Σ_k a_k (ψ_k − mean_k) / std_k + b; a missing input score counts as the mean.

    whiten: a [k, k] matrix P applied to the standardised scores z before the weights (s = a'·(zP) + b),
    so each learned weight acts on a decorrelated direction; `weights()` reports the weights on z
    (a = P a'), comparable with an unwhitened mixer's.
    """

    def __init__(self, columns: list[str], mean: list[float] | None = None, std: list[float] | None = None,
                 whiten: list[list[float]] | None = None):
        super().__init__()
        k = len(columns)
        if k == 0:
            raise ValueError("M-FLYT needs at least one input score column")
        self.columns = list(columns)
        self.linear = nn.Linear(k, 1)  # PyTorch's default init, as the paper's mixer
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * k, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * k, dtype=torch.float32))
        self.spec = {"kind": "linear", "columns": self.columns}
        if whiten is not None:
            self.register_buffer("whiten", torch.tensor(whiten, dtype=torch.float32))
            self.spec["inputs"] = "whitened"
        else:
            self.whiten = None

    @torch.no_grad()
    def zero_(self) -> "LinearMixer":
        """Every example starts with the same score: uniform weights over the batch."""
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        return self

    @torch.no_grad()
    def equal_(self) -> "LinearMixer":
        """Start as the mean of the standardised inputs (each weight 1/k, no bias): the untrained
        ensemble of the input scores, which the objective then refines."""
        nn.init.constant_(self.linear.weight, 1.0 / len(self.columns))
        nn.init.zeros_(self.linear.bias)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nan_to_num((x - self.mean) / self.std, nan=0.0)
        if self.whiten is not None:
            z = z @ self.whiten
        return self.linear(z).squeeze(-1)

    def weights(self) -> dict[str, float]:
        """Learned weight per (standardised) input score, plus the bias."""
        a = self.linear.weight[0].detach()
        if self.whiten is not None:
            a = self.whiten @ a
        out = {c: float(w) for c, w in zip(self.columns, a)}
        out["(bias)"] = float(self.linear.bias[0].detach())
        return out


def build_scorer(spec: dict[str, Any]) -> nn.Module:
    """The scorer a spec describes (weights from a state dict afterwards)."""
    if spec["kind"] == "glu":
        return GLUScorer(spec["input_dim"], spec["hidden"], spec["depth"])
    if spec["kind"] == "linear":
        k = len(spec["columns"])  # a whitened mixer's matrix comes with its state dict
        return LinearMixer(spec["columns"], whiten=torch.eye(k).tolist() if spec.get("inputs") == "whitened" else None)
    raise ValueError(f"unknown scorer kind {spec['kind']!r}")


def standardisation(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-column mean and std over the rows that have a value (std 1 where a column is constant)."""
    mean, std = [], []
    for col in x.T:
        ok = col[torch.isfinite(col)]
        if ok.numel() == 0:
            raise ValueError("an input score column has no finite value")
        m, s = float(ok.double().mean()), float(ok.double().std()) if ok.numel() > 1 else 0.0
        mean.append(m)
        std.append(s if s > 0 else 1.0)
    return mean, std


def whitening(x: torch.Tensor, mean: list[float], std: list[float], eps: float = 1e-3) -> list[list[float]]:
    """ZCA whitening of the standardised columns (rows with every value finite): P = C^(-1/2) for their
    correlation matrix C, eigenvalues floored at eps. zP then has (nearly) identity covariance and each
    column of P stays closest to its own input, so whitened weights keep their inputs' names."""
    z = ((x.double() - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64))
    z = z[torch.isfinite(z).all(dim=1)]
    if z.shape[0] < 2:
        raise ValueError("whitening needs at least two rows with every input score present")
    corr = torch.cov(z.T).reshape(z.shape[1], z.shape[1])
    lam, u = torch.linalg.eigh(corr)
    return (u @ torch.diag(lam.clamp_min(eps).rsqrt()) @ u.T).float().tolist()
