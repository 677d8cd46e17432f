"""A small generated camera-trap project, so ``python prepare.py`` works with no data at all.

:func:`generate_demo_project` writes an Animl-style COCO Camera Traps export and its JPEGs:

- ``settings.locations`` camera locations (deployments), each with its own background (sky/ground gradient, smooth
  noise, grass grain, trees, bushes and rocks in its own palette) and its own light;
- day frames in colour and night frames that look like infrared flash shots (grey, dark, vignetted, the animal
  lit up);
- five species drawn with clearly different silhouettes, sizes and colours (fox: large orange with a bushy tail;
  skunk: black with a white stripe and raised tail; bird: small blue with beak and wing; rodent: small grey-brown
  with round ears and a thin tail; lizard: long, thin and green with splayed legs), so a tiny CNN learns them in a
  few CPU epochs;
- every species at four or more locations (every other location has all five), a few empty frames (Animl's ``empty``
  label with a whole-image box) and a few frames with two animals;
- Animl's export shape (pipeline.md 2.1): ``categories`` with ``{"id": 0, "name": "empty"}`` first (plus a
  project label without instances, as Animl exports every project label), image ``id`` ``<project>:<hash>``,
  ``file_name`` ``<project>/<cameraId>/<deployment>/<imageid>.jpg``, ``serving_bucket_key``, ``location`` (the
  deployment name), ISO ``datetime``, ``width``, ``height``, and integer absolute-pixel ``bbox`` annotations.

Generation is deterministic (seeded by ``demo.seed``) and idempotent: a marker file holding the settings is written
last, and a second call with the same settings returns at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from animl_lightning.core.errors import AnimlError
from animl_lightning.core.files import atomic_write_bytes, atomic_write_json, read_json_file, safe_join
from animl_lightning.prepare.config import DemoSettings

log = logging.getLogger(__name__)

PROJECT = "demo_project"
SPECIES: tuple[str, ...] = ("bird", "fox", "lizard", "rodent", "skunk")
UNUSED_CATEGORIES: tuple[str, ...] = ("deer",)
COCO_FILENAME = "demo_cct.json"
IMAGES_DIRNAME = "images"
MARKER_FILENAME = "demo_settings.json"
GENERATOR_VERSION = 1
JPEG_QUALITY = 85

LOCATION_NAMES: tuple[str, ...] = (
    "Coyote Ridge",
    "Pelican Bay",
    "Scorpion Canyon",
    "Dairy Creek",
    "Black Mountain",
    "Lighthouse Point",
    "Pine Flat",
    "Sauces Canyon",
    "Willow Spring",
    "Cañada Larga",
    "Smugglers Cove",
    "Oak Knoll",
)
_TZ = timezone(timedelta(hours=-7))
Box = tuple[int, int, int, int]
Rgb = tuple[int, int, int]


@dataclass(frozen=True)
class _Location:
    index: int
    name: str
    deployment: str
    camera_id: str
    species: tuple[str, ...]
    background: np.ndarray  # (H, W, 3) uint8
    light: np.ndarray  # (3,) per-channel gain of this site's light
    horizon: int
    start: datetime


def generate_demo_project(root: Path, settings: DemoSettings) -> tuple[Path, Path]:
    """Generate (or reuse) the demo project under ``root``.

    Args:
        root: folder that receives ``demo_cct.json``, ``images/`` and the marker ``demo_settings.json``.
        settings: ``demo.*``.

    Returns:
        ``(coco_file, images_dir)``.
    """
    root = Path(root)
    coco_file = root / COCO_FILENAME
    images_dir = root / IMAGES_DIRNAME
    marker = root / MARKER_FILENAME
    wanted = {"generator_version": GENERATOR_VERSION, "settings": asdict(settings)}
    if _is_current(marker, wanted, coco_file, images_dir):
        log.info("demo project in %s is current; not regenerating", root)
        return coco_file, images_dir

    cct = _generate(settings, images_dir)
    atomic_write_json(coco_file, cct)
    atomic_write_json(marker, wanted)
    log.info(
        "generated demo project: %d images, %d annotations in %s",
        len(cct["images"]),
        len(cct["annotations"]),
        root,
    )
    return coco_file, images_dir


def _is_current(marker: Path, wanted: dict[str, Any], coco_file: Path, images_dir: Path) -> bool:
    try:
        if read_json_file(marker) != wanted:
            return False
        cct = read_json_file(coco_file)
    except AnimlError:
        return False
    images = cct.get("images", []) if isinstance(cct, dict) else []
    return bool(images) and all(safe_join(images_dir, img["file_name"]).is_file() for img in images)


# --- the project -------------------------------------------------------------------------------------------------


def _generate(settings: DemoSettings, images_dir: Path) -> dict[str, Any]:
    width, height = settings.width, settings.height
    categories = [{"id": 0, "name": "empty"}] + [
        {"id": i + 1, "name": name} for i, name in enumerate([*SPECIES, *UNUSED_CATEGORIES])
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    vignette = _vignette(width, height)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(settings.locations):
        site = _make_location(settings, index)
        rng = np.random.default_rng([settings.seed, index, 1])
        n_animals = 0
        for frame in range(settings.images_per_location):
            is_empty = frame % 10 == 9
            night = bool(rng.random() < 0.3)
            when = site.start + timedelta(hours=int(frame * 7), minutes=int(rng.integers(0, 60)))
            when = when.replace(hour=int(rng.choice([21, 22, 23, 0, 2, 4]) if night else rng.integers(7, 18)))
            if is_empty:
                animals: list[str] = []
            else:
                animals = [site.species[n_animals % len(site.species)]]
                n_animals += 1
                if frame == 4 and index % 2 == 0:
                    animals.append(site.species[n_animals % len(site.species)])
                    n_animals += 1
            image_id = f"{PROJECT}:{_digest(settings.seed, index, frame, 'image')[:32]}"
            file_name = f"{PROJECT}/{site.camera_id}/{site.deployment}/{image_id.replace(':', '-', 1)}.jpg"
            pixels, boxes = _render(site, animals, night, rng, vignette)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
            atomic_write_bytes(safe_join(images_dir, file_name), buffer.getvalue())
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "original_file_name": f"IMG_{frame + 1:04d}.JPG",
                    "serving_bucket_key": f"original/{image_id}-original.jpg",
                    "datetime": when.isoformat(),
                    "location": site.name,
                    "width": width,
                    "height": height,
                }
            )
            labelled = [("empty", (0, 0, width, height))] if is_empty else list(zip(animals, boxes, strict=True))
            for k, (name, box) in enumerate(labelled):
                annotations.append(
                    {
                        "id": _digest(settings.seed, index, frame, k)[:24],
                        "image_id": image_id,
                        "category_id": category_id[name],
                        "sequence_level_annotation": False,
                        "bbox": list(box),
                        "confidence": round(float(rng.uniform(0.8, 1.0)), 3),
                        "validated": True,
                        "validated_by": "demo-reviewer",
                    }
                )
    return {
        "info": {
            "version": "1.0",
            "description": f"Image data exported from Animl project '{PROJECT}'. Export ID: demo-{settings.seed}",
            "year": 2024,
            "date_created": "2024-01-01T00:00:00-07:00",
        },
        "images": images,
        "categories": categories,
        "annotations": annotations,
    }


def _digest(*parts: object) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode("utf-8")).hexdigest()


def _make_location(settings: DemoSettings, index: int) -> _Location:
    rng = np.random.default_rng([settings.seed, index, 0])
    name = LOCATION_NAMES[index] if index < len(LOCATION_NAMES) else f"Site {index + 1}"
    deployment = name.lower().replace("'", "").replace(" ", "_")
    # Every other site sees all species and the rest miss one (a different one each), so sites differ but a split
    # with a single val location can still hold every species.
    n_species = len(SPECIES) - 1 if settings.locations >= len(SPECIES) and index % 2 else len(SPECIES)
    species = tuple(SPECIES[(index + k) % len(SPECIES)] for k in range(n_species))
    horizon = int(settings.height * rng.uniform(0.22, 0.45))
    light = rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.8, 1.1)
    return _Location(
        index=index,
        name=name,
        deployment=deployment,
        camera_id=f"X{8100000 + int(rng.integers(0, 99999)):07d}",
        species=species,
        background=_background(settings.width, settings.height, horizon, rng),
        light=light.astype(np.float32),
        horizon=horizon,
        start=datetime(2023, 5, 1, tzinfo=_TZ) + timedelta(days=int(rng.integers(0, 300))),
    )


# --- drawing -----------------------------------------------------------------------------------------------------


def _background(width: int, height: int, horizon: int, rng: np.random.Generator) -> np.ndarray:
    """Sky and ground gradients, smooth noise, grass grain and a few trees, bushes and rocks."""
    sky_top = rng.uniform([90, 125, 170], [140, 165, 215])
    sky_low = np.clip(sky_top + rng.uniform(25, 55), 0, 245)
    ground_far = rng.uniform([90, 90, 40], [170, 150, 95])
    ground_near = ground_far * rng.uniform(0.55, 0.85)
    rows = np.arange(height, dtype=np.float32)[:, None]
    t_sky = np.clip(rows / max(horizon, 1), 0, 1)
    t_ground = np.clip((rows - horizon) / max(height - horizon, 1), 0, 1)
    sky = sky_top * (1 - t_sky) + sky_low * t_sky
    ground = ground_far * (1 - t_ground) + ground_near * t_ground
    column = np.where(rows < horizon, sky, ground).astype(np.float32)  # (H, 3)
    # Smooth blotches, mostly brightness with a little colour, like uneven light on vegetation and soil.
    grid = (max(2, height // 40), max(2, width // 40))
    smooth_small = (rng.normal(0, 14, size=(*grid, 1)) + rng.normal(0, 4, size=(*grid, 3))).astype(np.float32)
    smooth = np.asarray(
        Image.fromarray(np.clip(smooth_small + 128, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    grain = rng.normal(0, 7, size=(height, width, 1)).astype(np.float32)
    sky_calm = np.where(rows[:, :, None] < horizon, 0.4, 1.0).astype(np.float32)
    base = column[:, None, :] + (smooth - 128) * sky_calm + grain * (rows[:, :, None] > horizon)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    foliage = tuple(int(v) for v in rng.uniform([20, 60, 15], [70, 120, 50]))
    bark = tuple(int(v) for v in rng.uniform([60, 40, 20], [100, 70, 45]))
    stone = int(rng.uniform(100, 170))
    for _ in range(int(rng.integers(1, 4))):  # trees on the horizon
        x = float(rng.uniform(0, width))
        trunk_w = float(rng.uniform(0.012, 0.025) * width)
        top = horizon - rng.uniform(0.1, 0.25) * height
        draw.rectangle([x - trunk_w / 2, top, x + trunk_w / 2, horizon + 0.03 * height], fill=bark)
        r = float(rng.uniform(0.06, 0.12) * width)
        draw.ellipse([x - r, top - r, x + r, top + r * 0.8], fill=foliage)
        draw.ellipse([x - r * 1.3, top - r * 0.2, x + r * 0.3, top + r], fill=_shade(foliage, 0.85))
    for _ in range(int(rng.integers(2, 5))):  # bushes and rocks on the ground
        x = float(rng.uniform(0, width))
        y = float(rng.uniform(horizon + 0.05 * height, height))
        size = float(rng.uniform(0.03, 0.08) * width) * (0.5 + y / height)
        if rng.random() < 0.5:
            grey = (stone, stone - 5, stone - 12)
            draw.ellipse([x - size, y - size * 0.55, x + size, y + size * 0.25], fill=grey)
            draw.ellipse([x - size * 0.6, y - size * 0.5, x + size * 0.2, y - size * 0.1], fill=_shade(grey, 1.15))
        else:
            draw.ellipse([x - size, y - size * 0.8, x + size, y + size * 0.2], fill=_shade(foliage, 1.2))
    return np.asarray(image, dtype=np.uint8)


def _vignette(width: int, height: int) -> np.ndarray:
    ys = (np.arange(height, dtype=np.float32) - height / 2) / (height / 2)
    xs = (np.arange(width, dtype=np.float32) - width / 2) / (width / 2)
    r2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return np.clip(1.0 - 0.45 * r2, 0.25, 1.0)


def _render(
    site: _Location, animals: list[str], night: bool, rng: np.random.Generator, vignette: np.ndarray
) -> tuple[np.ndarray, list[Box]]:
    height, width = site.background.shape[:2]
    gain = site.light * (rng.uniform(0.8, 1.15) if not night else 1.0)
    lit = np.clip(site.background.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    image = Image.fromarray(lit)
    draw = ImageDraw.Draw(image)
    masks: list[Image.Image] = []
    for k, species in enumerate(animals):
        mask = Image.new("L", (width, height), 0)
        # Two animals stand in different halves so their boxes stay apart.
        lo, hi = (0.12, 0.88) if len(animals) == 1 else ((0.1, 0.42) if k == 0 else (0.58, 0.9))
        cx = float(rng.uniform(lo, hi) * width)
        ground = float(rng.uniform(site.horizon + 0.12 * height, 0.9 * height))
        scale = height / 480 * (0.7 + 0.5 * (ground - site.horizon) / max(height - site.horizon, 1))
        flip = bool(rng.random() < 0.5)
        _DRAWERS[species](_Pen(draw, ImageDraw.Draw(mask), cx, ground, scale, flip), rng)
        masks.append(mask)
    pixels = np.asarray(image, dtype=np.uint8)
    boxes = [_tight_box(np.asarray(m) > 0) for m in masks]
    if night:
        gray = pixels.astype(np.float32) @ np.array([0.3, 0.59, 0.11], dtype=np.float32)
        lit_animal = np.zeros((height, width), dtype=bool)
        for m in masks:
            lit_animal |= np.asarray(m) > 0
        # Infrared flash: the scene falls off towards the edges, the animal close to the camera reflects.
        gray = np.where(lit_animal, gray * 0.8 + 70, gray * 0.45 * vignette)
        noise = rng.normal(0, 6, size=(height, width)).astype(np.float32)
        out = np.clip(gray + noise, 0, 255).astype(np.uint8)
        return np.repeat(out[:, :, None], 3, axis=2), boxes
    grain = rng.integers(-5, 6, size=(height, width, 1), dtype=np.int16)
    return np.clip(pixels.astype(np.int16) + grain, 0, 255).astype(np.uint8), boxes


def _tight_box(mask: np.ndarray) -> Box:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return (0, 0, 1, 1)
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    return (x0, y0, x1 - x0, y1 - y0)


def _shade(colour: tuple[int, ...], factor: float) -> Rgb:
    r, g, b = (int(min(255, max(0, c * factor))) for c in colour[:3])
    return (r, g, b)


class _Pen:
    """Draws on the picture and, in white, on the animal's mask; coordinates in units around (cx, ground)."""

    def __init__(
        self, draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, cx: float, ground: float, scale: float, flip: bool
    ) -> None:
        self.draw, self.mask, self.cx, self.ground, self.scale, self.flip = draw, mask, cx, ground, scale, flip

    def _xy(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + (-x if self.flip else x) * self.scale, self.ground - y * self.scale)

    def _rect(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (ax, ay), (bx, by) = self._xy(x0, y0), self._xy(x1, y1)
        return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: Rgb) -> None:
        box = self._rect(x0, y0, x1, y1)
        self.draw.ellipse(box, fill=fill)
        self.mask.ellipse(box, fill=255)

    def polygon(self, points: list[tuple[float, float]], fill: Rgb) -> None:
        xy = [self._xy(x, y) for x, y in points]
        self.draw.polygon(xy, fill=fill)
        self.mask.polygon(xy, fill=255)

    def line(self, points: list[tuple[float, float]], fill: Rgb, width: float) -> None:
        xy = [self._xy(x, y) for x, y in points]
        w = max(1, round(width * self.scale))
        self.draw.line(xy, fill=fill, width=w)
        self.mask.line(xy, fill=255, width=w)


