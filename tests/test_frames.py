"""frames.py on real encoded files, raw buffers and shared memory blocks (RELIABILITY 2-4 and 6)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from multiprocessing import shared_memory

import cv2
import numpy as np
import pytest

from appliance import frames
from appliance.errors import BadRequest, Forbidden, PayloadTooLarge, UnsupportedMediaType

LIMIT = 33_554_432


def encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buffer = cv2.imencode(ext, image, params or [])
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize("ext, fmt", [(".png", "png"), (".jpg", "jpeg"), (".bmp", "bmp"), (".tiff", "tiff"),
                                      (".webp", "webp")])
@pytest.mark.parametrize("size", [(37, 23), (640, 481), (1, 1)])
def test_dimensions_come_from_the_header_of_every_format(ext, fmt, size):
    width, height = size
    image = np.random.default_rng(1).integers(0, 255, (height, width, 3), np.uint8)
    data = encode(ext, image)
    assert frames.sniff_image_format(data) == fmt
    assert frames.image_dimensions(data, fmt) == (width, height)
    decoded = frames.decode_image(data, max_frame_pixels=LIMIT)
    assert decoded.image.shape == (height, width, 3) and decoded.source == fmt


def test_lossless_webp_header_is_read_too():
    image = np.zeros((33, 65, 3), np.uint8)
    data = encode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert data[12:16] == b"VP8L"
    assert frames.image_dimensions(data, "webp") == (65, 33)


def test_garbage_headers_never_raise_anything_but_our_errors():
    rng = np.random.default_rng(7)
    seeds = [encode(ext, np.zeros((20, 30, 3), np.uint8)) for ext in (".png", ".jpg", ".bmp", ".tiff", ".webp")]
    for seed in seeds:
        for _ in range(60):
            mutated = bytearray(seed[: rng.integers(4, len(seed) + 1)])
            for _ in range(rng.integers(0, 6)):
                if len(mutated) > 8:
                    mutated[rng.integers(8, len(mutated))] = rng.integers(0, 256)
            try:
                frames.decode_image(bytes(mutated), max_frame_pixels=LIMIT)
            except (BadRequest, PayloadTooLarge, UnsupportedMediaType):
                pass


def test_png_bomb_is_refused_from_its_header_without_decoding():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))
    # The file has no pixel data at all (no IDAT): a decoder would fail otherwise; this answer is the header's.
    with pytest.raises(PayloadTooLarge, match=r"^image header claims 100000x100000 = 10000000000 pixels; "
                                              r"max_frame_pixels is 33554432$"):
        frames.decode_image(bomb, max_frame_pixels=LIMIT)


def test_16_bit_ramps_become_8_bit_ramps():
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(1, 256)  # 0, 257, ..., 65535
    gray = frames.decode_image(encode(".png", ramp), max_frame_pixels=LIMIT, color="gray").image
    assert gray.dtype == np.uint8 and gray[0].tolist() == list(range(256))
    rgb = np.dstack([ramp, ramp, ramp])
    bgr = frames.decode_image(encode(".png", rgb), max_frame_pixels=LIMIT).image
    assert bgr.dtype == np.uint8 and bgr[0, :, 1].tolist() == list(range(256))


def test_alpha_is_dropped_without_compositing():
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., :3] = (10, 20, 30)
    bgra[..., 3] = 0  # fully transparent: the colour must stay as stored
    image = frames.decode_image(encode(".png", bgra), max_frame_pixels=LIMIT).image
    assert image.shape == (4, 4, 3) and image[0, 0].tolist() == [10, 20, 30]


def test_grayscale_images_follow_the_colour_mode():
    gray = np.full((8, 8), 77, np.uint8)
    data = encode(".jpg", gray)
    assert frames.decode_image(data, max_frame_pixels=LIMIT).image.shape == (8, 8, 3)
    assert frames.decode_image(data, max_frame_pixels=LIMIT, color="gray").image.shape == (8, 8)


def test_exif_orientation_is_ignored():
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = 255
    plain = encode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    # An APP1 Exif segment with Orientation = 6 (rotate 90 degrees), inserted after SOI.
    tiff = b"MM\x00*\x00\x00\x00\x08" + b"\x00\x01" + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\x00\x00\x00\x00"
    payload = b"Exif\x00\x00" + tiff
    tagged = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + plain[2:]
    assert cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (40, 20)  # OpenCV would turn it
    decoded = frames.decode_image(tagged, max_frame_pixels=LIMIT).image
    assert np.array_equal(decoded, frames.decode_image(plain, max_frame_pixels=LIMIT).image)


def test_multi_page_tiff_analyses_the_first_page_with_a_warning():
    pages = [np.full((10, 12, 3), value, np.uint8) for value in (50, 200)]
    ok, data = cv2.imencodemulti(".tiff", pages)
    assert ok
    frame = frames.decode_image(data.tobytes(), max_frame_pixels=LIMIT)
    assert frame.warnings == ["multi-frame image: only frame 1 analysed"]
    assert frame.image[0, 0].tolist() == [50, 50, 50]


def test_single_page_tiff_has_no_warning():
    assert frames.decode_image(encode(".tiff", np.zeros((5, 5, 3), np.uint8)), max_frame_pixels=LIMIT).warnings == []


def test_cmyk_jpeg_gets_its_colour(tmp_path):
    from PIL import Image  # Pillow comes with scikit-image; it writes Adobe CMYK JPEGs

    orange = Image.new("RGB", (16, 16), (255, 128, 0)).convert("CMYK")
    target = tmp_path / "orange.jpg"
    orange.save(target, "JPEG", quality=95)
    assert target.read_bytes().find(b"Adobe") > 0
    image = frames.decode_image(target.read_bytes(), max_frame_pixels=LIMIT).image
    assert np.abs(image[8, 8].astype(int) - (0, 128, 255)).max() <= 8, image[8, 8]


def test_gif_is_not_supported():
    with pytest.raises(UnsupportedMediaType):
        frames.decode_image(b"GIF89a" + b"\0" * 100, max_frame_pixels=LIMIT)


def test_raw_bgr_is_a_view_of_the_body():
    body = bytearray(np.arange(4 * 3 * 3, dtype=np.uint8).tobytes())
    frame = frames.raw_frame(body, 4, 3, bayer=False)
    assert frame.source == "raw-bgr"
    assert np.shares_memory(frame.image, np.frombuffer(body, np.uint8))


def test_demosaic_puts_red_top_left_for_rggb():
    mosaic = np.zeros((8, 8), np.uint8)
    mosaic[0::2, 0::2] = 255  # only the red sites lit
    image = frames.demosaic_rggb(mosaic)
    centre = image[4, 4].astype(int)
    assert centre[2] > 200 and centre[0] < 50, f"red and blue swapped: {centre.tolist()}"


# Shared memory

@pytest.fixture
def block():
    image = np.random.default_rng(3).integers(0, 255, (48, 64, 3), np.uint8)
    segment = shared_memory.SharedMemory(create=True, size=image.nbytes)
    np.ndarray(image.shape, np.uint8, buffer=segment.buf)[:] = image
    yield segment, image
    segment.close()
    try:
        segment.unlink()
    except FileNotFoundError:
        pass


def open_descriptors_to(name: str) -> list[str]:
    fd_dir = "/proc/self/fd"
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:
            pass
    return [t for t in targets if name in t]


def test_shared_memory_is_copied_out_and_left_in_place(block):
    segment, image = block
    before = len(open_descriptors_to(segment.name))
    frame = frames.read_shared_memory(segment.name, 64, 48)
    assert np.array_equal(frame.image, image) and frame.source == "shm-bgr"
    assert not np.shares_memory(frame.image, np.ndarray(image.shape, np.uint8, buffer=segment.buf))
    assert os.path.exists(f"/dev/shm/{segment.name}")
    assert len(open_descriptors_to(segment.name)) == before  # our own mapping only; the reader closed its fd
    assert np.array_equal(frames.read_shared_memory("/" + segment.name, 64, 48).image, image)


@pytest.mark.parametrize("channels", [1, 3])
def test_shared_memory_frames_start_on_a_page_boundary_whatever_was_allocated_before(channels):
    # preadv into an address 16 bytes into a page (numpy's own) took 4-5x the CPU of a page-aligned one here.
    shape = (1080, 1920) if channels == 1 else (1080, 1920, 3)
    image = np.random.default_rng(7).integers(0, 256, shape, np.uint8)
    segment = shared_memory.SharedMemory(create=True, size=image.nbytes)
    try:
        np.ndarray(image.shape, np.uint8, buffer=segment.buf)[:] = image
        for odd_size in (1, 17, 4095, 100_003):
            np.empty(odd_size, np.uint8)  # whatever the allocator hands out next, the frame is aligned
            frame = frames.read_shared_memory(segment.name, 1920, 1080, color="gray" if channels == 1 else "bgr")
            assert frame.image.ctypes.data % 4096 == 0
            assert frame.image.flags.c_contiguous and frame.image.flags.writeable
            assert np.array_equal(frame.image, image)
    finally:
        segment.close()
        segment.unlink()


def test_symlink_directory_and_fifo_are_refused(tmp_path, block):
    segment, _ = block
    (tmp_path / "link").symlink_to(f"/dev/shm/{segment.name}")
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "dir", "fifo"):
        with pytest.raises(BadRequest, match="^invalid shared memory name$"):
            frames.read_shared_memory(name, 64, 48, shm_dir=str(tmp_path))


def test_truncated_segment_gives_a_size_error_not_a_crash(block):
    segment, _ = block
    os.truncate(f"/dev/shm/{segment.name}", 1000)
    with pytest.raises(BadRequest, match=rf"^segment '{segment.name}' has 1000 bytes; width 64 x height 48 needs "
                                         r"3072 \(gray\) or 9216 \(BGR\)$"):
        frames.read_shared_memory(segment.name, 64, 48)


def test_segment_unlinked_during_the_read_still_reads(block):
    segment, image = block
    unlinked = threading.Event()
    original_open = os.open

    def open_then_unlink(path, flags, *args):
        fd = original_open(path, flags, *args)
        segment.unlink()
        unlinked.set()
        return fd

    os.open = open_then_unlink
    try:
        frame = frames.read_shared_memory(segment.name, 64, 48)
    finally:
        os.open = original_open
    assert unlinked.is_set() and np.array_equal(frame.image, image)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_segment_of_another_user_is_403(block):
    segment, _ = block
    os.chmod(f"/dev/shm/{segment.name}", 0o600)
    code = ("from appliance import frames\n"
            "from appliance.errors import Forbidden\n"
            f"try:\n    frames.read_shared_memory('{segment.name}', 64, 48)\n"
            "except Forbidden as e:\n    print(e.status, e.message)\n")
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    path = f"/dev/shm/{segment.name}"
    assert result.stdout.strip() == (
        f"403 shared memory segment '{segment.name}' (owner root, mode 0600) is not readable by the appliance (user "
        f"nobody, not in group appliance-cameras): run the camera script as user nobody, or give the service "
        f"SupplementaryGroups=appliance-cameras and make the block readable by that group, as `chgrp "
        f"appliance-cameras {path} && chmod 0640 {path}` does (docs/systemd.md, \"Camera scripts of another user\")"
    ), result.stderr
    assert Forbidden.status == 403
