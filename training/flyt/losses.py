"""The two losses of FLYT, on embeddings: the weighted upstream CLIP loss and the downstream losses.

Both take L2-normalised embeddings (what open_clip's CLIP.forward returns), so they are cheap
functions of a few [B, D] tensors. The hypergradient differentiates the upstream loss twice
(in the weights and in the embeddings), which is affordable exactly because it lives here, at
embedding level, and not in the model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def weighted_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                       w: torch.Tensor, weighted_negatives: bool = True) -> torch.Tensor:
    """FLYT's upstream loss L_up = (L_i2t + L_t2i) / 2 with example weights w (w >= 0, Σ w = 1).

    ℓ_ij = τ⟨u_i, v_j⟩ (u images, v texts, τ = logit_scale, already exponentiated);
        L_i2t = − Σ_i w_i log( w_i e^{ℓ_ii} / Σ_j w_j e^{ℓ_ij} )
        L_t2i = − Σ_j w_j log( w_j e^{ℓ_jj} / Σ_i w_i e^{ℓ_ij} )
    The weights scale each example's term and also weight the negatives inside the softmax
    denominator: the large-batch analogue of drawing the batch from w.

    Uniform w = 1/B: the w_i in the numerator cancels the common 1/B of the denominator, so each
    term is log softmax_j(ℓ_i·)_i and L_up is exactly open_clip's ClipLoss (the mean cross-entropy
    in both directions, averaged) — no constant is left over; tests check this.

    weighted_negatives=False (a diagnostic, benchmarks/flyt_by_noise.py): w weights only each
    example's own term, −Σ_i w_i log softmax_j(ℓ_i·)_i, with every negative counted once; the same
    value and θ-gradient at uniform w, but dJ/dw then leaves out each example's role as a negative.
    """
    logits = logit_scale * img @ txt.T  # ℓ_ij, rows images, columns texts
    if weighted_negatives:
        log_w = torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))
    else:  # the uniform weights' log, a constant: the numerator and denominators stay unweighted
        log_w = torch.full_like(w, -math.log(w.shape[0]))
    diag = torch.diagonal(logits)
    i2t = log_w + diag - torch.logsumexp(logits + log_w[None, :], dim=1)  # row i, negatives j weighted by w_j
    t2i = log_w + diag - torch.logsumexp(logits + log_w[:, None], dim=0)  # column j, negatives i weighted by w_i
    return -0.5 * ((w * i2t).sum() + (w * t2i).sum())


def zeroshot_loss(img: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor,
                  rho: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a zero-shot classifier: logits = exp(ρ) · img @ classifierᵀ.

    class_emb [C, D] holds one normalised text embedding per class (one prompt each); ρ is the
    learnable log temperature of the downstream head (FLYT initialises it at ln(1/0.07)).
    """
    logits = rho.exp() * img @ class_emb.T
    return F.cross_entropy(logits, labels)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The ordinary CLIP loss on matched pairs (the downstream loss of retrieval tasks)."""
    n = img.shape[0]
    return weighted_clip_loss(img, txt, logit_scale, torch.full((n,), 1.0 / n, dtype=img.dtype, device=img.device))
