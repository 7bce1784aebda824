"""The CLIP models clipsift trains: stock open_clip architectures plus the world's small ones.

The world's architectures are open_clip JSON configs in model_configs/, registered with open_clip
when clipsift.training is imported, so `open_clip.create_model_and_transforms("world-rn-s",
pretrained=checkpoint)` works anywhere after `import clipsift.training`. They use open_clip's
standard tokenizer (vocab 49408), so checkpoints are plain open_clip checkpoints.

    world-rn-s    stand-in for OpenAI B/32: ModifiedResNet [1,1,1,1] width 16 at 32 px, text
                  transformer width 96 x 2 layers, context 20, embed 128
    world-rn-l    stand-in for L/14: ResNet [1,2,2,1] width 32, text width 128 x 4 layers, embed 256
    world-rn-s64, world-rn-l64   the same at 64 px, for the gpu world preset
    world-vit-t   a tiny ViT (patch 8, width 64 x 2 layers at 32 px): the paper's ViT reference
                  architecture at a size a CPU runs (FLYT's ViT path is tested with it)
"""
from __future__ import annotations

import warnings
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
WORLD_MODELS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def register_model_configs() -> None:
    """Make the world's architectures known to open_clip (idempotent)."""
    if not set(WORLD_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def create_model(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """A randomly initialised open_clip CLIP (seed torch before calling for a reproducible init)."""
    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; world models: {', '.join(WORLD_MODELS)} "
                         f"(any open_clip architecture name also works)")
    return open_clip.create_model(name, pretrained=None, device=device)


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size)


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """Weight decay on matrices and conv kernels (ndim >= 2) only; none on gains, biases, logit_scale."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Training-mode batch norm over the global batch of all ranks, by an explicit formula.

    The statistics are per-channel sums all-reduced with autograd-aware collectives (any device and
    backend, gloo included; torch's SyncBatchNorm refuses CPU tensors), so a ResNet tower trained
    with DDP normalises like one process on the whole batch. Used in one process too
    (batch_norm=global), 1 and N processes agree to float rounding, and it is more accurate than
    torch's fused CPU kernel in fp32 (on the ci world, first-step stem gradients within 5e-6 of a
    float64 reference where the fused kernel is off by 6e-3), at ~25% more CPU time a step.
    Eval mode is plain BatchNorm2d, and the state-dict keys are BatchNorm2d's: checkpoints stay stock.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        with warnings.catch_warnings():  # torch.distributed.nn is "deprecated" but is the differentiable API
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn import all_reduce

            total = all_reduce if ranks > 1 else (lambda t: t)
            xf = x.float()
            count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
            stats = total(torch.cat([xf.sum((0, 2, 3)), count]))
            n = stats[-1]
            mean = stats[:-1] / n
            centred = xf - mean[None, :, None, None]
            var = total((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def use_global_batchnorm(model: nn.Module) -> int:
    """Swap every BatchNorm2d for GlobalBatchNorm2d in place (same parameters). Returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
            swapped += 1
    return swapped
