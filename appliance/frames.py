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
import sys
import threading
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


# SOFn markers that libjpeg-turbo decodes (baseline, extended, progressive, lossless; Huffman or arithmetic).
# SOF5-7, SOF13-15 and JPG are refused by libjpeg; a second SOI, EOI or SOS before the frame header end the search.
_JPEG_SOF_DECODED = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB))
_JPEG_TABLES = frozenset((0xC4, 0xCC, 0xDB, 0xDD))  # DHT, DAC, DQT, DRI: libjpeg errors on a length below 2
_JPEG_SKIPPED = frozenset((*range(0xE0, 0xF0), 0xFE, 0xDC))  # APPn, COM, DNL: skipped by their length
# The next marker with a length: fill bytes, stuffed FF 00, TEM and RSTn are passed over at C speed.
_JPEG_NEXT_MARKER = re.compile(rb"\xff+[^\x00\x01\xd0-\xd7\xff]")
_JPEG_MAX_SEGMENTS = 10_000  # before the frame header; real files have a few dozen
_JPEG_MAX_GAP = 1 << 16  # bytes between two segments; real files have none, a few after a broken writer


def _jpeg_size(data: Bytes) -> tuple[int, int] | None:
    """The frame header libjpeg reads, found the way its marker reader finds it (jdmarker.c next_marker).

    libjpeg skips any bytes that are not 0xFF between segments (with a warning), 0xFF fill bytes and
    stuffed FF 00 pairs; reading such bytes as a segment length instead would let a file hide its real
    frame header behind a small fake one. More than 64 KiB of them, or 10000 segments, is refused (libjpeg
    would read on) to keep this check fast on any body.
    """
    view = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    position = 2
    for _ in range(_JPEG_MAX_SEGMENTS):
        found = _JPEG_NEXT_MARKER.search(view, position, position + _JPEG_MAX_GAP)
        if found is None:
            return None
        marker = view[found.end() - 1]
        position = found.end()
        if position + 2 > len(view):
            return None
        (length,) = struct.unpack_from(">H", view, position)
        if marker in _JPEG_SOF_DECODED:
            if position + 7 > len(view):
                return None
            height, width = struct.unpack_from(">HH", view, position + 3)
            return (width, height) if width and height else None
        if marker in _JPEG_TABLES:
            if length < 2:
                return None
            position += length
        elif marker in _JPEG_SKIPPED:
            position += max(length, 2)  # a length below 2 skips only the length bytes
        else:  # SOI again, EOI, SOS before any frame header, unsupported SOFn, unknown markers: libjpeg fails
            return None
    return None


_TIFF_UINT32_KINDS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q"}


def _tiff_ifd(data: Bytes, order: str, offset: int, tags: tuple[int, ...]) -> dict[int, int] | None:
    """Unsigned 32-bit tags of one IFD read as libtiff reads them (TIFFReadDirEntryLong): the first of
    duplicate tags counts, a count other than 1 or a type other than BYTE, SHORT, LONG, their signed forms
    and the 8-byte LONG8/SLONG8 (stored at an offset even in classic TIFF) is an error, as is a negative
    value, and fails the whole directory (None)."""
    (count,) = struct.unpack_from(order + "H", data, offset)
    found: dict[int, int] = {}
    bad: set[int] = set()  # libtiff fails the directory on the first bad entry of a tag it needs
    for index in range(count):
        entry = offset + 2 + index * 12
        tag, kind, number = struct.unpack_from(order + "HHI", data, entry)
        if tag not in tags or tag in found or tag in bad:
            continue
        code = _TIFF_UINT32_KINDS.get(kind)
        if code is None or number != 1:
            bad.add(tag)
            continue
        where = entry + 8
        if struct.calcsize(code) > 4:
            (where,) = struct.unpack_from(order + "I", data, entry + 8)
        (value,) = struct.unpack_from(order + code, data, where)
        if 0 <= value <= 0xFFFFFFFF:
            found[tag] = value
        else:
            bad.add(tag)
    return None if bad else found


def _tiff_order(data: Bytes) -> str:
    return "<" if bytes(data[:2]) == b"II" else ">"


def _tiff_size(data: Bytes) -> tuple[int, int] | None:
    order = _tiff_order(data)
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    found = _tiff_ifd(data, order, ifd, (256, 257))  # ImageWidth, ImageLength
    if not found or not found.get(256) or not found.get(257):
        return None
    return found[256], found[257]


def _tiff_tile_size(data: Bytes) -> tuple[int, int] | None:
    """(TileWidth, TileLength) of the first page of a tiled TIFF, else None.

    OpenCV decodes a tiled TIFF one whole tile at a time (libtiff's tile buffer plus a 4-byte RGBA copy),
    so a 1x1 image with a 16000x16000 deflate tile of zeros would take about 1.8 GB.
    """
    try:
        order = _tiff_order(data)
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        found = _tiff_ifd(data, order, ifd, (256, 257, 322, 323))  # + TileWidth, TileLength
    except (struct.error, IndexError, ValueError):
        return None
    if not found or (322 not in found and 323 not in found):
        return None
    return found.get(322) or found.get(256, 0), found.get(323) or found.get(257, 0)


