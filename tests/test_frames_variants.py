"""The header checks that guard max_frame_pixels (frames.image_dimensions) against what OpenCV decodes.

Every variant of every accepted format is generated here (with OpenCV's encoders, Pillow and tifffile,
which come with scikit-image, or byte by byte from the format's specification) at a few sizes, and for
each one: the header's (width, height) equals the size OpenCV decodes, a limit of exactly width x height
decodes it, and a limit one pixel lower is refused with 413 before OpenCV is called. Files whose headers
lie are checked the same way: OpenCV decodes them at the size the header check reads, or not at all.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest

from appliance import frames
from appliance.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

REPO = Path(__file__).resolve().parent.parent
SIZES = [(1, 1), (37, 23), (640, 481)]


def opencv_size(data: bytes) -> tuple[int, int] | None:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return None if image is None else (image.shape[1], image.shape[0])


@contextmanager
def opencv_must_not_decode():
    def refuse(*args, **kwargs):
        raise AssertionError("OpenCV was asked to decode an image the header check should have refused")

    with mock.patch.object(frames.cv2, "imdecode", refuse), mock.patch.object(frames.cv2, "imdecodemulti", refuse):
        yield


def picture(width: int, height: int, channels: int = 3, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    top = 65535 if dtype == np.uint16 else 255
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, top, shape, dtype=dtype, endpoint=True)


def encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, image, params or [])
    assert ok
    return buffer.tobytes()


# JPEG

def jpeg_segments(data: bytes) -> list[bytes]:
    """SOI, each marker segment up to SOS, then SOS with the entropy-coded data and EOI as one piece."""
    pieces, position = [data[:2]], 2
    while data[position + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", data, position + 2)
        pieces.append(data[position:position + 2 + length])
        position += 2 + length
    pieces.append(data[position:])
    return pieces


def segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """APP1 Exif: IFD0 with no entries, IFD1 pointing at an embedded JPEG thumbnail (which has its own SOF)."""
    ifd1 = 8 + 6
    entries = struct.pack(">HHII", 0x0201, 4, 1, ifd1 + 2 + 24 + 4) + struct.pack(">HHII", 0x0202, 4, 1, len(thumbnail))
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">HI", 0, ifd1) + struct.pack(">H", 2) + entries
    return segment(0xE1, b"Exif\x00\x00" + tiff + b"\0\0\0\0" + thumbnail)


def pillow_jpeg(image: np.ndarray, mode: str | None = None, **options) -> bytes:
    from PIL import Image  # Pillow comes with scikit-image

    pil = Image.fromarray(image if image.ndim == 2 else image[:, :, ::-1].copy())
    if mode:
        pil = pil.convert(mode)
    out = io.BytesIO()
    pil.save(out, "JPEG", **options)
    return out.getvalue()


def jpeg_variants(width: int, height: int) -> dict[str, bytes]:
    color, gray = picture(width, height), picture(width, height, 1)
    sampling = {f"sampling {name}": [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{name}")]
                for name in ("411", "420", "422", "440", "444")}
    variants = {
        "baseline": encode(".jpg", color),
        "quality 100": encode(".jpg", color, [cv2.IMWRITE_JPEG_QUALITY, 100]),
        "progressive": encode(".jpg", color, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "optimized": encode(".jpg", color, [cv2.IMWRITE_JPEG_OPTIMIZE, 1]),
        "progressive optimized": encode(".jpg", color, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_OPTIMIZE, 1]),
        "grey": encode(".jpg", gray),
        "grey progressive": encode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "restart interval": encode(".jpg", color, [cv2.IMWRITE_JPEG_RST_INTERVAL, 1]),
        **{name: encode(".jpg", color, params) for name, params in sampling.items()},
        "CMYK (Adobe APP14)": pillow_jpeg(color, "CMYK", quality=90),
        "Pillow progressive": pillow_jpeg(color, progressive=True),
        "Pillow grey": pillow_jpeg(gray),
    }
    ok, exif = cv2.imencodeWithMetadata(".jpg", color, [cv2.IMAGE_METADATA_EXIF],
                                        [np.frombuffer(b"MM\x00*\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00", np.uint8)])
    assert ok
    variants["EXIF APP1 (OpenCV)"] = exif.tobytes()
    pieces = jpeg_segments(variants["baseline"])
    soi, jfif, tables, scan = pieces[0], pieces[1], pieces[2:-1], pieces[-1]
    assert jfif[:2] == b"\xff\xe0"
    thumbnail = encode(".jpg", np.full((120, 160, 3), 90, np.uint8))
    variants["no JFIF APP0"] = soi + b"".join(tables) + scan
    variants["EXIF thumbnail of another size"] = soi + jfif + exif_with_thumbnail(thumbnail) + b"".join(tables) + scan
    variants["ICC APP2, COM, APP15"] = (soi + jfif + segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + bytes(300))
                                       + segment(0xFE, b"made by a line camera") + segment(0xEF, bytes(10))
                                       + b"".join(tables) + scan)
    variants["fill bytes before markers"] = soi + b"".join(b"\xff\xff\xff" + piece for piece in [jfif, *tables, scan])
    # libjpeg skips (with a warning) bytes that are not markers between segments, stuffed FF 00 included.
    variants["junk between segments"] = soi + jfif + b"\x00\x12\xff\x00\x34" + b"".join(tables) + scan
    return variants


# PNG

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def packed_rows(image: np.ndarray, bits: int) -> list[bytes]:
    """One bytes object per row; 16-bit samples big-endian, samples below 8 bits packed leftmost first
    (as both PNG and BMP store them)."""
    rows = image.reshape(image.shape[0], -1)
    if bits == 16:
        rows = rows.astype(">u2").view(np.uint8).reshape(rows.shape[0], -1)
    elif bits < 8:
        per_byte = 8 // bits
        padded = np.zeros((rows.shape[0], -(-rows.shape[1] // per_byte) * per_byte), np.uint16)
        padded[:, :rows.shape[1]] = rows
        shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint16) * bits
        rows = (padded.reshape(rows.shape[0], -1, per_byte) << shifts).sum(axis=2).astype(np.uint8)
    return [row.tobytes() for row in rows]


def png_rows(image: np.ndarray, bits: int) -> bytes:
    """Scanlines with filter type 0."""
    return b"".join(b"\x00" + row for row in packed_rows(image, bits)) if image.size else b""


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def png(image: np.ndarray, color_type: int, bits: int, *, interlaced: bool = False, extra: bytes = b"") -> bytes:
    height, width = image.shape[:2]
    if interlaced:
        raw = b"".join(png_rows(image[y0::dy, x0::dx], bits) for x0, y0, dx, dy in ADAM7
                       if image[y0::dy, x0::dx].size)
    else:
        raw = png_rows(image, bits)
    ihdr = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, int(interlaced))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def png_variants(width: int, height: int) -> dict[str, bytes]:
    color, alpha, gray = picture(width, height), picture(width, height, 4), picture(width, height, 1)
    palette = png_chunk(b"PLTE", bytes(np.random.default_rng(2).integers(0, 256, 16 * 3, np.uint8)))
    indices = picture(width, height, 1) % 16
    variants = {
        "8-bit BGR": encode(".png", color),
        "8-bit BGRA": encode(".png", alpha),
        "8-bit grey": encode(".png", gray),
        "16-bit grey": encode(".png", picture(width, height, 1, np.uint16)),
        "16-bit BGR": encode(".png", picture(width, height, 3, np.uint16)),
        "16-bit BGRA": encode(".png", picture(width, height, 4, np.uint16)),
        "1-bit (bilevel)": encode(".png", gray, [cv2.IMWRITE_PNG_BILEVEL, 1]),
        "uncompressed": encode(".png", color, [cv2.IMWRITE_PNG_COMPRESSION, 0]),
        "Paeth filter, RLE strategy": encode(".png", color, [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH,
                                                             cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]),
        "grey+alpha 8-bit": png(picture(width, height, 2), 4, 8),
        "grey+alpha 16-bit": png(picture(width, height, 2, np.uint16), 4, 16),
        "2-bit grey": png(gray >> 6, 0, 2),
        "4-bit grey": png(gray >> 4, 0, 4),
        "palette 8-bit": png(indices, 3, 8, extra=palette),
        "palette 4-bit with tRNS": png(indices, 3, 4, extra=palette + png_chunk(b"tRNS", bytes(range(0, 160, 10)))),
        "palette 1-bit": png(indices & 1, 3, 1, extra=palette),
        "interlaced 8-bit RGB": png(color, 2, 8, interlaced=True),
        "interlaced 16-bit grey": png(picture(width, height, 1, np.uint16), 0, 16, interlaced=True),
        "interlaced palette 2-bit": png(indices & 3, 3, 2, interlaced=True, extra=palette),
    }
    ok, exif = cv2.imencodeWithMetadata(".png", color, [cv2.IMAGE_METADATA_EXIF],
                                        [np.frombuffer(b"MM\x00*\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00", np.uint8)])
    assert ok
    variants["eXIf chunk"] = exif.tobytes()
    animation = cv2.Animation()
    animation.frames, animation.durations = [color, color[::-1].copy()], [100, 100]
    ok, apng = cv2.imencodeanimation(".png", animation)
    assert ok
    variants["APNG (first frame)"] = apng.tobytes()
    return variants


# BMP

def bmp(image: np.ndarray, *, header: int = 40, bits: int = 24, top_down: bool = False, compression: int = 0,
        palette: np.ndarray | None = None, masks: tuple[int, int, int] | None = None) -> bytes:
    """A BMP with any header kind: 12 (BITMAPCOREHEADER, OS/2 1.x), 40 (INFO), 52/56 (V2/V3), 64 (OS/2 2.x),
    108 (V4), 124 (V5). `image` is BGR for 24/32 bits, palette indices for 1-8 bits, uint16 for 16 bits."""
    height, width = image.shape[:2]
    rows = image if top_down else image[::-1]
    if compression in (1, 2):  # RLE8 / RLE4: a run of one pixel each, end of line, end of bitmap
        encoded = bytearray()
        for row in rows.tolist():
            for value in row:
                encoded += bytes((1, value if compression == 1 else value << 4))
            encoded += b"\x00\x00"
        pixels = bytes(encoded[:-2]) + b"\x00\x01"
    else:
        stride = (width * bits + 31) // 32 * 4
        if bits < 8:
            lines = packed_rows(rows, bits)
        elif bits == 16:
            lines = [row.astype("<u2").tobytes() for row in rows]
        else:
            lines = [row.tobytes() for row in rows]
        pixels = b"".join(line.ljust(stride, b"\0") for line in lines)
    if header == 12:
        info = struct.pack("<IHHHH", 12, width, height, 1, bits)
        table = b"" if palette is None else palette[:, :3].tobytes()
    else:
        info = struct.pack("<IiiHHIIiiII", header, width, -height if top_down else height, 1, bits, compression,
                           len(pixels), 2835, 2835, 0 if palette is None else len(palette), 0)
        if header > 40:
            fields = struct.pack("<IIII", *(masks or (0, 0, 0)), 0xFF000000 if bits == 32 else 0)
            info += (fields + b"sRGB".ljust(header - 56 + 4, b"\0") if header > 56 else fields)[:header - 40]
        table = (masks and header == 40 and struct.pack("<III", *masks) or b"")
        table += b"" if palette is None else palette.tobytes()
    offset = 14 + len(info) + len(table)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + table + pixels


def bmp_variants(width: int, height: int) -> dict[str, bytes]:
    color = picture(width, height)
    indices = picture(width, height, 1)
    palette = np.zeros((256, 4), np.uint8)
    palette[:, :3] = np.random.default_rng(3).integers(0, 256, (256, 3))
    rgb555 = (picture(width, height, 1, np.uint16) & 0x7FFF).astype(np.uint16)
    rgb565 = picture(width, height, 1, np.uint16)
    variants = {
        "OpenCV 24-bit": encode(".bmp", color),
        "OpenCV 8-bit grey": encode(".bmp", indices),
        "OpenCV 32-bit BGRA (V5 header)": encode(".bmp", picture(width, height, 4)),
        "OpenCV 32-bit bitfields": encode(".bmp", picture(width, height, 4),
                                          [cv2.IMWRITE_BMP_COMPRESSION, cv2.IMWRITE_BMP_COMPRESSION_BITFIELDS]),
    }
    for header in (12, 40, 52, 56, 64, 108, 124):
        if header == 12 and width > 65535:
            continue  # 16-bit sizes
        variants[f"{header}-byte header 24-bit"] = bmp(color, header=header)
        variants[f"{header}-byte header 8-bit palette"] = bmp(indices, header=header, bits=8, palette=palette)
        if header != 12:
            variants[f"{header}-byte header top-down"] = bmp(color, header=header, top_down=True)
            variants[f"{header}-byte header 32-bit"] = bmp(picture(width, height, 4), header=header, bits=32)
    if width <= 65535:
        variants["core header 1-bit"] = bmp(indices & 1, header=12, bits=1, palette=palette[:2])
        variants["core header 4-bit"] = bmp(indices & 15, header=12, bits=4, palette=palette[:16])
    variants.update({
        "1-bit": bmp(indices & 1, bits=1, palette=palette[:2]),
        "4-bit": bmp(indices & 15, bits=4, palette=palette[:16]),
        "16-bit 555": bmp(rgb555, bits=16),
        "16-bit 565 bitfields": bmp(rgb565, bits=16, compression=3, masks=(0xF800, 0x07E0, 0x001F)),
        "RLE8": bmp(indices, bits=8, compression=1, palette=palette),
        "RLE4": bmp(indices & 15, bits=4, compression=2, palette=palette[:16]),
    })
    return variants


# TIFF

TIFF_KINDS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 16: "Q", 17: "q"}


def tiff(pages: list[np.ndarray], order: str = "<", *, kinds: dict[int, int] | None = None,
         extra: list[tuple[int, tuple[int, list[int]]]] | None = None, rows_per_strip: int | None = None) -> bytes:
    """An uncompressed strip TIFF written entry by entry: the types of ImageWidth/ImageLength (`kinds`, any
    of BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG, LONG8, SLONG8), either byte order, extra (even duplicate)
    entries appended after the sorted ones."""
    out = bytearray(b"II*\x00" if order == "<" else b"MM\x00*") + bytes(4)
    link = 4
    for image in pages:
        height, width = image.shape[:2]
        samples = 1 if image.ndim == 2 else image.shape[2]
        data = image[..., ::-1] if samples == 3 else image  # BGR -> RGB
        data = np.ascontiguousarray(data).astype(image.dtype.newbyteorder(order))
        rows = rows_per_strip or height
        offsets, counts = [], []
        for y in range(0, height, rows):
            offsets.append(len(out))
            chunk = data[y:y + rows].tobytes()
            counts.append(len(chunk))
            out += chunk + b"\0" * (len(chunk) % 2)
        entries = {256: ((kinds or {}).get(256, 4 if width > 65535 else 3), [width]),
                   257: ((kinds or {}).get(257, 4 if height > 65535 else 3), [height]),
                   258: (3, [image.dtype.itemsize * 8] * samples), 259: (3, [1]),
                   262: (3, [1 if samples == 1 else 2]), 273: (4, offsets), 277: (3, [samples]),
                   278: (4, [rows]), 279: (4, counts), 284: (3, [1])}
        if samples == 4:
            entries[338] = (3, [2])  # ExtraSamples: unassociated alpha
        items = sorted(entries.items()) + list(extra or [])
        ifd = len(out)
        struct.pack_into(order + "I", out, link, ifd)
        table, blobs = bytearray(struct.pack(order + "H", len(items))), bytearray()
        blob_base = ifd + 2 + 12 * len(items) + 4
        for tag, (kind, values) in items:
            raw = struct.pack(order + TIFF_KINDS[kind] * len(values), *values)
            if len(raw) <= 4:
                table += struct.pack(order + "HHI", tag, kind, len(values)) + raw.ljust(4, b"\0")
            else:
                table += struct.pack(order + "HHII", tag, kind, len(values), blob_base + len(blobs))
                blobs += raw + b"\0" * (len(raw) % 2)
        out += table
        link = len(out)
        out += bytes(4) + blobs
    return bytes(out)


def tifffile_bytes(image: np.ndarray, **options) -> bytes:
    import tifffile  # comes with scikit-image

    out = io.BytesIO()
    photometric = "minisblack" if image.ndim == 2 else "rgb"
    tifffile.imwrite(out, image, photometric=photometric, **options)
    return out.getvalue()


def tiff_variants(width: int, height: int) -> dict[str, bytes]:
    color, gray = picture(width, height), picture(width, height, 1)
    deep = picture(width, height, 3, np.uint16)
    compressions = {name: [cv2.IMWRITE_TIFF_COMPRESSION, getattr(cv2, f"IMWRITE_TIFF_COMPRESSION_{name}")]
                    for name in ("NONE", "LZW", "ADOBE_DEFLATE", "PACKBITS")}
    variants = {
        "OpenCV 8-bit BGR": encode(".tiff", color),
        "OpenCV 8-bit BGRA": encode(".tiff", picture(width, height, 4)),
        "OpenCV 8-bit grey": encode(".tiff", gray),
        "OpenCV 16-bit grey": encode(".tiff", picture(width, height, 1, np.uint16)),
        "OpenCV 16-bit BGR": encode(".tiff", deep),
        **{f"OpenCV {name}": encode(".tiff", color, params) for name, params in compressions.items()},
        "OpenCV one row per strip": encode(".tiff", color, [cv2.IMWRITE_TIFF_ROWSPERSTRIP, 1]),
        "big-endian 8-bit RGB": tifffile_bytes(color[..., ::-1], byteorder=">"),
        "big-endian 16-bit grey": tifffile_bytes(picture(width, height, 1, np.uint16), byteorder=">"),
        "big-endian deflate": tifffile_bytes(color[..., ::-1], byteorder=">", compression="zlib"),
        # OpenCV 5.0 with libtiff 4.7.1 cannot read uncompressed tiles ("Invalid tile byte count"): deflate tiles.
        "tiled deflate 8-bit": tifffile_bytes(color[..., ::-1], tile=(16, 16), compression="zlib"),
        "tiled deflate 16-bit big-endian": tifffile_bytes(deep[..., ::-1], tile=(32, 16), compression="zlib",
                                                          byteorder=">"),
        "planar (separate) RGB": tifffile_bytes(np.ascontiguousarray(color[..., ::-1].transpose(2, 0, 1)),
                                                planarconfig="separate"),
        "multi-page (first page)": cv2.imencodemulti(".tiff", [color, picture(3, 2, seed=5)])[1].tobytes(),
        "SHORT sizes": tiff([color]),
        "LONG sizes": tiff([color], kinds={256: 4, 257: 4}),
        "LONG sizes big-endian": tiff([color], ">", kinds={256: 4, 257: 4}),
        "signed LONG sizes big-endian": tiff([color], ">", kinds={256: 9, 257: 9}),
        "LONG8 sizes (stored at an offset)": tiff([color], kinds={256: 16, 257: 17}),
        "LONG8 sizes big-endian": tiff([color], ">", kinds={256: 16, 257: 16}),
        "16-bit grey big-endian, strips of 7 rows": tiff([picture(width, height, 1, np.uint16)], ">",
                                                          rows_per_strip=7),
    }
    if width < 128 and height < 128:
        variants["SSHORT width big-endian"] = tiff([color], ">", kinds={256: 8, 257: 8})
        variants["BYTE sizes big-endian"] = tiff([color], ">", kinds={256: 1, 257: 6})
    return variants


# WebP

def webp_variants(width: int, height: int) -> dict[str, bytes]:
    color, alpha = picture(width, height), picture(width, height, 4)
    variants = {
        "lossy (VP8)": encode(".webp", color, [cv2.IMWRITE_WEBP_QUALITY, 80]),
        "lossless (VP8L)": encode(".webp", color, [cv2.IMWRITE_WEBP_QUALITY, 101]),
        "lossy with alpha (VP8X + ALPH)": encode(".webp", alpha, [cv2.IMWRITE_WEBP_QUALITY, 80]),
        "lossless with alpha (VP8L)": encode(".webp", alpha, [cv2.IMWRITE_WEBP_QUALITY, 101]),
        "grey input": encode(".webp", picture(width, height, 1), [cv2.IMWRITE_WEBP_QUALITY, 80]),
    }
    ok, exif = cv2.imencodeWithMetadata(".webp", color, [cv2.IMAGE_METADATA_EXIF],
                                        [np.frombuffer(b"MM\x00*\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00", np.uint8)])
    assert ok
    variants["EXIF (VP8X)"] = exif.tobytes()
    animation = cv2.Animation()
    animation.frames, animation.durations = [color, color[::-1].copy()], [100, 100]
    ok, animated = cv2.imencodeanimation(".webp", animation)
    assert ok
    variants["animated (VP8X + ANIM, first frame)"] = animated.tobytes()
    return variants


GENERATORS: dict[str, Callable[[int, int], dict[str, bytes]]] = {
    "jpeg": jpeg_variants, "png": png_variants, "bmp": bmp_variants, "tiff": tiff_variants, "webp": webp_variants}
EXTRA_SIZES = {"png": [(70001, 2)], "bmp": [(70001, 2)], "tiff": [(70001, 2)], "jpeg": [(65500, 2)],
               "webp": [(16383, 2)]}
_CACHE: dict[tuple[str, int, int], dict[str, bytes]] = {}


def variants_of(fmt: str, width: int, height: int) -> dict[str, bytes]:
    key = (fmt, width, height)
    if key not in _CACHE:
        _CACHE[key] = GENERATORS[fmt](width, height)
    return _CACHE[key]


def cases() -> list:
    params = []
    for fmt in GENERATORS:
        for width, height in SIZES + EXTRA_SIZES[fmt]:
            for name in variants_of(fmt, width, height):
                params.append(pytest.param(fmt, width, height, name, id=f"{fmt}-{width}x{height}-{name}"))
    return params


def work_pixels(data: bytes, fmt: str, width: int, height: int) -> int:
    """The pixels OpenCV decodes at once: the image, or a whole TIFF tile when that is larger."""
    tile = frames._tiff_tile_size(data) if fmt == "tiff" else None
    return max(width * height, tile[0] * tile[1] if tile else 0)


def check_agreement(data: bytes, fmt: str, width: int, height: int) -> None:
    assert frames.sniff_image_format(data) == fmt
    assert opencv_size(data) == (width, height), "the generator did not make what OpenCV decodes"
    assert frames.image_dimensions(data, fmt) == (width, height)
    frame = frames.decode_image(data, max_frame_pixels=work_pixels(data, fmt, width, height))
    assert frame.image.shape[:2] == (height, width)
    with opencv_must_not_decode(), pytest.raises(PayloadTooLarge, match=rf"^image header claims {width}x{height} = "):
        frames.decode_image(data, max_frame_pixels=width * height - 1)


@pytest.mark.parametrize("fmt, width, height, name", cases())
def test_header_size_is_what_opencv_decodes(fmt, width, height, name):
    check_agreement(variants_of(fmt, width, height)[name], fmt, width, height)


def test_variants_cover_every_header_kind():
    """The generators really make the variants their names claim (a broken generator must not pass quietly)."""
    jpeg = variants_of("jpeg", 37, 23)
    assert b"\xff\xc2" in jpeg["progressive"] and b"\xff\xc2" not in jpeg["baseline"]
    assert jpeg["grey"][jpeg["grey"].index(b"\xff\xc0") + 9] == 1  # one component
    assert b"\xff\xdd" in jpeg["restart interval"] and b"Adobe" in jpeg["CMYK (Adobe APP14)"]
    png_files = variants_of("png", 37, 23)
    assert png_files["16-bit BGR"][24] == 16 and png_files["grey+alpha 8-bit"][25] == 4
    assert png_files["palette 4-bit with tRNS"][24:26] == b"\x04\x03" and png_files["interlaced 8-bit RGB"][28] == 1
    assert b"acTL" in png_files["APNG (first frame)"]
    bmp_files = variants_of("bmp", 37, 23)
    for header in (12, 40, 52, 56, 64, 108, 124):
        assert struct.unpack_from("<I", bmp_files[f"{header}-byte header 24-bit"], 14)[0] == header
    assert struct.unpack_from("<I", bmp_files["OpenCV 32-bit BGRA (V5 header)"], 14)[0] == 124
    assert struct.unpack_from("<i", bmp_files["40-byte header top-down"], 22)[0] == -23
    tiffs = variants_of("tiff", 37, 23)
    assert tiffs["big-endian 8-bit RGB"][:2] == b"MM" and tiffs["OpenCV 8-bit BGR"][:2] == b"II"
    webps = variants_of("webp", 37, 23)
    assert [webps[name][12:16] for name in ("lossy (VP8)", "lossless (VP8L)", "lossy with alpha (VP8X + ALPH)")] == [
        b"VP8 ", b"VP8L", b"VP8X"]
    assert b"ANIM" in webps["animated (VP8X + ANIM, first frame)"]


# Headers that lie

def small_sof(width: int, height: int) -> bytes:
    return segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")


def test_a_fake_frame_header_behind_stuffed_ff00_is_not_believed():
    """libjpeg reads FF 00 as stuffed data and skips non-marker bytes; reading 00 as a marker with a length
    jumped into an APP1 payload where a fake 8x8 frame header sat, while OpenCV decoded 400x300."""
    real = encode(".jpg", picture(400, 300))
    fake = small_sof(8, 8)
    app = segment(0xE1, b"X" * 10 + fake + b"pad!")
    attack = real[:2] + b"\xff\x00" + struct.pack(">H", 2 + 4 + 10) + app + real[2:]
    assert opencv_size(attack) == (400, 300)
    assert frames.image_dimensions(attack, "jpeg") == (400, 300)
    with opencv_must_not_decode(), pytest.raises(PayloadTooLarge):
        frames.decode_image(attack, max_frame_pixels=64)


def test_a_jpeg_thumbnail_or_second_frame_header_never_sets_the_size():
    main = encode(".jpg", picture(8, 8))
    big_thumbnail = encode(".jpg", np.full((300, 400, 3), 90, np.uint8))
    pieces = jpeg_segments(main)
    tagged = pieces[0] + exif_with_thumbnail(big_thumbnail) + b"".join(pieces[1:])
    assert opencv_size(tagged) == (8, 8) and frames.image_dimensions(tagged, "jpeg") == (8, 8)
    # A second SOF: libjpeg refuses the file, whichever header comes first.
    sof_at = next(i for i, piece in enumerate(pieces) if piece[:2] == b"\xff\xc0")
    two = b"".join(pieces[:sof_at + 1]) + small_sof(400, 300) + b"".join(pieces[sof_at + 1:])
    assert opencv_size(two) is None
    with pytest.raises(BadRequest):
        frames.decode_image(two, max_frame_pixels=10**6)


def test_jpeg_marker_search_is_bounded():
    """Junk, stuffed zeros and empty segments are skipped at C speed, and without end only up to a bound:
    a 100 MB body of them is refused at once instead of a Python loop over every byte."""
    real = encode(".jpg", picture(40, 30))
    assert real[2:4] == b"\xff\xe0" and real[4:6] == b"\x00\x10"  # junk goes after the 20-byte SOI + JFIF
    gap = real[:20] + b"\x00" * (1 << 16) + real[20:]
    assert opencv_size(gap) == (40, 30) and frames.image_dimensions(gap, "jpeg") is None  # refused: 400
    assert frames.image_dimensions(real[:20] + b"\x00" * 1000 + real[20:], "jpeg") == (40, 30)
    many = real[:2] + segment(0xFE, b"") * 10_001 + real[2:]
    assert frames.image_dimensions(many, "jpeg") is None
    for body in (b"\xff\x00" * 10_000_000, b"\xff\xd0" * 10_000_000, b"\xff\xe0\x00\x00" * 5_000_000):
        assert frames.image_dimensions(b"\xff\xd8" + body, "jpeg") is None


def test_os2_bitmap_core_header_was_read_as_a_huge_image():
    data = bmp(picture(37, 23), header=12)
    assert opencv_size(data) == (37, 23)
    assert frames.image_dimensions(data, "bmp") == (37, 23)  # was (1507365, 1572865): 413 for a valid file


@pytest.mark.parametrize("header", [0, 11, 13, 35])
def test_bmp_header_sizes_opencv_refuses_are_refused(header):
    data = bytearray(encode(".bmp", picture(8, 8)))
    struct.pack_into("<I", data, 14, header)
    assert opencv_size(bytes(data)) is None
    assert frames.image_dimensions(bytes(data), "bmp") is None


def test_negative_bmp_width_is_refused_like_opencv_does():
    data = bytearray(encode(".bmp", picture(8, 8)))
    struct.pack_into("<i", data, 18, -8)
    assert opencv_size(bytes(data)) is None and frames.image_dimensions(bytes(data), "bmp") is None


@pytest.mark.parametrize("order", ["<", ">"])
def test_the_first_of_duplicate_tiff_size_tags_counts(order):
    """libtiff ignores repeated tags; taking the last one let a 300-wide image claim 3."""
    image = picture(300, 5)
    for claimed in (3, 3000):
        data = tiff([image], order, extra=[(256, (3, [claimed]))])
        assert opencv_size(data) == (300, 5)
        assert frames.image_dimensions(data, "tiff") == (300, 5)


def test_a_long8_size_is_read_at_its_offset():
    """LONG8 values live at an offset even in classic TIFF (libtiff reads them there): the offset itself was
    taken as the width, so a 300x5 image whose width is stored at offset 8 claimed 8x5."""
    width, height = 300, 5
    pixels = picture(width, height, 1).tobytes()
    out = bytearray(b"II*\x00" + bytes(4)) + struct.pack("<Q", width) + pixels
    entries = [(256, 16, 1, 8), (257, 3, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 16), (277, 3, 1, 1), (278, 3, 1, height), (279, 4, 1, len(pixels))]
    struct.pack_into("<I", out, 4, len(out))
    out += struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    data = bytes(out)
    assert opencv_size(data) == (width, height)
    assert frames.image_dimensions(data, "tiff") == (width, height)
    with opencv_must_not_decode(), pytest.raises(PayloadTooLarge):
        frames.decode_image(data, max_frame_pixels=8 * 5)


@pytest.mark.parametrize("kind, count", [(3, 2), (13, 1), (18, 1), (5, 1), (11, 1)])
def test_tiff_size_types_libtiff_refuses_are_refused(kind, count):
    data = bytearray(tiff([picture(7, 5)]))
    ifd = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<HHI", data, ifd + 2, 256, kind, count)
    assert opencv_size(bytes(data)) is None
    assert frames.image_dimensions(bytes(data), "tiff") is None


def tiff_one_tile(side: int, width: int = 1, height: int = 1) -> bytes:
    """A tiny RGB image stored in one side x side deflate tile of zeros (a few hundred bytes per megapixel)."""
    tile = zlib.compress(bytes(side * side * 3), 9)
    out = bytearray(b"II*\x00" + bytes(4)) + tile
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 2), (277, 3, 3), (284, 3, 1),
               (322, 4, side), (323, 4, side), (324, 4, 8), (325, 4, len(tile))]
    struct.pack_into("<I", out, 4, len(out))
    out += struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                      for tag, kind, value in entries) + bytes(4)
    return bytes(out)


def test_a_tiff_tile_larger_than_the_limit_is_refused_before_decoding():
    """OpenCV decodes whole tiles: a 1x1 image in a 8192x8192 tile took 500 MB (a 16000x16000 one, 1.8 GB)."""
    small = tiff_one_tile(512)
    assert opencv_size(small) == (1, 1)
    assert frames.decode_image(small, max_frame_pixels=512 * 512).image.shape == (1, 1, 3)
    with opencv_must_not_decode(), pytest.raises(PayloadTooLarge, match=r"^TIFF tiles of 512x512 = 262144 pixels "
                                                                        r"are decoded whole; max_frame_pixels is 1000$"):
        frames.decode_image(small, max_frame_pixels=1000)
    with opencv_must_not_decode(), pytest.raises(PayloadTooLarge):
        frames.decode_image(tiff_one_tile(8192), max_frame_pixels=10**6)


def test_a_huge_second_tiff_page_is_never_decoded():
    """The multi-page warning used to decode page 2 (imdecodemulti) after only page 1 had been checked."""
    pages = [np.zeros((1, 1), np.uint8), np.zeros((2000, 2000), np.uint8)]
    data = tiff(pages)
    with mock.patch.object(frames.cv2, "imdecodemulti", side_effect=AssertionError("page 2 decoded")):
        frame = frames.decode_image(data, max_frame_pixels=1)
    assert frame.image.shape == (1, 1, 3) and frame.warnings == [frames.MULTI_FRAME_WARNING]


def riff(chunks: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


def vp8x(width: int, height: int, flags: int = 0) -> bytes:
    return (b"VP8X" + struct.pack("<I", 10) + bytes((flags, 0, 0, 0)) + (width - 1).to_bytes(3, "little")
            + (height - 1).to_bytes(3, "little"))


@pytest.mark.parametrize("quality", [80, 101])
@pytest.mark.parametrize("canvas", [(8, 8), (4000, 3000)])
def test_a_webp_canvas_that_differs_from_its_bitstream_is_not_decoded(quality, canvas):
    bitstream = encode(".webp", picture(400, 300), [cv2.IMWRITE_WEBP_QUALITY, quality])[12:]
    data = riff(vp8x(*canvas) + bitstream)
    assert opencv_size(data) is None
    assert frames.image_dimensions(data, "webp") == canvas
    with pytest.raises((BadRequest, PayloadTooLarge)):
        frames.decode_image(data, max_frame_pixels=canvas[0] * canvas[1])


def test_png_frames_and_headers_beyond_the_first_ihdr_do_not_change_the_size():
    real = encode(".png", picture(400, 300))
    second_ihdr = real[:8] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)) + real[8:]
    assert opencv_size(second_ihdr) is None
    # An APNG frame control chunk larger than the canvas: OpenCV refuses the file.
    fctl = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 4000, 3000, 0, 0, 1, 10, 0, 0))
    actl = png_chunk(b"acTL", struct.pack(">II", 2, 0))
    apng = real[:33] + actl + fctl + real[33:]
    assert opencv_size(apng) is None
    with pytest.raises(BadRequest):
        frames.decode_image(apng, max_frame_pixels=400 * 300)


def test_a_png_chunk_longer_than_the_body_is_refused_before_opencv_allocates_it():
    """OpenCV sized a buffer from the IDAT length field (2 GB here) before reading a 200-byte body."""
    data = bytearray(encode(".png", picture(21, 13)))
    idat = data.index(b"IDAT") - 4
    struct.pack_into(">I", data, idat, 0x7FFFFFF0)
    assert frames.image_dimensions(bytes(data), "png") == (21, 13)
    with opencv_must_not_decode(), pytest.raises(BadRequest, match="^PNG could not be decoded"):
        frames.decode_image(bytes(data), max_frame_pixels=10**6)
    # In an APNG OpenCV reads every chunk itself, frames after the first included.
    animation = cv2.Animation()
    animation.frames, animation.durations = [picture(21, 13), picture(21, 13, seed=1)], [100, 100]
    apng = bytearray(cv2.imencodeanimation(".png", animation)[1].tobytes())
    fdat = apng.index(b"fdAT") - 4
    assert frames.decode_image(bytes(apng), max_frame_pixels=21 * 13).image.shape == (13, 21, 3)
    struct.pack_into(">I", apng, fdat, 0x7FFFFFF0)
    with opencv_must_not_decode(), pytest.raises(BadRequest, match="^PNG could not be decoded"):
        frames.decode_image(bytes(apng), max_frame_pixels=10**6)


@pytest.mark.parametrize("pages", [1, 2])
def test_a_tiff_opencv_cannot_read_is_a_400_not_a_crash(pages):
    """imdecodemulti (used to count pages) raised cv2.error for a TIFF without PhotometricInterpretation."""
    data = bytearray(tiff([picture(7, 5, 1)] * pages))
    for _ in range(pages):
        at = data.index(struct.pack("<HHI", 262, 3, 1))
        struct.pack_into("<H", data, at, 263)  # Threshholding instead of PhotometricInterpretation
    with pytest.raises(BadRequest):
        frames.decode_image(bytes(data), max_frame_pixels=10**6)


def huge_claims() -> dict[str, bytes]:
    jpeg = encode(".jpg", picture(8, 8))
    sof = jpeg.index(b"\xff\xc0")
    bmp_file = bytearray(encode(".bmp", picture(8, 8)))
    struct.pack_into("<ii", bmp_file, 18, 60000, -60000)
    core = bytearray(bmp(picture(8, 8), header=12))
    struct.pack_into("<HH", core, 18, 65535, 65535)
    tiff_file = tiff([picture(8, 8)], kinds={256: 4, 257: 4})
    patched = bytearray(tiff_file)
    ifd = struct.unpack_from("<I", patched, 4)[0]
    struct.pack_into("<I", patched, ifd + 2 + 8, 100000)
    struct.pack_into("<I", patched, ifd + 14 + 8, 100000)
    return {
        "jpeg": jpeg[:sof + 5] + struct.pack(">HH", 65535, 65535) + jpeg[sof + 9:],
        "png": encode(".png", picture(8, 8))[:16] + struct.pack(">II", 100000, 100000),
        "bmp": bytes(bmp_file), "bmp core header": bytes(core), "tiff": bytes(patched),
        "webp": riff(vp8x(16384, 16384) + encode(".webp", picture(8, 8))[12:]),
    }


@pytest.mark.parametrize("name", list(huge_claims()))
def test_a_huge_claim_is_refused_without_decoding(name):
    data = huge_claims()[name]
    with opencv_must_not_decode(), pytest.raises(PayloadTooLarge, match=r"^image header claims \d+x\d+ = "):
        frames.decode_image(data, max_frame_pixels=33_554_432)


# Mutations: whatever OpenCV decodes from a damaged header, the header check must have read the same size.

FUZZ_LIMIT = 1 << 20  # OpenCV's own cap in the fuzz process, so a disagreement cannot take the machine's memory


def fuzz(rounds: int, seed: int = 11) -> list[dict]:
    """Mutate the first bytes of small variants of every format; report every file OpenCV decodes at
    another size than image_dimensions says, and every refusal of ours for a file OpenCV decodes."""
    rng = np.random.default_rng(seed)
    seeds = []
    for fmt in GENERATORS:
        for name, data in variants_of(fmt, 21, 13).items():
            seeds.append((fmt, name, data))
    problems = []
    for fmt, name, data in seeds:
        head = min(len(data), 96 if fmt != "tiff" else len(data))
        for _ in range(rounds):
            mutated = bytearray(data)
            for _ in range(int(rng.integers(1, 4))):
                position = int(rng.integers(0, head))
                mutated[position] = int(rng.integers(0, 256)) if rng.random() < 0.7 else mutated[position] ^ 1
            blob = bytes(mutated)
            if frames.sniff_image_format(blob) != fmt:
                continue
            claimed = frames.image_dimensions(blob, fmt)
            if claimed is None or fmt == "png" and not frames._png_chunks_fit(blob):
                continue  # refused before OpenCV sees it (and OpenCV might allocate what a length field says)
            try:
                decoded = opencv_size(blob)
            except cv2.error as error:  # OpenCV's header reader found more than FUZZ_LIMIT pixels
                if "validateInputImageSize" not in str(error):
                    raise
                if claimed[0] * claimed[1] <= FUZZ_LIMIT:
                    problems.append({"format": fmt, "variant": name, "opencv": "over its pixel cap",
                                     "header": claimed, "hex": blob[:64].hex()})
                continue
            if decoded is not None and claimed != decoded:
                problems.append({"format": fmt, "variant": name, "opencv": decoded, "header": claimed,
                                 "hex": blob[:64].hex()})
            if decoded is not None:
                limit = work_pixels(blob, fmt, *decoded)
                try:
                    frame = frames.decode_image(blob, max_frame_pixels=limit)
                    assert frame.image.shape[0] * frame.image.shape[1] <= limit
                except (BadRequest, UnsupportedMediaType):
                    pass  # our extra checks (truncated JPEG/PNG ends) may refuse what OpenCV reads
                except PayloadTooLarge as error:
                    problems.append({"format": fmt, "variant": name, "refused": str(error), "hex": blob[:64].hex()})
                except Exception as error:  # a 500: only our own errors may leave decode_image
                    problems.append({"format": fmt, "variant": name, "crashed": repr(error)[:200],
                                     "hex": blob[:64].hex()})
    return problems


def test_mutated_headers_agree_with_opencv():
    """In a child process where OpenCV itself refuses more than FUZZ_LIMIT pixels (the cap is read once,
    when cv2 loads), so a disagreement shows up as a failure here instead of a multi-gigabyte decode."""
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": str(FUZZ_LIMIT), "OPENCV_LOG_LEVEL": "SILENT"}
    code = "import json\nfrom tests.test_frames_variants import fuzz\nprint(json.dumps(fuzz(40)))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    problems = json.loads(result.stdout.strip().splitlines()[-1])
    assert problems == [], json.dumps(problems[:10], indent=1)
