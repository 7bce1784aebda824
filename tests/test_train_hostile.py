"""Hostile images in training shards (issue 22 follow-up): `clipsift train`'s decoders apply the
pipeline's pixel limit (data.max_image_pixels, the one pipeline.decode.fit_pixel_limit) from the
header, so a decompression bomb is a counted image_too_large skip in every data path (memory,
decode cache, stream with CPU or device decoding), not a full decode. A PNG with damaged compressed
data (which torchvision 0.29.1's PNG decoder answers with a segfault) is a counted corrupt_image
skip, and a 16-bit PNG decodes to the 8-bit RGB the pipeline gives."""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsift import cli, formats, shards
from clipsift.runlog import read_json
from clipsift.training import DataConfig
from clipsift.pipeline.config import MAX_IMAGE_PIXELS
from clipsift.pipeline.decode import header_fits
from clipsift.training.data import decode_image, decode_shard, open_data
from hostile_images import png_claiming

SIZE = 32  # the ci world's images and world-rn-s's input


def real_bomb() -> bytes:
    """A real 8000 x 8000 greyscale PNG of one grey: a 79 KB file that decodes to 64 Mpx (192 MB
    as RGB). Over the 36 Mpx default, under PIL's own limits (89 Mpx warns, 179 Mpx refuses)."""
    buf = io.BytesIO()
    Image.new("L", (8000, 8000), 128).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()