def _tiff_has_second_page(data: Bytes) -> bool:
    """A second IFD with at least one entry, found without decoding anything."""
    try:
        order = _tiff_order(data)
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        (following,) = struct.unpack_from(order + "I", data, ifd + 2 + 12 * count)
        if following in (0, ifd):
            return False
        (entries,) = struct.unpack_from(order + "H", data, following)
        return entries > 0
    except (struct.error, IndexError, ValueError):
        return False


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


def _bmp_size(data: Bytes) -> tuple[int, int] | None:
    """As OpenCV's own BMP reader: a 12-byte BITMAPCOREHEADER (OS/2) has 16-bit unsigned sizes, every
    header of 36 bytes or more (INFO, V2-V5, OS/2 2.x) 32-bit signed ones; a negative height is a
    top-down image, a width that is not positive and other header sizes are refused."""
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:
        width, height = struct.unpack_from("<HH", data, 18)
    elif 36 <= header < 1 << 31:
        width, height = struct.unpack_from("<ii", data, 18)
    else:
        return None
    if width <= 0 or height in (0, -(1 << 31)):
        return None
    return width, abs(height)


_PNG_MAX_CHUNKS = 100_000


def _png_chunks_fit(data: Bytes) -> bool:
    """Every chunk OpenCV reads by itself (those before the image data; all of them in an APNG) fits in
    the body. OpenCV copies such a chunk into a buffer of the size its length field claims before finding
    out that the body is shorter: a 200-byte PNG whose IDAT length says 2 GB made it allocate and zero 2 GB.
    """
    position, end, animated = 8, len(data), False
    for _ in range(_PNG_MAX_CHUNKS):
        if position + 12 > end:
            return False
        length, kind = struct.unpack_from(">I4s", data, position)
        position += 12 + length
        if position > end:
            return False
        if kind == b"acTL":
            animated = True
        elif kind == b"IEND" or kind == b"IDAT" and not animated:
            return True
    return False


