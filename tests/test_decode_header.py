"""The pixel limit's fast path (pipeline.image_header, pipeline.decode.header_fits): an image's size
read from its JPEG or PNG header without PIL is PIL's size, on real files; anything PIL could read
differently or refuse falls back to PIL, so every decoder's outcome is what it was without the fast
path (training's CPU decoder and the device path's within_limit, checked against that path itself)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import clipsift.pipeline.device_decode as device_decode
import clipsift.training.data as training_data
from clipsift import shards
from clipsift.pipeline.decode import header_fits, image_failure
from clipsift.pipeline.image_header import image_size

LIMIT = 36_000_000  # the default max_image_pixels


def _photo(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return field.convert(mode)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pil_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0110] = "clipsift test camera"  # Model
    exif[0x0112] = 6  # Orientation (PIL does not rotate on open: the size stays the stored one)
    return exif.tobytes()


def _icc() -> bytes:
    from PIL import ImageCms
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _jpegs() -> dict[str, bytes]:
    out = {}
    for w, h in ((1, 1), (32, 32), (17, 5), (640, 480), (3, 2000)):
        out[f"baseline {w}x{h}"] = _encode(_photo(w, h), "JPEG", quality=90)
        out[f"progressive {w}x{h}"] = _encode(_photo(w, h), "JPEG", quality=75, progressive=True, optimize=True)
    out["exif + icc + comment"] = _encode(_photo(300, 200), "JPEG", exif=_exif(), icc_profile=_icc(), comment=b"hi")
    out["exif, 4:4:4, dpi"] = _encode(_photo(64, 48), "JPEG", exif=_exif(), subsampling=0, dpi=(300, 300))
    out["restart markers"] = _encode(_photo(200, 120), "JPEG", restart_marker_blocks=1)
    out["grayscale"] = _encode(_photo(100, 70, "L"), "JPEG")
    out["cmyk (Adobe APP14)"] = _encode(_photo(90, 60, "CMYK"), "JPEG")
    out["cmyk progressive"] = _encode(_photo(90, 60, "CMYK"), "JPEG", progressive=True)
    return out


def _pngs() -> dict[str, bytes]:
    return {
        "rgb": _encode(_photo(120, 80), "PNG"),
        "rgba": _encode(_photo(33, 7, "RGBA"), "PNG"),
        "grey": _encode(_photo(5, 300, "L"), "PNG"),
        "grey + alpha": _encode(_photo(40, 40, "LA"), "PNG"),
        "1-bit": _encode(_photo(64, 3, "1"), "PNG"),
        "palette": _encode(_photo(50, 60).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "palette, 4-bit": _encode(_photo(50, 60).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", bits=4),
        "16-bit grey": _encode(Image.fromarray(np.arange(60 * 70, dtype=np.uint16).reshape(60, 70) * 13), "PNG"),
        "interlaced": _encode(_photo(30, 20), "PNG", interlace=1) if _pil_writes_interlaced() else _encode(_photo(30, 20), "PNG"),
    }


def _pil_writes_interlaced() -> bool:
    return Image.open(io.BytesIO(_encode(_photo(4, 4), "PNG", interlace=1))).info.get("interlace") == 1


def _with_ihdr(png: bytes, w: int, h: int, depth: int | None = None, colour: int | None = None) -> bytes:
    """`png` (a PNG PIL wrote) whose IHDR says w x h, and the given bit depth / colour type, with
    its checksum recomputed: PIL reads the header as if it were real."""
    data = bytearray(png)
    data[16:24] = struct.pack(">II", w, h)
    if depth is not None:
        data[24] = depth
    if colour is not None:
        data[25] = colour
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_the_header_size_is_pils_size_on_real_files(kind):
    files = _jpegs() if kind == "jpeg" else _pngs()
    for name, data in files.items():
        assert image_size(data) == _pil_size(data), name
        assert header_fits(data, LIMIT) and header_fits(data, 0), name


def test_the_header_size_of_every_ci_world_image(ci_world):
    """The world's own JPEGs (what training decodes every pass in stream mode), its damaged ones
    (truncated headers, which PIL refuses) included."""
    recs = [r for r in shards.read_shard(ci_world / "pool" / "shards" / "00000000.tar") if isinstance(r, shards.Sample)]
    refused = 0
    for r in recs:
        try:
            size = _pil_size(r.image)
        except OSError:
            size, refused = None, refused + 1
        assert image_size(r.image) == size, r.key
    assert len(recs) > 100 and 0 < refused < len(recs) / 10


def test_headers_over_a_limit_and_pils_own_limit():
    bomb = _with_ihdr(_pngs()["rgb"], 20_000, 20_000)  # 400 Mpx claimed by a tiny file: PIL refuses it
    assert image_size(bomb) == (20_000, 20_000)
    assert not header_fits(bomb, LIMIT) and not header_fits(bomb, 0)  # PIL decides (and refuses)
    with pytest.raises(Image.DecompressionBombError):
        _pil_size(bomb)
    over = _with_ihdr(_pngs()["rgb"], 7000, 6000)  # 42 Mpx: over ours, under PIL's
    assert not header_fits(over, LIMIT) and header_fits(over, 0) and header_fits(over, 42_000_000)
    jpeg = _jpegs()["baseline 640x480"]
    assert header_fits(jpeg, 640 * 480) and not header_fits(jpeg, 640 * 480 - 1)


def test_what_pil_would_refuse_or_read_otherwise_falls_back():
    png, jpeg = _pngs()["rgb"], _jpegs()["baseline 32x32"]
    sof = jpeg.index(b"\xff\xc0")
    twelve_bit = jpeg[:sof + 4] + b"\x0c" + jpeg[sof + 5:]
    odd = {
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "jpeg magic only": b"\xff\xd8\xff",
        "truncated before SOS": jpeg[:sof + 12],
        "12-bit JPEG": twelve_bit,
        "PNG bit depth 3": _with_ihdr(png, 120, 80, depth=3),
        "PNG of zero width": _with_ihdr(png, 0, 80),
        "PNG, IHDR checksum broken": png[:29] + bytes([png[29] ^ 1]) + png[30:],
        "GIF": _encode(_photo(20, 20), "GIF"),
        "BMP": _encode(_photo(20, 20), "BMP"),
        "WebP": _encode(_photo(20, 20), "WEBP"),
        "PNG with tRNS": _encode(_photo(8, 8).convert("P"), "PNG", transparency=0),
    }
    for name, data in odd.items():
        assert image_size(data) is None, name
        assert not header_fits(data, LIMIT) and not header_fits(data, 0), name
    for name in ("12-bit JPEG", "PNG bit depth 3", "PNG of zero width", "PNG, IHDR checksum broken"):
        with pytest.raises(Exception):
            _pil_size(odd[name])  # refused by PIL too: its error names the failure, as before


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def test_jpeg_segments_pil_refuses_fall_back_though_libjpeg_decodes_them():
    """Segments PIL's header reader refuses (the file is a corrupt_image for it) while libjpeg, which
    ignores their contents, decodes the file: a walker that only looked for the SOF would send these
    to torchvision and change the outcome. The header parser gives up on them, so PIL decides."""
    import torch
    from torchvision.io import decode_image as tv_decode

    base = _jpegs()["baseline 32x32"]
    refused = {
        "JFIF APP0 too short for its version": _segment(0xE0, b"JFIF\0"),
        "Adobe APP14 too short for its version": _segment(0xEE, b"Adobe"),
        "ICC_PROFILE APP2 without its count": _segment(0xE2, b"ICC_PROFILE\0\x01"),
        "Photoshop APP13 cut inside a resource": _segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04"),
        "TEM marker": b"\xff\x01",
    }
    for name, extra in refused.items():
        data = base[:2] + extra + base[2:]
        assert tuple(tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape) == (3, 32, 32), name
        with pytest.raises(Image.UnidentifiedImageError):
            _pil_size(data)
        assert image_size(data) is None, name
        with pytest.raises(Image.UnidentifiedImageError):
            training_data.decode_image(data, 32)
        assert not device_decode.within_limit(data, LIMIT), name  # to the CPU path, which names the error
    # segment lengths under 2 (PIL misreads them) and MPO headers (PIL parses them further): PIL decides
    for extra in (b"\xff\xfe\x00\x01", b"\xff\xfe\x00\x00", _segment(0xE2, b"MPF\0" + bytes(10))):
        data = base[:2] + extra + base[2:]
        assert image_size(data) is None and _pil_size(data) == (32, 32)
        assert training_data.decode_image(data, 32).shape == (3, 32, 32)


def _mutants(data: bytes, header_end: int) -> list[bytes]:
    """Every truncation of `data` up to a little past its header, and every byte of the header set
    to 0x00, 0xFF, and flipped in its top and bottom bits."""
    out = [data[:n] for n in range(min(len(data), header_end + 8))]
    for i in range(min(len(data), header_end)):
        for v in {0x00, 0xFF, data[i] ^ 0x80, data[i] ^ 0x01}:
            out.append(data[:i] + bytes([v]) + data[i + 1:])
    return out


def _outcome(fn, *args):
    try:
        out = fn(*args)
    except Exception as e:  # what the decoders' callers record: the failure's reason and detail
        return image_failure(e)
    return out.tobytes() if isinstance(out, np.ndarray) else out


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL on the damaged EXIF: "Corrupt EXIF data", ...
def test_damaged_headers_give_the_same_outcome_as_through_pil(monkeypatch):
    """Truncated and corrupted JPEG and PNG headers: where the header parses, PIL opens the bytes at
    the same size; and training's decoder and the device path's within_limit give exactly the
    outcome (pixels, or reason and detail) of their PIL header path (header_fits turned off).
    Training's decoder sees the JPEGs only: torchvision 0.29's PNG decoder crashes the process on a
    damaged IDAT (with or without the fast path: PIL opens those files, then hands them to it)."""
    jpeg = _encode(_photo(48, 40), "JPEG", exif=_exif(), icc_profile=_icc()[:200], comment=b"c", quality=60)
    png = _encode(_photo(24, 20).convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG")
    jpegs, pngs = _mutants(jpeg, jpeg.index(b"\xff\xda") + 14), _mutants(png, png.index(b"IDAT") + 4)
    parsed = 0
    for data in jpegs + pngs:
        size = image_size(data)
        if size is not None:
            parsed += 1
            assert size == _pil_size(data), data[:40]
    assert 0.1 < parsed / len(jpegs + pngs) < 0.9  # both paths exercised

    def outcomes():
        limits = (LIMIT, 48 * 40 - 1, 0)
        return ([_outcome(training_data.decode_image, d, 32, lim) for d in jpegs for lim in limits],
                [_outcome(device_decode.within_limit, d, lim) for d in jpegs + pngs for lim in limits])

    fast = outcomes()
    monkeypatch.setattr(training_data, "header_fits", lambda data, limit: False)
    monkeypatch.setattr(device_decode, "header_fits", lambda data, limit: False)
    assert fast == outcomes()
