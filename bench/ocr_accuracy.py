"""ocr@1 accuracy and speed on rendered labels of known text, and the flow over HTTP against in-process.

Each label is a white card on a grey part with three lines (lot number, serial number, date code) in an
OpenCV Hershey font, then degraded per condition (small text, rotation, Gaussian noise, blur). The labels
are seeded, so every run reads the same images. Per condition: character accuracy (1 - edit distance /
length, per line, at least 0; each true line is compared with the read row closest to it), exact lines,
and the time per label in-process (median, one thread).

The second table (with --speed) runs the same flow on one label: each model alone (AsyncInferQueue, the
`bench/model_path.py` ceiling), the whole flow in-process, and over HTTP with a JPEG body and a raw BGR body.

    .venv/bin/python bench/ocr_accuracy.py [--labels 24] [--speed] [--seconds 4] [--shapes auto|static]
                                           [--set SETTING=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance import frames  # noqa: E402
from appliance.nodes.ocr import PAD_GREY, REC_HEIGHT, detector_input  # noqa: E402
from appliance.project import Project  # noqa: E402
from bench.hot_path import in_process, over_http  # noqa: E402
from bench.model_path import ceiling  # noqa: E402
from tests.conftest import start_server  # noqa: E402

# OpenCV 5 draws the Hershey constants with one embedded sans family (regular, bold, italic), not the old stroke
# fonts: the DejaVu TrueType fonts, where installed, add a monospaced, a serif and a condensed face.
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")
TRUETYPE = {"dejavu sans mono": "DejaVuSansMono.ttf", "dejavu serif": "DejaVuSerif.ttf",
            "dejavu sans condensed": "DejaVuSansCondensed.ttf"}
FONTS: dict[str, int | Path] = {
    "simplex": cv2.FONT_HERSHEY_SIMPLEX,
    "plain": cv2.FONT_HERSHEY_PLAIN,
    "duplex": cv2.FONT_HERSHEY_DUPLEX,
    "complex": cv2.FONT_HERSHEY_COMPLEX,
    "triplex": cv2.FONT_HERSHEY_TRIPLEX,
    "complex small": cv2.FONT_HERSHEY_COMPLEX_SMALL,
    "simplex italic": cv2.FONT_HERSHEY_SIMPLEX | cv2.FONT_ITALIC,
    "script simplex": cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
    **{name: DEJAVU / file for name, file in TRUETYPE.items() if (DEJAVU / file).is_file()},
}
# The fonts a printer or laser marker would use; the italic and script ones get a row of their own.
PRINT_FONTS = ("simplex", "plain", "duplex", "complex", "triplex", "complex small",
               *(name for name in TRUETYPE if name in FONTS))
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"
WIDTH, HEIGHT = 800, 480


def levenshtein(a: str, b: str) -> int:
    """Edits (insert, delete, substitute one character) that turn a into b."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def label_lines(rng: np.random.Generator) -> list[str]:
    def letter() -> str:
        return LETTERS[int(rng.integers(len(LETTERS)))]

    def digits(count: int) -> str:
        return "".join(str(int(d)) for d in rng.integers(0, 10, count))

    year, month, day = int(rng.integers(2024, 2031)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    date = (f"EXP {year}-{month:02d}-{day:02d}" if rng.random() < 0.5 else f"MFG {day:02d}.{month:02d}.{year}")
    return [f"LOT {year - 1}-{letter()}{digits(2)}", f"SN {digits(5)}-{letter()}{letter()}{digits(1)}", date]


@dataclass(frozen=True)
class Condition:
    name: str
    fonts: tuple[str, ...] = PRINT_FONTS
    scale: tuple[float, float] = (0.9, 1.4)  # of the font's size: 1.0 is about 22 px caps in SIMPLEX
    angle: float = 0.0  # degrees, either sign
    noise: float = 0.0  # Gaussian sigma, grey levels
    blur: float = 0.0  # Gaussian sigma, pixels
    contrast: int = 0  # grey level of the ink (0: black)
    line_gap: float = 0.9  # blank between lines, in text heights
    jpeg: int = 0  # JPEG quality the frame is compressed at (0: none)
    dots: bool = False  # printed as dots (inkjet, dot matrix): the strokes sampled on a grid


CONDITIONS = (
    Condition("clean"),
    Condition("small text (0.55-0.7, caps 12-15 px)", scale=(0.55, 0.7)),
    Condition("tiny text (0.35-0.45, caps 8-10 px)", scale=(0.35, 0.45)),
    Condition("rotated ±5°", angle=5),
    Condition("rotated ±10°", angle=10),
    Condition("rotated ±20°", angle=20),
    Condition("noise σ 20", noise=20),
    Condition("noise σ 40", noise=40),
    Condition("noise σ 70", noise=70),
    Condition("blur σ 1.5", blur=1.5),
    Condition("blur σ 2.5", blur=2.5),
    Condition("blur σ 3.5", blur=3.5),
    Condition("dense lines (gap 0.3 text height)", line_gap=0.3),
    Condition("faint ink (grey 150 on white)", contrast=150),
    Condition("very faint ink (grey 215 on white)", contrast=215),
    Condition("JPEG quality 20", jpeg=20),
    Condition("dot-matrix print", dots=True),
    Condition("dot-matrix print, small (0.55-0.7)", dots=True, scale=(0.55, 0.7)),
    Condition("rotated ±5°, noise σ 20, blur σ 1", angle=5, noise=20, blur=1.0),
    Condition("italic", fonts=("simplex italic",)),
    Condition("script font", fonts=("script simplex",)),
    *(Condition(f"clean, {font} only", fonts=(font,)) for font in PRINT_FONTS),
)


@functools.cache
def _face(path: Path) -> cv2.FontFace:
    return cv2.FontFace(str(path))


def _truetype(scale: float, thickness: int) -> tuple[int, int]:
    """Size in pixels and weight giving about the capitals' height of a Hershey font at `scale`."""
    return round(29 * scale), min(900, 100 + 300 * thickness)


def measure(line: str, font: int | Path, scale: float, thickness: int) -> tuple[tuple[int, int], int]:
    """getTextSize's ((width, height above the baseline), depth below it) for both kinds of font."""
    if isinstance(font, int):
        return cv2.getTextSize(line, font, scale, thickness)
    size, weight = _truetype(scale, thickness)
    x, y, width, height = cv2.getTextSize((8000, 2000), line, (0, 1000), _face(font), size, weight)
    return (width, 1000 - y), y + height - 1000


def draw(strokes: np.ndarray, line: str, origin: tuple[int, int], font: int | Path, scale: float,
         thickness: int) -> None:
    if isinstance(font, int):
        cv2.putText(strokes, line, origin, font, scale, 255, thickness, cv2.LINE_AA)
    else:
        size, weight = _truetype(scale, thickness)
        cv2.putText(strokes, line, origin, 255, _face(font), size, weight)


def render(lines: list[str], condition: Condition, rng: np.random.Generator) -> np.ndarray:
    """A white card with the lines on a grey part, then the condition's rotation, blur and noise."""
    font = FONTS[condition.fonts[int(rng.integers(len(condition.fonts)))]]
    scale = float(rng.uniform(*condition.scale))
    thickness = 1 if scale < 0.8 or font == cv2.FONT_HERSHEY_PLAIN else int(rng.integers(1, 3))
    if font in (cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_COMPLEX_SMALL):
        scale *= 1.6  # these two are drawn smaller at the same scale
    image = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    sizes = [measure(line, font, scale, thickness) for line in lines]
    # Dots: about 7 per capital's height, as 5x7 inkjet and dot-matrix printers print; strokes one dot wide.
    pitch = max(3, round(max(h for (_, h), _ in sizes) / 7))
    gap = int(max(h for (_, h), _ in sizes) * condition.line_gap)
    card_w = max(w for (w, _), _ in sizes) + 60
    card_h = sum(h + base for (_, h), base in sizes) + gap * (len(lines) - 1) + 50
    # Room for the card's corners to turn without leaving the frame.
    room = 20 + int(0.5 * max(card_w, card_h) * math.sin(math.radians(condition.angle)))
    left = int(rng.integers(room, max(room + 1, WIDTH - card_w - room)))
    top = int(rng.integers(room, max(room + 1, HEIGHT - card_h - room)))
    cv2.rectangle(image, (left, top), (left + card_w, top + card_h), (245, 245, 245), -1)
    y = top + 25
    ink = (condition.contrast,) * 3
    strokes = np.zeros(image.shape[:2], np.uint8)
    for line, ((_, h), base) in zip(lines, sizes, strict=True):
        y += h
        draw(strokes, line, (left + 30, y), font, scale, thickness)
        y += base + gap
    if condition.dots:
        # Widened first, so that every stroke covers a row or column of the grid.
        widened = cv2.dilate(strokes, np.ones((pitch - 1, pitch - 1), np.uint8))
        for dot_y, dot_x in zip(*np.nonzero(widened[::pitch, ::pitch] > 127), strict=True):
            cv2.circle(image, (int(dot_x * pitch), int(dot_y * pitch)), max(1, round(pitch * 0.35)), ink, -1,
                       cv2.LINE_AA)
    else:
        alpha = strokes[..., None].astype(np.float32) / 255
        image = (image * (1 - alpha) + np.asarray(ink, np.float32) * alpha).round().astype(np.uint8)
    if condition.angle:
        angle = float(rng.uniform(-condition.angle, condition.angle))
        if abs(angle) < condition.angle / 2:  # the named angle, not something near 0
            angle = condition.angle / 2 * (1 if angle >= 0 else -1) + angle
        # About the card's centre, so that the card stays in the frame.
        rotation = cv2.getRotationMatrix2D((left + card_w / 2, top + card_h / 2), angle, 1.0)
        image = cv2.warpAffine(image, rotation, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
    if condition.blur:
        image = cv2.GaussianBlur(image, (0, 0), condition.blur)
    if condition.noise:
        noisy = image.astype(np.float32) + rng.normal(0, condition.noise, image.shape).astype(np.float32)
        image = noisy.clip(0, 255).astype(np.uint8)
    if condition.jpeg:
        encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, condition.jpeg])[1]
        image = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return image


