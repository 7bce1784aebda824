"""Decoding JPEGs on the model stage's device (image_decode=device): nvJPEG on a GPU.

On a GPU machine the CPU decode tasks are the pipeline's bound (~5 ms of CPU per DataComp-sized
JPEG). With image_decode=device the CPU stage only reads and tokenises, and the model actor decodes
each chunk's JPEGs in one batched torchvision.io.decode_jpeg call on its device, then resizes the
shortest side (antialiased, the model's interpolation) and centre-crops there, or squashes: the
steps of open_clip's eval transform, on tensors. Pixels differ from PIL's by rounding (a different IDCT and
resampler), so embeddings are close to, not equal to, those of image_decode=cpu (tested).

Anything the batch decoder refuses (not a JPEG, CMYK, truncated) and any JPEG over max_image_pixels
goes through the CPU path's PIL decoding one by one, so a corrupt or too large image gets the same
reason and detail either way.
A JPEG that does not end in its EOI marker (truncated) is not offered to the batch decoder at all:
nvJPEG may return partial pixels where libjpeg and PIL refuse the file.

decode_jpegs, resize_crop and within_limit are also training's stream decoder (training.data, image_decode=device).
"""
from __future__ import annotations

import json
import warnings
from functools import lru_cache

import torch

from clipsift.pipeline.decode import ImageFailure, decode_image, header_fits, open_image
from clipsift.pipeline.encoders import ImagePrep, Plan, PlanError
from clipsift.pipeline.image_header import JPEG_MAGIC

_JPEG_END = b"\xff\xd9"
# torchvision >= 0.29 warns on every decode call that its decoders are deprecated. Filtered once
# here rather than with catch_warnings per call, which is not thread-safe (training decodes in threads).
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
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


def complete_jpeg(data: bytes) -> bool:
    """A JPEG from its SOI to a final EOI marker: the only files handed to the batch decoder."""
    return data[:3] == JPEG_MAGIC and data[-2:] == _JPEG_END


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """1-D uint8 CPU tensors of complete JPEGs -> uint8 (3, h, w) RGB images on `device` in one
    batched decode_jpeg call (nvJPEG on a GPU, libjpeg on a CPU); None where the decoder refuses one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not encoded:
        return []
    if device.type == "cuda":
        # torchvision's CUDA decoder takes its output memory on the caller's stream but writes it on
        # a private stream that does not wait for the caller's: a block freed while queued kernels
        # still read it can be overwritten early (pytorch/vision#9606, seen on H100). Nothing queued,
        # nothing to overwrite.
        torch.cuda.current_stream(device).synchronize()
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole batch: find it one by one
        out: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def resize_crop(img: torch.Tensor, size: tuple[int, int], interpolation=None, squash: bool = False) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (3, H, W) as open_clip's eval transform, on img's device: the
    shortest side to H (antialiased) then a centre crop, or (squash) straight to (H, W). An image
    already at (H, W) is returned as it is."""
    import torchvision.transforms.v2.functional as TF

    mode = TF.InterpolationMode.BICUBIC if interpolation is None else interpolation
    if tuple(img.shape[1:]) == tuple(size):
        return img
    if squash:
        return TF.resize(img, list(size), interpolation=mode, antialias=True)
    img = TF.resize(img, [size[0]], interpolation=mode, antialias=True)  # square sizes only (check_device_decodable)
    return TF.center_crop(img, list(size))


def within_limit(data: bytes, limit: int) -> bool:
    """Whether a JPEG's header gives at most `limit` pixels (0: no limit). A larger one goes through
    the CPU path, which decodes it reduced or skips it; reading the header costs ~1% of a decode."""
    if not limit or header_fits(data, limit):
        return True
    try:
        with open_image(data) as img:
            w, h = img.size
    except Exception:  # the CPU path names the error
        return False
    return w * h <= limit


def decode_on_device(encoded: list[bytes], plan: Plan,
                     device: torch.device) -> tuple[dict[str, torch.Tensor], list[ImageFailure | None]]:
    """Every image array of the plan, uint8 (n_ok, H, W, 3) on `device`, and per input why it failed (None = ok)."""
    decoded: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if complete_jpeg(data) and within_limit(data, plan.max_image_pixels)]
    for i, img in zip(jpegs, decode_jpegs([torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs],
                                          device)):
        decoded[i] = img
    errors: list[ImageFailure | None] = [None] * len(encoded)
    out: dict[str, list[torch.Tensor]] = {p.key: [] for p in plan.images}
    specs = [(p.key, p.shape[:2], *_resize_spec(p)) for p in plan.images]
    for i, img in enumerate(decoded):
        if img is None:  # not a JPEG, truncated, too large or refused: the CPU path decides (and names the error)
            arrays, errors[i] = decode_image(encoded[i], plan)
            for key, a in arrays.items():
                out[key].append(torch.from_numpy(a).to(device))
            continue
        for key, shape, mode, squash in specs:
            out[key].append(resize_crop(img, shape, mode, squash).permute(1, 2, 0))
    return ({p.key: torch.stack(out[p.key]) if out[p.key] else torch.zeros((0, *p.shape), dtype=torch.uint8, device=device)
             for p in plan.images}, errors)


@lru_cache(maxsize=None)
def _resize_spec(prep: ImagePrep):
    """(torchvision interpolation, squash?) of a model's preprocessing, parsed once, not per image."""
    import torchvision.transforms.v2.functional as TF

    cfg = json.loads(prep.cfg_json)
    bicubic = cfg.get("interpolation", "bicubic") == "bicubic"
    return (TF.InterpolationMode.BICUBIC if bicubic else TF.InterpolationMode.BILINEAR,
            cfg.get("resize_mode", "shortest") == "squash")