def _vary(colour: Rgb, rng: np.random.Generator, amount: float = 0.12) -> Rgb:
    return _shade(colour, float(rng.uniform(1 - amount, 1 + amount)))


def _draw_fox(pen: _Pen, rng: np.random.Generator) -> None:
    fur = _vary((205, 95, 35), rng)
    dark = _shade(fur, 0.55)
    for x in (-42, -28, 22, 36):  # legs
        pen.line([(x, 40), (x + 2, 0)], dark, 6)
    pen.polygon([(-50, 52), (-112, 78), (-124, 62), (-100, 44), (-52, 36)], fur)  # bushy tail
    pen.ellipse(-120, 72, -100, 56, (240, 235, 225))  # white tail tip
    pen.ellipse(-55, 75, 50, 30, fur)  # body
    pen.ellipse(35, 98, 75, 62, fur)  # head
    pen.polygon([(70, 84), (98, 74), (70, 68)], _shade(fur, 0.9))  # snout
    pen.polygon([(40, 94), (46, 118), (56, 96)], dark)  # ears
    pen.polygon([(56, 96), (64, 118), (70, 92)], dark)
    pen.ellipse(30, 62, 55, 40, (235, 225, 210))  # chest


def _draw_skunk(pen: _Pen, rng: np.random.Generator) -> None:
    black = _vary((28, 26, 30), rng, 0.2)
    white = (240, 240, 235)
    for x in (-25, -15, 15, 25):
        pen.line([(x, 18), (x, 0)], black, 6)
    pen.ellipse(-38, 52, -8, 10, black)  # raised fluffy tail base
    pen.ellipse(-52, 96, -10, 40, black)  # tail plume
    pen.ellipse(-44, 88, -26, 52, white)
    pen.ellipse(-35, 50, 32, 14, black)  # body
    pen.polygon([(-30, 42), (0, 52), (28, 42), (0, 46)], white)  # back stripe
    pen.ellipse(22, 42, 48, 18, black)  # head
    pen.line([(30, 40), (46, 30)], white, 3)  # face stripe