def score(truth: list[str], text: str) -> tuple[float, int]:
    """(mean character accuracy, exact lines) of the read text against the true lines."""
    rows = [row for row in text.split("\n") if row]
    accuracies, exact = [], 0
    for line in truth:
        best = min((levenshtein(line, row) for row in rows), default=len(line))
        accuracies.append(max(0.0, 1 - best / len(line)))
        exact += line in rows
    return statistics.fmean(accuracies), exact


def make_project(folder: Path, shapes: str, settings: dict | None = None) -> Path:
    node = {"type": "ocr@1", "shapes": shapes, "expected": r"LOT \d{4}-[A-Z]\d{2}", **(settings or {})}
    (folder / "flow.yaml").write_text(yaml.safe_dump({"nodes": {"ocr": node}}))
    (folder / "project.yaml").write_text(yaml.safe_dump({
        "name": "ocr-bench", "flow": "flow.yaml", "models_dir": str(REPO / "models"), "firmware_profile": "cpu",
        "limits": {"queue_depth": 16}}))
    return folder


def accuracy(project: Project, count: int) -> None:
    print(f"\nocr@1 on rendered labels: {count} labels x 3 lines per condition, {WIDTH}x{HEIGHT} frames\n")
    print("| condition | char accuracy | exact lines | lot regex matched | ms per label (median) |")
    print("|---|---|---|---|---|")
    totals: list[float] = []
    for index, condition in enumerate(CONDITIONS):
        rng = np.random.default_rng(1000 + index)
        accuracies, exact, matched, times = [], 0, 0, []
        for _ in range(count):
            truth = label_lines(rng)
            image = render(truth, condition, rng)
            started = time.perf_counter()
            ctx = project.inspect(frames.Frame(image, "bench"), "")
            times.append(time.perf_counter() - started)
            if ctx["errors"]:
                raise SystemExit(f"flow errors: {ctx['errors']}")
            char, lines = score(truth, ctx["text"])
            accuracies.append(char)
            exact += lines
            matched += bool(ctx.get("ocr_match"))
        totals.append(statistics.fmean(accuracies))
        print(f"| {condition.name} | {statistics.fmean(accuracies):.3f} | {exact}/{3 * count} "
              f"({exact / (3 * count):.0%}) | {matched}/{count} | {statistics.median(times) * 1000:.1f} |")


