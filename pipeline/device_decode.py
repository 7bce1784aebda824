"""Decoding JPEGs on the model stage's device (image_decode=device): nvJPEG on a GPU.

On a GPU machine the CPU decode tasks are the pipeline's bound (~5 ms of CPU per DataComp-sized
JPEG). With image_decode=device the CPU stage only reads and tokenises, and the model actor decodes
each chunk's JPEGs in one batched torchvision.io.decode_jpeg call on its device, then resizes the
shortest side (antialiased, the model's interpolation) and centre-crops there, or squashes: the
steps of open_clip's eval transform, on tensors. Pixels differ from PIL's by rounding (a different IDCT and
resampler), so embeddings are close to, not equal to, those of image_decode=cpu (tested).

Anything the batch decoder refuses (not a JPEG, CMYK, truncated) goes through the CPU path's PIL
decoding one by one, so a corrupt image gets the same corrupt_image reason and detail either way.
"""
from __future__ import annotations

import json
import warnings
from functools import lru_cache

import torch

from clipsift.pipeline.decode import decode_image
from clipsift.pipeline.encoders import ImagePrep, Plan, PlanError

_JPEG_MAGIC = b"\xff\xd8\xff"
_INTERPOLATIONS = ("bicubic", "bilinear")


def check_device_decodable(images: list[ImagePrep]) -> None:
    """Device decoding reproduces open_clip's 'shortest' resize + centre crop only: say so up front."""
    for p in images:
        cfg = json.loads(p.cfg_json)
        mode, interp = cfg.get("resize_mode", "shortest"), cfg.get("interpolation", "bicubic")
        if mode not in ("shortest", "squash") or interp not in _INTERPOLATIONS or (
                mode == "shortest" and p.shape[0] != p.shape[1]):
            raise PlanError(f"image_decode=device supports resize_mode 'shortest' (square) or 'squash' with "
                            f"{'/'.join(_INTERPOLATIONS)} interpolation; this model's preprocessing is "
                            f"{mode!r}/{interp!r} at {p.shape[:2]}: use image_decode=cpu")


def decode_on_device(encoded: list[bytes], plan: Plan, device: torch.device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every image array of the plan, uint8 (n_ok, H, W, 3) on `device`, and one error per input ("" = ok)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if data[:3] == _JPEG_MAGIC]
    if jpegs:
        datas = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notes about its decoders
            try:
                for i, img in zip(jpegs, decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)):
                    decoded[i] = img
            except RuntimeError:  # one bad file fails the whole batch: find it one by one
                for i, data in zip(jpegs, datas):
                    try:
                        decoded[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
                    except RuntimeError:
                        pass
    errors = [""] * len(encoded)
    out: dict[str, list[torch.Tensor]] = {p.key: [] for p in plan.images}
    for i, img in enumerate(decoded):
        if img is None:  # not a JPEG, or refused: the CPU path decides (and names the error)
            arrays, errors[i] = decode_image(encoded[i], plan)
            for key, a in arrays.items():
                out[key].append(torch.from_numpy(a).to(device))
            continue
        for p in plan.images:
            out[p.key].append(_resize_crop(img, p))
    return ({p.key: torch.stack(out[p.key]) if out[p.key] else torch.zeros((0, *p.shape), dtype=torch.uint8, device=device)
             for p in plan.images}, errors)


def _resize_crop(img: torch.Tensor, prep: ImagePrep) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (H, W, 3) as open_clip's eval transform: shortest side to the model
    size then a centre crop, or (squash) straight to the model size."""
    import torchvision.transforms.v2.functional as TF

    h, w = prep.shape[:2]
    mode, squash = _resize_spec(prep)
    if squash:
        return TF.resize(img, [h, w], interpolation=mode, antialias=True).permute(1, 2, 0)
    img = TF.resize(img, [h], interpolation=mode, antialias=True)  # h == w (check_device_decodable)
    return TF.center_crop(img, [h, w]).permute(1, 2, 0)


@lru_cache(maxsize=None)
def _resize_spec(prep: ImagePrep):
    """(torchvision interpolation, squash?) of a model's preprocessing, parsed once, not per image."""
    import torchvision.transforms.v2.functional as TF

    cfg = json.loads(prep.cfg_json)
    bicubic = cfg.get("interpolation", "bicubic") == "bicubic"
    return (TF.InterpolationMode.BICUBIC if bicubic else TF.InterpolationMode.BILINEAR,
            cfg.get("resize_mode", "shortest") == "squash")