def image_dimensions(data: Bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when the header cannot be read."""
    try:
        if fmt == "png":
            if bytes(data[12:16]) != b"IHDR" or struct.unpack_from(">I", data, 8)[0] != 13:
                return None
            return struct.unpack_from(">II", data, 16)
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "bmp":
            return _bmp_size(data)
        if fmt == "tiff":
            return _tiff_size(data)
        if fmt == "webp":
            return _webp_size(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


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
    tile = _tiff_tile_size(data) if fmt == "tiff" else None
    if tile is not None and tile[0] * tile[1] > max_frame_pixels:
        raise PayloadTooLarge(f"TIFF tiles of {tile[0]}x{tile[1]} = {tile[0] * tile[1]} pixels are decoded whole; "
                              f"max_frame_pixels is {max_frame_pixels}")
    if fmt == "jpeg" and b"\xff\xd9" not in bytes(data[-32:]):
        # libjpeg decodes a truncated file without an error and greys out the missing rows (3.2).
        raise BadRequest("truncated JPEG: end-of-image marker missing")
    if fmt == "png" and (b"IEND" not in bytes(data[-16:]) or not _png_chunks_fit(data)):
        raise BadRequest("PNG could not be decoded (truncated or corrupt)")
    buffer = np.frombuffer(data, np.uint8)
    warnings = []
    if fmt in ("tiff", "webp"):
        # Pages are counted from the IFD chain: decoding page 2 to count it would bypass max_frame_pixels.
        if fmt == "tiff" and _tiff_has_second_page(data) or fmt == "webp" and b"ANMF" in bytes(data[:65536]):
            warnings.append(MULTI_FRAME_WARNING)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error:  # some checks of OpenCV's readers raise instead of failing (validateInputImageSize)
        image = None
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


# The group that camera scripts of other users share their blocks with (docs/systemd.md, "Camera scripts of another
# user"): the install creates it, the unit gives it to the service with SupplementaryGroups=.
CAMERA_GROUP = "appliance-cameras"


def _unreadable_block_message(bare: str, path: str) -> str:
    """What the client must do so that the appliance can read its block: the 403 of read_shared_memory."""
    import grp
    import pwd

    def user(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"uid {uid}"

    try:
        info = os.lstat(path)
        block = f" (owner {user(info.st_uid)}, mode {stat.S_IMODE(info.st_mode):04o})"
    except OSError:
        block = ""
    fix = f"chgrp {CAMERA_GROUP} {path} && chmod 0640 {path}"
    try:
        member = grp.getgrnam(CAMERA_GROUP).gr_gid in (os.getegid(), *os.getgroups())
    except KeyError:
        member = False
    me = user(os.geteuid())
    if member:
        return (f"shared memory segment '{bare}'{block} is not readable by the appliance (user {me}, group "
                f"{CAMERA_GROUP}): the camera script must make it readable by group {CAMERA_GROUP} right after "
                f"creating it, as `{fix}` does (docs/systemd.md, \"Camera scripts of another user\")")
    return (f"shared memory segment '{bare}'{block} is not readable by the appliance (user {me}, not in group "
            f"{CAMERA_GROUP}): run the camera script as user {me}, or give the service SupplementaryGroups="
            f"{CAMERA_GROUP} and make the block readable by that group, as `{fix}` does (docs/systemd.md, "
            "\"Camera scripts of another user\")")


PAGE = 4096


def page_aligned(size: int) -> np.ndarray:
    """An uninitialised uint8 buffer that starts on a page boundary, for the kernel to copy a frame into.

    numpy's own buffers start 16 bytes into a page (malloc's header), and the kernel's copy into such an address
    is slow on this AMD EPYC: preadv of a 6.2 MB block took 4.3-5.3 ms of CPU into a reused numpy buffer against
    0.75-1.4 ms into the same memory at a page boundary (/dev/shm block, thread CPU time, median of 300)."""
    raw = np.empty(size + PAGE, np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start:start + size]


class FrameBuffers:
    """Page-aligned buffers for shared-memory frames, each used again once nothing refers to its memory.

    Every numpy view of a frame (a crop, a reshape, the context the server keeps for /last_image, a frame an
    observer or a Code hook keeps) refers to the array that owns the memory, and so does every memoryview of
    one: when the pool's own reference is the only one left, no frame in use can be overwritten. That is the
    moment at which, without the pool, the memory would go back to malloc for the next frame's np.empty to take.

    Two buffers taking turns stay in the cache, where fresh allocations wander over more memory: on the 2-core
    development machine, 1 client sending 1920x1080 blocks, the server's CPU per request fell by 0.4-1.4 ms
    (3 paired runs of 16 alternating bursts against the same code allocating each frame, 2026-11-30, shared
    cores at load 4-6; the copy alone, in two threads taking turns, gained 4 %)."""

    def __init__(self, keep: int, largest: int):
        self._keep = keep  # one frame kept by the server (its last context) and one being read, for one client
        self._largest = largest
        self._entries: list[tuple[np.ndarray, int, int]] = []  # (owning array, offset of the page, size)
        self._lock = threading.Lock()
        # The count that means "only the pool": calibrated here through the same call, so that a Python whose
        # reference counting differs cannot make a frame in use look free. If a view does not raise the count,
        # nothing can be proven and every frame gets new memory.
        probe = [(np.empty(1, np.uint8), 0, 1)]
        alone = self._references(probe, 0)
        view = probe[0][0][:]
        seen = self._references(probe, 0)
        del view
        self._unused: int | None = alone if seen > alone else None

    @staticmethod
    def _references(entries: list[tuple[np.ndarray, int, int]], index: int) -> int:
        return sys.getrefcount(entries[index][0])

    def take(self, size: int) -> np.ndarray:
        """A buffer of ``size`` bytes nobody else refers to, at a page boundary."""
        if size > self._largest or self._unused is None:
            return page_aligned(size)
        with self._lock:
            free = [index for index in range(len(self._entries))
                    if self._references(self._entries, index) == self._unused]
            for index in free:
                owner, start, length = self._entries[index]
                if length == size:
                    return owner[start:start + size]
            owner = np.empty(size + PAGE, np.uint8)
            start = -owner.ctypes.data % PAGE
            if len(self._entries) < self._keep:
                self._entries.append((owner, start, size))
            elif free:  # a client changed its frame size: follow it
                self._entries[free[0]] = (owner, start, size)
            return owner[start:start + size]


# Frames up to 32 MiB (a 4K BGR frame) are kept for the next request; larger ones, once done, go back to the
# system as malloc hands back such blocks (its mmap threshold is at most 32 MiB on 64-bit glibc).
SHARED_MEMORY_BUFFERS = FrameBuffers(keep=2, largest=32 << 20)


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
            raise Forbidden(_unreadable_block_message(bare, os.path.join(shm_dir, bare))) from None
        raise BadRequest("invalid shared memory name") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest("invalid shared memory name")
        size = info.st_size
        pixels = width * height
        if size not in (pixels, pixels * 3, pixels * 4):
            raise BadRequest(_size_message(f"segment '{bare}'", size, width, height))
        buffer = SHARED_MEMORY_BUFFERS.take(size)
        # A client may truncate its block at any time: a short read is an error, a mapping would be SIGBUS.
        read = os.preadv(fd, [buffer.data], 0)
        if read != size:
            raise BadRequest(_size_message(f"segment '{bare}'", read, width, height))
    finally:
        os.close(fd)
    return _pixels(buffer, width, height, "shm", color, f"segment '{bare}'")