def speed(project: Project, project_dir: Path, seconds: float) -> None:
    rng = np.random.default_rng(7)
    image = render(label_lines(rng), CONDITIONS[0], rng)
    node = project.graph.nodes["ocr"]
    det, rec = node.slots["det"].current, node.slots["rec"].current
    ctx = project.inspect(frames.Frame(image, "bench"), "")
    det_in = detector_input(image, node.settings.det_limit, node.static)[0][None]
    rec_in = np.full((1, REC_HEIGHT, node.settings.rec_width, 3), PAD_GREY, np.uint8)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    raw = image.tobytes()
    rows: list[tuple[str, object, dict[str, float]]] = [
        (f"det model alone, {det_in.shape[2]}x{det_in.shape[1]} (AsyncInferQueue)", "-",
         ceiling(det, [det_in], seconds)),
        (f"rec model alone, one line 48x{rec_in.shape[2]} (AsyncInferQueue)", "-", ceiling(rec, [rec_in], seconds)),
    ]
    decode: Callable[[], frames.Frame] = lambda: frames.decode_image(jpeg, max_frame_pixels=1 << 25)  # noqa: E731
    for clients in (1, 2):
        rows.append(("whole flow in-process (JPEG decode + 3 lines)", clients,
                     in_process(project, decode, clients, seconds)))
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(project_dir, log_file=Path(tmp) / "server.log", log_level="INFO")
        try:
            for clients in (1, 8):
                rows.append(("HTTP, JPEG body", clients, asyncio.run(over_http(
                    server.url + "/analyze_image", lambda i: {"query": "", "body": jpeg}, clients, seconds))))
                rows.append(("HTTP, raw BGR body", clients, asyncio.run(over_http(
                    server.url + "/analyze_raw_image", lambda i: {"query": f"?width={WIDTH}&height={HEIGHT}",
                                                                  "body": raw}, clients, seconds))))
        finally:
            server.stop()
    flow_ceiling = rows[2][2]
    print(f"\nocr@1 speed on one {WIDTH}x{HEIGHT} label (3 lines read: {ctx['text']!r}), {seconds:g} s per row, "
          f"models on {det.device} ({det.precision})\n")
    print("| path | clients | req/s | p50 ms | p99 ms | ratio to the flow in-process (1 client) |")
    print("|---|---|---|---|---|---|")
    for name, clients, result in rows:
        print(f"| {name} | {clients} | {result['rps']:.1f} | {result['p50']:.2f} | {result['p99']:.2f} | "
              f"{result['rps'] / flow_ceiling['rps']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=24, help="labels per condition")
    parser.add_argument("--speed", action="store_true", help="also the speed table (models, in-process, HTTP)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per speed row")
    parser.add_argument("--shapes", default="auto", choices=("auto", "dynamic", "static"))
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="an ocr@1 setting (YAML value), e.g. --set crop_margin=0 --set space_threshold=1")
    args = parser.parse_args()
    settings = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        project_dir = make_project(Path(tmp), args.shapes, settings)
        if settings:
            print(f"ocr@1 settings: {settings}")
        project = Project.load(project_dir)
        project.prepare()
        try:
            accuracy(project, args.labels)
            if args.speed:
                speed(project, project_dir, args.seconds)
        finally:
            project.close()


if __name__ == "__main__":
    main()