def _draw_bird(pen: _Pen, rng: np.random.Generator) -> None:
    body = _vary((45, 85, 200), rng)
    pen.line([(-3, 10), (-4, 0)], (90, 70, 40), 2)  # legs
    pen.line([(4, 10), (5, 0)], (90, 70, 40), 2)
    pen.polygon([(-14, 22), (-34, 32), (-32, 24)], _shade(body, 0.6))  # tail
    pen.ellipse(-18, 32, 16, 8, body)  # body
    pen.ellipse(8, 40, 24, 24, body)  # head
    pen.polygon([(-10, 28), (8, 30), (-4, 16)], _shade(body, 0.65))  # wing
    pen.polygon([(23, 34), (33, 31), (23, 28)], (240, 190, 40))  # beak
    pen.ellipse(16, 36, 20, 32, (250, 250, 250))  # eye


def _draw_rodent(pen: _Pen, rng: np.random.Generator) -> None:
    fur = _vary((130, 110, 90), rng, 0.15)
    pen.line([(-14, 6), (-30, 2), (-46, 6), (-58, 3)], (200, 150, 140), 2)  # thin tail
    pen.ellipse(-16, 22, 14, 0, fur)  # body
    pen.ellipse(6, 20, 24, 4, fur)  # head
    pen.ellipse(6, 28, 16, 16, _shade(fur, 1.25))  # round ear
    pen.ellipse(22, 14, 26, 10, (40, 30, 30))  # nose


def _draw_lizard(pen: _Pen, rng: np.random.Generator) -> None:
    skin = _vary((70, 150, 60), rng)
    dark = _shade(skin, 0.7)
    for x, dx in ((-18, -8), (-10, 8), (14, -8), (22, 8)):  # splayed legs
        pen.line([(x, 8), (x + dx, 0), (x + dx + 5, 0)], dark, 4)
    pen.polygon([(-22, 14), (-70, 8), (-100, 4), (-70, 2), (-22, 2)], skin)  # long tapering tail
    pen.ellipse(-26, 17, 30, 1, skin)  # body
    pen.ellipse(24, 16, 46, 3, _shade(skin, 1.1))  # head
    pen.line([(-20, 12), (24, 12)], dark, 3)  # back stripe


_DRAWERS: dict[str, Callable[[_Pen, np.random.Generator], None]] = {
    "bird": _draw_bird,
    "fox": _draw_fox,
    "lizard": _draw_lizard,
    "rodent": _draw_rodent,
    "skunk": _draw_skunk,
}
