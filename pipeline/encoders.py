"""The models of a run: what the CPU stage must prepare for them, and the device-side encoder.

open_clip's eval transform for an image is PIL work (resize, crop, RGB) followed by ToTensor and
Normalize. The pipeline cuts it there: CPU tasks run the PIL part and ship fixed-shape uint8 arrays
(4x smaller than float32), and the model stage does ToTensor + Normalize on its device with the
same arithmetic, so embeddings match `model.encode_image(preprocess(img))` exactly. Models with
the same PIL preprocessing share one image array, models with the same tokenizer one token array.

A Plan holds all of this plus the heads; it is small and picklable, and its fingerprint changes
whenever the output bytes could (weights, preprocessing, batch size, precision, heads).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipsift.eval.models import ModelSpec, ensure_arch, file_sha256, load_model, resolve_pretrained, tokenizer, weights_id
from clipsift.pipeline.config import MAX_IMAGE_PIXELS
from clipsift.pipeline.heads import HeadSpec, build_heads, run_heads

_TO_TENSOR = ("ToTensor", "MaybeToTensor")


class PlanError(ValueError):
    """A model the pipeline cannot serve (e.g. an unusual transform), or random weights by mistake."""


@dataclass(frozen=True)
class ModelPlan:
    name: str  # b32 -> npz arrays b32_img, b32_txt
    open_clip_name: str  # arch, or the hf-hub:/local-dir: id
    pretrained: str  # resolved weights source: tag, checkpoint file, or "" (random init / hub)
    image_key: str  # which image array it reads
    text_key: str  # which token array it reads
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str  # eval.models.weights_id: changes whenever the weights do


@dataclass(frozen=True)
class ImagePrep:
    key: str
    cfg_json: str  # open_clip PreprocessCfg minus mean/std (applied on the device)
    shape: tuple[int, int, int]  # (H, W, 3) uint8


@dataclass(frozen=True)
class TextPrep:
    key: str
    open_clip_name: str  # the tokenizer is open_clip.get_tokenizer(this)
    context_length: int


@dataclass
class Plan:
    models: list[ModelPlan]
    images: list[ImagePrep]
    texts: list[TextPrep]
    heads: dict[str, HeadSpec]
    batch_size: int
    normalize: bool
    precision: str
    seed: int
    jpeg_draft: bool = False  # decode JPEGs at a reduced scale that still covers the model input (PIL draft)
    image_decode: str = "cpu"  # "device": the model stage decodes JPEGs (pipeline.device_decode)
    score_columns: list[str] = field(default_factory=list)
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images: JPEG decoded reduced, else image_too_large

    def embedding_names(self) -> list[str]:
        return [f"{m.name}_{t}" for m in self.models for t in ("img", "txt")]

    def fingerprint(self) -> str:
        """Everything that decides the output bytes (not paths, CPU counts or progress bars)."""
        doc = {"models": [asdict(m) for m in self.models], "images": [asdict(i) for i in self.images],
               "texts": [asdict(t) for t in self.texts], "heads": {k: asdict(v) for k, v in self.heads.items()},
               "batch_size": self.batch_size, "normalize": self.normalize, "precision": self.precision,
               "seed": self.seed}
        if self.jpeg_draft:  # absent when off, so outputs written before the option existed stay valid
            doc["jpeg_draft"] = True
        if self.image_decode != "cpu":
            doc["image_decode"] = self.image_decode
        if self.max_image_pixels != MAX_IMAGE_PIXELS:
            doc["max_image_pixels"] = self.max_image_pixels
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_clip_source(spec: ModelSpec) -> tuple[str, str]:
    """(name open_clip is called with, pretrained value) -- as eval.models.load_model resolves them."""
    source = resolve_pretrained(spec.arch, spec.pretrained)
    hub = source.startswith(("hf-hub:", "local-dir:"))
    name = source if hub else spec.arch
    ensure_arch(name)
    return name, "" if hub else source


def make_plan(models: dict[str, ModelSpec], heads: dict[str, HeadSpec], *, batch_size: int, normalize: bool,
              precision: str, seed: int, allow_random_weights: bool, jpeg_draft: bool = False,
              image_decode: str = "cpu", max_image_pixels: int = MAX_IMAGE_PIXELS) -> Plan:
    """Probe each model's preprocessing and tokenizer (architecture only, weights stay on disk)."""
    import open_clip

    images: dict[str, ImagePrep] = {}
    texts: dict[bytes, TextPrep] = {}
    plans = []
    for name, spec in models.items():
        oc_name, pretrained = open_clip_source(spec)
        if not pretrained and not oc_name.startswith(("hf-hub:", "local-dir:")) and not allow_random_weights:
            raise PlanError(f"model {name} ({spec.arch}) has no pretrained weights: its embeddings would be "
                            f"random. Set models.{name}.pretrained (a tag, hf-hub:org/repo, a checkpoint or a "
                            f"training run folder), or allow_random_weights=true for benchmarks")
        is_tag = bool(pretrained) and not Path(pretrained).is_file()
        with torch.device("meta"):  # the architecture and its preprocess config, without allocating weights
            model = open_clip.create_model(oc_name, pretrained=pretrained if is_tag else None,
                                           load_weights=False, device="meta")
        pp = dict(model.visual.preprocess_cfg)
        mean, std = tuple(float(x) for x in pp.pop("mean")), tuple(float(x) for x in pp.pop("std"))
        cfg_json = json.dumps(pp, sort_keys=True, default=list)
        _, _, (h, w) = split_transform(cfg_json, mean, std)  # checks the transform is one we can cut
        image = images.setdefault(cfg_json, ImagePrep(f"img{len(images)}", cfg_json, (h, w, 3)))
        tok = tokenizer(oc_name)
        ctx = int(getattr(tok, "context_length", 0) or model.context_length)
        sig = _tokenizer_signature(tok, oc_name, ctx)
        text = texts.setdefault(sig, TextPrep(f"tok{len(texts)}", oc_name, ctx))
        del model
        plans.append(ModelPlan(name, oc_name, pretrained, image.key, text.key, mean, std, _weights(spec, oc_name, seed)))
    plan = Plan(plans, list(images.values()), list(texts.values()), dict(heads), batch_size, normalize,
                precision, seed, jpeg_draft, image_decode, max_image_pixels=max_image_pixels)
    if image_decode == "device":
        from clipsift.pipeline.device_decode import check_device_decodable

        if jpeg_draft:
            raise PlanError("jpeg_draft applies to CPU decoding; with image_decode=device leave it off")
        check_device_decodable(plan.images)
    elif image_decode != "cpu":
        raise PlanError(f"image_decode={image_decode!r}: expected cpu or device")
    plan.score_columns = list(build_heads(heads, plan.embedding_names()))  # checks every head's inputs
    return plan


