"""Fixed-compute CLIP training (`clipsift train`) and the world's reference CLIPs.

Importing this package registers the world's open_clip architectures (world-rn-s, world-rn-l,
world-rn-s64, world-rn-l64), so their checkpoints load with
`open_clip.create_model_and_transforms(arch, pretrained=path)`.
"""
from clipsift.training.models import register_model_configs

register_model_configs()

from clipsift.training.config import DataConfig, TrainConfig  # noqa: E402
from clipsift.training.loop import train  # noqa: E402

__all__ = ["DataConfig", "TrainConfig", "train", "register_model_configs"]
