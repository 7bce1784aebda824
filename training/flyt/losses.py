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


def weighted_clip_loss_jvp_grad(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, w: torch.Tensor,
                                d_img: torch.Tensor, d_txt: torch.Tensor, d_scale: torch.Tensor) -> torch.Tensor:
    """∂/∂w of the directional derivative of `weighted_clip_loss` (weighted negatives) along the
    embeddings' tangent (d_img, d_txt, d_scale): FLYT's d, what torch.func.grad of a jvp gives,
    in closed form (a few [B, B] ops; the nested transforms launch hundreds of small kernels).

    With D = δℓ (the logits' tangent), P the row softmax of ℓ + log w (negatives j), Q the column
    softmax (negatives i), r = Σ_j P D and c = Σ_i Q D, the derivative is
        δL = −½ [Σ_i w_i (D_ii − r_i) + Σ_j w_j (D_jj − c_j)],
    and since ∂P_ij/∂w_k = E_ik (δ_jk − P_ij) with E_ik = e^{ℓ_ik} / Σ_m w_m e^{ℓ_im} (so P = E w),
        ∂δL/∂w_k = −½ [2 D_kk − r_k − c_k − Σ_i w_i E_ik (D_ik − r_i) − Σ_j w_j F_kj (D_kj − c_j)]
    with F the column analogue. log w is clamped as in the loss: where w_k underflows its log is a
    constant and the E, F terms drop out.
    """
    sim = img @ txt.T
    logits = logit_scale * sim
    tangent = d_scale * sim + logit_scale * (d_img @ txt.T + img @ d_txt.T)
    tiny = torch.finfo(w.dtype).tiny
    log_w = torch.log(w.clamp_min(tiny))
    e_row = torch.exp(logits - torch.logsumexp(logits + log_w[None, :], dim=1, keepdim=True))  # E
    e_col = torch.exp(logits - torch.logsumexp(logits + log_w[:, None], dim=0, keepdim=True))  # Fᵀ
    r = (e_row * w[None, :] * tangent).sum(dim=1)
    c = (e_col * w[:, None] * tangent).sum(dim=0)
    through_negatives = ((w[:, None] * e_row * (tangent - r[:, None])).sum(dim=0)
                         + (w[None, :] * e_col * (tangent - c[None, :])).sum(dim=1))
    through_negatives = torch.where(w >= tiny, through_negatives, torch.zeros_like(through_negatives))
    return -0.5 * (2 * torch.diagonal(tangent) - r - c - through_negatives)


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