def _weights(spec: ModelSpec, oc_name: str, seed: int) -> str:
    """What the weights are, for the fingerprint: eval.models.weights_id, plus the content of a
    local-dir: model folder (config and weights live there, not in `pretrained`)."""
    if oc_name.startswith("local-dir:"):
        folder = Path(oc_name.split(":", 1)[1])
        return "local-dir|" + "|".join(f"{p.name}:{file_sha256(p)}" for p in sorted(folder.iterdir()) if p.is_file())
    return weights_id(spec.arch, spec.pretrained, seed)


def _tokenizer_signature(tokenizer: Any, name: str, ctx: int) -> bytes:
    """Equal for tokenizers that produce the same tokens (so they share one array)."""
    try:
        return pickle.dumps((type(tokenizer).__qualname__, ctx, tokenizer.__dict__))
    except Exception:  # unpicklable internals: do not share
        return name.encode()


# ---------------------------------------------------------------- CPU side (decode tasks)
@lru_cache(maxsize=None)
def split_transform(cfg_json: str, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)):
    """open_clip's eval transform cut before ToTensor: (PIL part, Normalize, (H, W))."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision import transforms as T

    cfg = PreprocessCfg(**json.loads(cfg_json), mean=mean, std=std)
    steps = list(image_transform_v2(cfg, is_train=False).transforms)
    cut = next((i for i, t in enumerate(steps) if type(t).__name__ in _TO_TENSOR), None)
    rest = steps[cut + 1:] if cut is not None else None
    if cut is None or len(rest) != 1 or not isinstance(rest[0], T.Normalize):
        raise PlanError(f"unsupported eval transform {steps}: expected PIL steps, ToTensor, Normalize")
    size = cfg.size if isinstance(cfg.size, (tuple, list)) else (cfg.size, cfg.size)
    return T.Compose(steps[:cut]), rest[0], (int(size[0]), int(size[1]))


# ---------------------------------------------------------------- device side (the model stage)
def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Encoder:
    """Every model of a plan and every head, on one device. `encode` handles one chunk."""

    def __init__(self, plan: Plan, device: str | torch.device = "cpu"):
        self.plan = plan
        self.device = torch.device(device)
        self.models = {}
        for m in plan.models:
            torch.manual_seed(plan.seed)  # only random-init models depend on it
            model = load_model(m.open_clip_name, m.pretrained, self.device).model
            mean = torch.tensor(m.mean, device=self.device).view(1, -1, 1, 1)
            std = torch.tensor(m.std, device=self.device).view(1, -1, 1, 1)
            self.models[m.name] = (model, mean, std)
        self.heads = {k: h.to(self.device) for k, h in build_heads(plan.heads, plan.embedding_names()).items()}
        amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.precision)
        self.autocast_dtype = amp if self.device.type == "cuda" else None

    def embedding_dims(self) -> dict[str, int]:
        """Width of every embedding (from one blank example), so an empty shard still gets (0, dim) arrays."""
        images = {p.key: np.zeros((1, *p.shape), np.uint8) for p in self.plan.images}
        tokens = {t.key: np.zeros((1, t.context_length), np.int32) for t in self.plan.texts}
        embs, _ = self.encode(images, tokens)
        return {k: int(v.shape[1]) for k, v in embs.items()}

    @torch.no_grad()
    def encode(self, images: dict[str, np.ndarray],
               tokens: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """uint8 (n, H, W, 3) images (arrays, or tensors on the device) and int (n, L) tokens by key ->
        float16 embeddings, float32 scores.

        Heads see the float16-rounded embeddings (as float32), exactly what the npz stores, so
        metadata mode recomputes the same scores from the files.
        """
        dev = self.device
        with warnings.catch_warnings():  # the arrays view Ray's read-only buffers; nothing writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            pixels = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)).to(dev, non_blocking=True)
                      for k, v in images.items()}
            toks = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev, non_blocking=True).long() for k, v in tokens.items()}
        embs: dict[str, torch.Tensor] = {}
        with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            for m in self.plan.models:
                model, mean, std = self.models[m.name]
                # ToTensor (uint8 HWC -> float CHW / 255) then Normalize, as torchvision computes them
                x = pixels[m.image_key].permute(0, 3, 1, 2).float().div(255).sub_(mean).div_(std)
                for kind, z in (("img", model.encode_image(x)), ("txt", model.encode_text(toks[m.text_key]))):
                    z = z.float()
                    if self.plan.normalize:
                        z = torch.nn.functional.normalize(z, dim=-1)
                    embs[f"{m.name}_{kind}"] = z.half()
        scores = run_heads(self.heads, {k: v.float() for k, v in embs.items()}) if self.heads else {}
        return ({k: v.cpu().numpy() for k, v in embs.items()},
                {k: v.cpu().numpy().astype(np.float32) for k, v in scores.items()})
