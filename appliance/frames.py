"""Bytes -> Frame: encoded images, raw gray/BGR/BGRA pixels, Bayer RG8 mosaics and shared memory blocks.

Every check that protects the server happens before any large allocation: image dimensions are read from the
file header and compared with `max_frame_pixels` before decoding (RELIABILITY 3.5), raw sizes are checked
against width x height, and shared memory is copied with one `preadv` instead of being mapped (6.7).
EXIF orientation is deliberately ignored (IMREAD_UNCHANGED): rectangles refer to the stored pixel grid, as
machine-vision cameras deliver it (3.10).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from appliance.errors import BadRequest, Forbidden, PayloadTooLarge, UnsupportedMediaType

ColorMode = Literal["bgr", "gray"]
Bytes = bytes | bytearray | memoryview
SUPPORTED = "JPEG, PNG, BMP, TIFF, WebP"
MULTI_FRAME_WARNING = "multi-frame image: only frame 1 analysed"
# OpenCV names Bayer patterns after the second row: for an RGGB sensor (red top-left), the right code is
# COLOR_BayerRGGB2BGR, which equals COLOR_BayerBG2BGR. COLOR_BayerRG2BGR swaps red and blue (MODELS.md 3).
_BAYER_RGGB_TO_BGR = getattr(cv2, "COLOR_BayerRGGB2BGR", cv2.COLOR_BayerBG2BGR)
_SHM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


@dataclass
class Frame:
    image: np.ndarray
    source: str
    warnings: list[str] = field(default_factory=list)


def to_color_mode(image: np.ndarray, color: ColorMode) -> np.ndarray:
    if color == "bgr" and image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if color == "gray" and image.ndim == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return image


def sniff_image_format(data: Bytes) -> str | None:
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    return None


def _jpeg_size(data: Bytes) -> tuple[int, int] | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill bytes
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if position + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, position + 5)
            return width, height
        if length < 2:
            return None
        position += 2 + length
    return None


def _tiff_size(data: Bytes) -> tuple[int, int] | None:
    order = "<" if bytes(data[:2]) == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (count,) = struct.unpack_from(order + "H", data, ifd)
    found: dict[int, int] = {}
    for index in range(count):
        tag, kind, _, value = struct.unpack_from(order + "HHI4s", data, ifd + 2 + index * 12)
        if tag in (256, 257):  # ImageWidth, ImageLength
            found[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), value)[0]
    return (found[256], found[257]) if 256 in found and 257 in found else None


def _webp_size(data: Bytes) -> tuple[int, int] | None:
    chunk = bytes(data[12:16])
    if chunk == b"VP8X":
        w = int.from_bytes(bytes(data[24:27]), "little") + 1
        h = int.from_bytes(bytes(data[27:30]), "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(bytes(data[21:25]), "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    return None


def image_dimensions(data: Bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when the header cannot be read."""
    try:
        if fmt == "png":
            if bytes(data[12:16]) != b"IHDR":
                return None
            return struct.unpack_from(">II", data, 16)
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "bmp":
            width, height = struct.unpack_from("<ii", data, 18)
            return abs(width), abs(height)
        if fmt == "tiff":
            return _tiff_size(data)
        if fmt == "webp":
            return _webp_size(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _imcount_from_buffer(buffer: np.ndarray) -> int:
    ok, pages = cv2.imdecodemulti(buffer, cv2.IMREAD_UNCHANGED, range=(0, 2))
    return len(pages) if ok else 1


def decode_image(data: Bytes, *, max_frame_pixels: int, color: ColorMode = "bgr") -> Frame:
    if len(data) == 0:
        raise BadRequest("request body is empty; send a JPEG/PNG image")
    fmt = sniff_image_format(data)
    if fmt is None:
        raise UnsupportedMediaType(f"body is not a supported image ({SUPPORTED})")
    size = image_dimensions(data, fmt)
    if size is None:
        raise BadRequest(f"{fmt.upper()} header could not be read (truncated or corrupt)")
    width, height = size
    if width * height > max_frame_pixels:
        raise PayloadTooLarge(f"image header claims {width}x{height} = {width * height} pixels; "
                              f"max_frame_pixels is {max_frame_pixels}")
    if fmt == "jpeg" and b"\xff\xd9" not in bytes(data[-32:]):
        # libjpeg decodes a truncated file without an error and greys out the missing rows (3.2).
        raise BadRequest("truncated JPEG: end-of-image marker missing")
    if fmt == "png" and b"IEND" not in bytes(data[-16:]):
        raise BadRequest("PNG could not be decoded (truncated or corrupt)")
    buffer = np.frombuffer(data, np.uint8)
    warnings = []
    if fmt in ("tiff", "webp"):
        if fmt == "tiff" and _imcount_from_buffer(buffer) > 1 or fmt == "webp" and b"ANMF" in bytes(data[:65536]):
            warnings.append(MULTI_FRAME_WARNING)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise BadRequest(f"{fmt.upper()} could not be decoded (truncated or corrupt)")
    if image.dtype == np.uint16:
        image = np.right_shift(image, 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise UnsupportedMediaType(f"{fmt.upper()} with {image.dtype} samples is not supported; send 8 or 16 bits")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return Frame(to_color_mode(image, color), fmt, warnings)


def _size_message(prefix: str, length: int, width: int, height: int) -> str:
    return (f"{prefix} has {length} bytes; width {width} x height {height} needs {width * height} (gray) "
            f"or {width * height * 3} (BGR)")


def _pixels(buffer: Bytes | np.ndarray, width: int, height: int, source: str, color: ColorMode,
            what: str) -> Frame:
    flat = np.frombuffer(buffer, np.uint8) if not isinstance(buffer, np.ndarray) else buffer
    pixels = width * height
    channels, remainder = divmod(flat.size, pixels)
    if remainder or channels not in (1, 3, 4):
        raise BadRequest(_size_message(what, flat.size, width, height))
    image: np.ndarray
    if channels == 1:
        image = flat.reshape(height, width)
        kind = "gray"
    elif channels == 3:
        image = flat.reshape(height, width, 3)
        kind = "bgr"
    else:
        image = cv2.cvtColor(flat.reshape(height, width, 4), cv2.COLOR_BGRA2BGR)
        kind = "bgra"
    return Frame(to_color_mode(image, color), f"{source}-{kind}")


def demosaic_rggb(mosaic: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(mosaic, _BAYER_RGGB_TO_BGR)


def mosaic_rggb(bgr: np.ndarray) -> np.ndarray:
    """What an RGGB (Bayer RG8) sensor delivers for a BGR scene: red at even rows and columns, blue at odd ones.

    For tests, benchmarks and camera simulators; odd edges are cut, as Bayer frames have even sizes.
    """
    height, width = bgr.shape[0] & ~1, bgr.shape[1] & ~1
    mosaic = np.empty((height, width), np.uint8)
    mosaic[0::2, 0::2] = bgr[0:height:2, 0:width:2, 2]
    mosaic[0::2, 1::2] = bgr[0:height:2, 1:width:2, 1]
    mosaic[1::2, 0::2] = bgr[1:height:2, 0:width:2, 1]
    mosaic[1::2, 1::2] = bgr[1:height:2, 1:width:2, 0]
    return mosaic


def raw_frame(body: Bytes, width: int, height: int, *, bayer: bool, color: ColorMode = "bgr") -> Frame:
    if len(body) == 0:
        raise BadRequest("request body is empty; send raw BGR/gray bytes")
    if bayer:
        if width % 2 or height % 2:
            raise BadRequest(f"Bayer RG8 needs even width and height, got {width}x{height}")
        if len(body) != width * height:
            raise BadRequest(f"Bayer RG8 body has {len(body)} bytes; width {width} x height {height} "
                             f"needs {width * height}")
        mosaic = np.frombuffer(body, np.uint8).reshape(height, width)
        return Frame(to_color_mode(demosaic_rggb(mosaic), color), "bayer-rg8")
    return _pixels(body, width, height, "raw", color, "body")


def read_shared_memory(name: str, width: int, height: int, *, color: ColorMode = "bgr",
                       shm_dir: str = "/dev/shm") -> Frame:
    """Copy a client's block out with one preadv; never map it, keep it open or unlink it (RELIABILITY 6)."""
    bare = name[1:] if name.startswith("/") else name
    if not _SHM_NAME.fullmatch(bare) or bare in (".", ".."):
        raise BadRequest("invalid shared memory name")
    try:
        # O_NONBLOCK: opening a FIFO planted under the name would otherwise wait for a writer forever.
        fd = os.open(os.path.join(shm_dir, bare), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise BadRequest(f"shared memory segment '{bare}' not found") from None
        if error.errno == errno.EACCES:
            raise Forbidden(f"shared memory segment '{bare}' is not readable by the appliance user; "
                            "run the client as that user") from None
        raise BadRequest("invalid shared memory name") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest("invalid shared memory name")
        size = info.st_size
        pixels = width * height
        if size not in (pixels, pixels * 3, pixels * 4):
            raise BadRequest(_size_message(f"segment '{bare}'", size, width, height))
        buffer = np.empty(size, np.uint8)
        # A client may truncate its block at any time: a short read is an error, a mapping would be SIGBUS.
        read = os.preadv(fd, [buffer.data], 0)
        if read != size:
            raise BadRequest(_size_message(f"segment '{bare}'", read, width, height))
    finally:
        os.close(fd)
    return _pixels(buffer, width, height, "shm", color, f"segment '{bare}'")