def big_jpeg() -> bytes:
    """A 6100 x 6100 JPEG (37.2 Mpx, just over the limit): it decodes at 1/2 scale, and is kept."""
    buf = io.BytesIO()
    Image.new("RGB", (6100, 6100), (200, 30, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hostile(ci_world, tmp_path_factory) -> dict:
    """Two shards of ci-world pool samples with hostile images among them:
    shard 0: 12 samples + the real 64 Mpx PNG; shard 1: 8 samples + the 37 Mpx JPEG + a PNG
    whose header claims 20000 x 20000."""
    pool = [r for r in shards.read_shard(ci_world / "pool" / "shards" / "00000000.tar") if isinstance(r, shards.Sample)]
    folder = tmp_path_factory.mktemp("hostile") / "shards"
    extra = [[("png", real_bomb())], [("jpg", big_jpeg()), ("png", png_claiming(20_000, 20_000))]]
    uids: dict[str, list[str]] = {"kept": [], "too_large": []}
    start = 0
    for shard, (n, hostile_images) in enumerate(zip((12, 8), extra)):
        with shards.ShardWriter(folder, shard) as w:
            for i, r in enumerate(pool[start:start + n]):
                w.add(formats.sample_key(shard, i), r.image, r.text, r.meta)
                uids["kept"].append(r.uid)
            for j, (ext, image) in enumerate(hostile_images):
                r = pool[start + n + j]
                w.add(formats.sample_key(shard, n + j), image, r.text, r.meta, ext=ext)
                uids["kept" if ext == "jpg" else "too_large"].append(r.uid)
        start += n + len(hostile_images)
    return {"shards": folder, **uids}


def test_a_decompression_bomb_is_a_counted_skip_decoded_from_its_header_only(hostile, tmp_path):
    """Memory mode and the decode cache: the bombs are image_too_large skips found from their headers
    (fast), the other samples are decoded as without them; data.max_image_pixels=0 lifts the limit."""
    bomb_shard = formats.list_shards(hostile["shards"])[0]
    # Without a limit the bomb is a real image: decoded in full, and trained on.
    t0 = time.perf_counter()
    full = decode_shard(bomb_shard, SIZE, None, max_image_pixels=0)
    full_s = time.perf_counter() - t0
    assert full.counts == {"seen": 13, "kept": 13, "dropped": {}}
    # With the default limit it is skipped from its header, the other 12 samples used as before.
    t0 = time.perf_counter()
    limited = decode_shard(bomb_shard, SIZE, None)
    limited_s = time.perf_counter() - t0
    assert limited.counts == {"seen": 13, "kept": 12, "dropped": {shards.IMAGE_TOO_LARGE: 1}}
    assert limited.uids == full.uids[:12] and (limited.images == full.images[:12]).all()
    assert limited_s < full_s / 3, (limited_s, full_s)  # no full decode (measured 0.002 s vs 0.27 s)
    # The decode cache keeps the reason, and a cache made under another limit is not reused.
    cache = tmp_path / "cache"
    assert decode_shard(bomb_shard, SIZE, None, cache).counts == limited.counts
    assert decode_shard(bomb_shard, SIZE, None, cache).counts == limited.counts  # read from the cache
    assert decode_shard(bomb_shard, SIZE, None, cache, max_image_pixels=0).counts == full.counts

    # `clipsift train` (memory mode): the skips are in stats.json by reason, every other sample is used.
    out = tmp_path / "run"
    assert cli.main(["train", "-p", "ci", f"data.shards={hostile['shards']}", f"out={out}", "progress=false",
                     "threads=1", "batch_size=8", "samples_seen=16", "data.workers=0", "data.mode=memory"]) == 0
    data = read_json(out / "stats.json")["data"]
    assert data["records"] == {"seen": 23, "kept": 21, "dropped": {shards.IMAGE_TOO_LARGE: 2}}
    assert data["selected_samples"] == 21 == len(hostile["kept"])
    # The config key: without our limit the 64 Mpx PNG is trained on; the 400 Mpx header is still
    # past PIL's own limit, also image_too_large.
    unlimited, _ = open_data(DataConfig(shards=str(hostile["shards"]), mode="memory", workers=0, max_image_pixels=0),
                             "world-rn-s", SIZE, 4 * 77, batch_size=8, seed=0)
    assert unlimited.stats()["records"] == {"seen": 23, "kept": 22, "dropped": {shards.IMAGE_TOO_LARGE: 1}}


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")  # per call, in threads
@pytest.mark.parametrize("image_decode", ["cpu", "device"])
def test_stream_mode_skips_the_bombs_with_their_reason(hostile, image_decode):
    """Stream mode, decoding in the workers or (image_decode=device, here on the CPU) in the
    training process: the JPEG over the limit goes the CPU path's way (decoded reduced), both PNGs
    are image_too_large skips, counted every time their shard is read."""
    cfg = DataConfig(shards=str(hostile["shards"]), mode="stream", workers=0, shuffle_buffer=4,
                     image_decode=image_decode)
    data, _ = open_data(cfg, "world-rn-s", SIZE, 4 * 77, batch_size=7, seed=0, device=torch.device("cpu"))
    batches, seen = data.batches(0), []
    for _ in range(20):  # until both shards were read twice: a pass is 23 records, 21 samples
        seen += next(batches).uids
        records = data.stats()["records"]
        if records["seen"] >= 46 and records["seen"] % 23 == 0:
            break
    batches.close()
    passes = records["seen"] // 23
    assert records == {"seen": 23 * passes, "kept": 21 * passes, "dropped": {shards.IMAGE_TOO_LARGE: 2 * passes}}
    assert set(seen) == set(hostile["kept"]) and len(seen) >= 21


def damaged_png(image: bytes) -> bytes:
    """`image` as a PNG with one byte of its compressed data flipped: PIL opens it (the header is
    intact) and raises on load; torchvision 0.29.1's PNG decoder kills the process."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[data.find(b"IDAT") + 6] ^= 0xFF
    return bytes(data)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of uint16 (h, w, 3) `pixels`, written by hand (PIL writes 16-bit grey only)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def damaged(ci_world, tmp_path_factory) -> dict:
    """One shard: 10 ci-world pool samples, then a damaged PNG (made from the next sample's image),
    then a valid 16-bit PNG."""
    pool = [r for r in shards.read_shard(ci_world / "pool" / "shards" / "00000000.tar") if isinstance(r, shards.Sample)]
    bad = damaged_png(pool[10].image)
    Image.open(io.BytesIO(bad))  # opens: only decoding it fails
    assert header_fits(bad, MAX_IMAGE_PIXELS)  # so before the fix it went straight to torchvision
    folder = tmp_path_factory.mktemp("damaged") / "shards"
    wide = np.random.default_rng(0).integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    with shards.ShardWriter(folder, 0) as w:
        for i, r in enumerate(pool[:10]):
            w.add(formats.sample_key(0, i), r.image, r.text, r.meta)
        w.add(formats.sample_key(0, 10), bad, pool[10].text, pool[10].meta, ext="png")
        w.add(formats.sample_key(0, 11), png16(wide), pool[11].text, pool[11].meta, ext="png")
    return {"shards": folder, "kept": [r.uid for r in pool[:10]] + [pool[11].uid], "images": [r.image for r in pool[:10]]}


def test_a_damaged_png_is_a_counted_corrupt_image_skip_in_memory_mode(damaged):
    """Decoded in this process (a crash would end the test run): the damaged PNG is a corrupt_image
    skip, every other sample decoded as on its own."""
    shard = formats.list_shards(damaged["shards"])[0]
    decoded = decode_shard(shard, SIZE, None)
    assert decoded.counts == {"seen": 12, "kept": 11, "dropped": {shards.CORRUPT_IMAGE: 1}}
    assert decoded.uids == damaged["kept"]
    for image, expected in zip(decoded.images, damaged["images"]):
        assert (image == decode_image(expected, SIZE)).all()
    data, _ = open_data(DataConfig(shards=str(damaged["shards"]), mode="memory", workers=0),
                        "world-rn-s", SIZE, 4 * 77, batch_size=4, seed=0)
    assert data.stats()["records"] == decoded.counts
    assert data.stats()["selected_samples"] == 11


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")  # per call, in threads
@pytest.mark.parametrize("image_decode", ["cpu", "device"])
def test_stream_mode_skips_a_damaged_png_as_corrupt_image(damaged, image_decode):
    """Stream mode (workers=0: the decode runs in this process), CPU or device decoding: the damaged
    PNG is counted every time its shard is read, the other 11 samples are used."""
    cfg = DataConfig(shards=str(damaged["shards"]), mode="stream", workers=0, shuffle_buffer=4,
                     image_decode=image_decode)
    data, _ = open_data(cfg, "world-rn-s", SIZE, 4 * 77, batch_size=5, seed=0, device=torch.device("cpu"))
    batches, seen = data.batches(0), []
    while len(seen) < 3 * 11:  # the shard read at least three times (a read is counted whole)
        seen += next(batches).uids
    records = data.stats()["records"]
    batches.close()
    passes = records["seen"] // 12
    assert passes >= 3
    assert records == {"seen": 12 * passes, "kept": 11 * passes, "dropped": {shards.CORRUPT_IMAGE: passes}}
    assert set(seen) == set(damaged["kept"])


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # PIL's, converting the tRNS palette image
def test_pngs_decode_through_pil_to_the_pipelines_8_bit_rgb():
    """8-bit PNGs of every colour type: the same pixels as torchvision's decoder (used for them before)
    gives; a 16-bit PNG: uint8, as PIL's convert("RGB") gives it (open_clip's first step, which the
    pipeline runs), not torchvision's uint16."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 48, 4)).astype(np.uint8), "RGBA")
    palette_alpha = rgba.convert("P")
    palette_alpha.info["transparency"] = 3
    for img in (rgba.convert("RGB"), rgba, rgba.convert("L"), rgba.convert("LA"), rgba.convert("P"),
                palette_alpha, rgba.convert("1")):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        before = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert before.shape == (3, 40, 48) and before.dtype == torch.uint8, img.mode
        for size in (40, SIZE):  # as decoded, and resized
            assert (decode_image(data, size) == decode_image_from(before, size)).all(), (img.mode, size)

    wide = rng.integers(0, 65536, (SIZE, SIZE, 3)).astype(np.uint16)
    out = decode_image(png16(wide), SIZE)  # SIZE x SIZE: no resize, the decoded pixels themselves
    assert out.dtype == np.uint8
    assert (out == (wide >> 8).transpose(2, 0, 1)).all()  # PIL keeps each sample's high byte
    grey = Image.fromarray((rng.integers(0, 65536, (SIZE, SIZE))).astype(np.uint16))
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    assert buf.getvalue()[24] == 16  # IHDR bit depth
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1)
    assert (decode_image(buf.getvalue(), SIZE) == expected).all()


def decode_image_from(img: torch.Tensor, size: int) -> np.ndarray:
    """training.data.decode_image's resize and crop of decoded pixels."""
    from clipsift.pipeline.device_decode import resize_crop

    return resize_crop(img, (size, size)).numpy()
