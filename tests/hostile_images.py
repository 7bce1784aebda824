"""Hostile image bytes shared by the pipeline's and training's decoder tests."""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png_claiming(w: int, h: int) -> bytes:
    """A 1x1 PNG whose header claims w x h pixels (valid CRC): PIL reads the size from the header
    alone, so the pixel limits act on it without anyone decoding a huge image."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)
