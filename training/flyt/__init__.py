"""FLYT learned scorer and M-FLYT score mixing: scorers trained against downstream hypergradients.

    losses.py     weighted upstream CLIP loss (weights in the loss and in the negatives), zero-shot
                  and CLIP downstream losses
    adamw.py      AdamW as a pure, differentiable function of the gradient (+ its state)
    hypergrad.py  the efficient hypergradient (g; v through the AdamW step; a JVP of the
                  embeddings; d at embedding level; softmax VJP), its brute-force reference,
                  data-parallel collectives
    scorer.py     GLU head on [image emb; text emb] (random / uniform / CLIP-score init), linear mixer
    data.py       pool batches + features joined by uid, downstream task batches
    train.py      the loop shared by `clipsift flyt` and `clipsift mflyt`, checkpoints, pool scoring
    heads.py      scorer.pt as a pipeline score head; score_embeddings / score_columns

What the ci world shows (measured with the reference CLIP world-rn-s trained on the curated split):
the per-example hypergradient is dominated by a one-step effect that favours pairs with junk or
misaligned captions: averaged over 12 batches, their standardised dJ/dw is -0.3 to -1.0 (upweight)
while clean pairs sit near 0 and off-task / foreign pairs are positive (downweight); the same holds
with plain-SGD sensitivity and with per-example-only weighting, so it is not the AdamW
derivative or the negatives' weighting. Unrolled directly, one reference step on junk+misaligned
pairs lowers the downstream loss more than one on clean pairs (2.083 vs 2.091 from 2.102), while
20 such steps raise it to 3.16 (clean: 2.02): a short-horizon bias of the one-step objective at
this scale. Over nine 60-step ci runs (seeds, learning rates, inits) the learned scores mostly
rank off-task pairs (AUC vs clean 0.55-0.88) and foreign-language pairs (0.44-0.77) below clean
ones but not junk (0.21-0.65); one 200-step run reversed the off-task ranking (0.37).
Session 2 (ci world, 60 steps unless noted; AUC of clean vs each kind): from a uniform start the
scores rank junk captions below clean in every run (0.54-0.79) but off-task pairs ABOVE clean
(0.16-0.43, seeds 0-1, 150 steps, batch 128); with a stronger reference (51k samples on the
curated split) off-task falls to 0.17; with a reference trained on the pool itself it is 0.57
(junk 0.54). Started as the CLIP score (init=clip_score), training pulls junk from 0.997 to
0.59 and misaligned from 0.98 to 0.48. Reading: the one-step objective rewards pairs with a high
upstream loss, which a reference trained only on clean, on-task pairs has not learned, and
their larger gradients dominate ⟨∇ℓ_i, v⟩; the paper's reference (a web-trained CLIP, 5000
steps) is not in that regime. At this scale use the CLIP score as an M-FLYT input (it ranks junk
at 0.98+), and read FLYT's column as a weak, partly inverted signal.
Later measured (docs/results/flyt-diagnosis.md, section 6): the reward for junk pairs is the
distribution-shift task's term of the downstream loss, a task the reference is confidently wrong
on; the other tasks penalise junk. The paper's downstream data hold no shift set (DataComp's are
test-only), so that group is now left out by default (downstream.left_out_groups): on the ci world
junk AUC 0.57 -> 0.77.
"""
