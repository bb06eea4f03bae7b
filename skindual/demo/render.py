"""Procedural dermoscopy-like lesions: the offline demo data.

`write_demo_dataset` writes a folder in HAM10000's layout (metadata CSV with the
same columns, images split over two folders, Tschandl-style masks), so the real
reader (`skindual.data`) is what reads it.  The seven classes differ in their
coarse look as much as in detail -- mean colour, size, shape, border, texture --
so that a tiny model can learn to tell them apart (docs/architecture.md,
"The demo world"):

=======  =========================  ======  ==============================================
class    colour                     size    shape, border, texture
=======  =========================  ======  ==============================================
akiec    red-pink                   large   irregular, soft blurred border, white scale flecks
bcc      pearly pink                medium  smooth round, branching red vessels
bkl      yellow-tan                 large   elongated oval, sharp border, dark crypts
df       brown ring, white centre   small   round, ring pattern
mel      near-black + blue-grey     large   very irregular, blotchy multi-colour
nv       medium brown               medium  round, regular, faint pigment network
vasc     red-purple                 medium  cluster of round lobules, sharp border
=======  =========================  ======  ==============================================

Masks are exact: the binary shape the lesion was painted from.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from skindual.prompts import CLASSES, LOCALIZATIONS

# HAM10000's class counts: the demo keeps their proportions.
HAM10000_COUNTS = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
DEMO_IMAGE_SIZE = (96, 72)  # width, height: HAM10000's 4:3 at a size 2 cores can afford
DIFFICULTIES = ("easy", "hard")  # "hard": hair, low contrast, fuzzy borders, uneven light, frame contact
MASKS_DIR = "HAM10000_segmentations_lesion_tschandl"
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
METADATA_CSV = "HAM10000_metadata.csv"


@dataclass(frozen=True)
class ClassLook:
    colour: tuple[int, int, int]
    radius: float  # mean radius as a fraction of the image's short side
    irregularity: float  # amplitude of the border's low-frequency wobble
    elongation: float  # ratio of the long to the short axis
    softness: float  # width of the colour fade at the border, in pixels


LOOKS: dict[str, ClassLook] = {
    "akiec": ClassLook((205, 95, 90), 0.36, 0.14, 1.2, 3.0),
    "bcc": ClassLook((232, 160, 178), 0.29, 0.04, 1.1, 1.2),
    "bkl": ClassLook((200, 160, 85), 0.34, 0.05, 1.6, 0.8),
    "df": ClassLook((125, 80, 55), 0.18, 0.03, 1.05, 1.0),
    "mel": ClassLook((60, 40, 40), 0.40, 0.22, 1.3, 1.0),
    "nv": ClassLook((150, 98, 62), 0.26, 0.03, 1.1, 1.0),
    "vasc": ClassLook((160, 30, 80), 0.27, 0.0, 1.0, 0.6),
}


def demo_counts(scale: float = 0.1, minimum: int = 10) -> dict[str, int]:
    """Images per class in HAM10000's proportions, scaled; rare classes keep at least `minimum`."""
    return {code: max(minimum, round(n * scale)) for code, n in HAM10000_COUNTS.items()}


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, h, dtype=np.float32)
    xs = np.linspace(0, cells, w, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g00, g01 = grid[y0][:, x0], grid[y0][:, x0 + 1]
    g10, g11 = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx)


def _lesion_shape(code: str, rng: np.random.Generator, h: int, w: int,
                  offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """(signed distance to the border in pixels, >0 inside; normalised radius 0 at centre, 1 at border);
    `offset` (pixels) moves the lesion off the centre."""
    look = LOOKS[code]
    short = min(h, w)
    cy = h / 2 + rng.uniform(-0.06, 0.06) * short + offset[0]
    cx = w / 2 + rng.uniform(-0.06, 0.06) * short + offset[1]
    radius = look.radius * short * rng.uniform(0.85, 1.15)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if code == "vasc":  # a cluster of lobules: the union of a few discs
        dist = np.full((h, w), -1e9, np.float32)
        n = rng.integers(3, 6)
        for k in range(n):
            angle = 2 * math.pi * k / n + rng.uniform(-0.4, 0.4)
            off = radius * rng.uniform(0.35, 0.6)
            r = radius * rng.uniform(0.45, 0.6)
            d = r - np.hypot(yy - cy - off * math.sin(angle), xx - cx - off * math.cos(angle))
            dist = np.maximum(dist, d)
        rnorm = np.clip(1 - dist / (radius * 0.6), 0, 1)
        return dist, rnorm
    theta0 = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(theta0) + dy * math.sin(theta0)
    v = -dx * math.sin(theta0) + dy * math.cos(theta0)
    elong = look.elongation * rng.uniform(0.95, 1.05)
    rho = np.hypot(u / math.sqrt(elong), v * math.sqrt(elong))
    phi = np.arctan2(v, u)
    wobble = np.zeros_like(phi)
    for k in (2, 3, 5):
        wobble += look.irregularity * rng.uniform(0.3, 1.0) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    border = radius * (1 + wobble)
    return border - rho, np.clip(rho / border, 0, 1)


def _paint(code: str, rng: np.random.Generator, skin: np.ndarray, dist: np.ndarray, rnorm: np.ndarray,
           softness: float = 1.0) -> np.ndarray:
    """Paint the lesion of class `code` over the skin image (float RGB 0..255); `softness` widens the fade
    at its border."""
    look = LOOKS[code]
    h, w = dist.shape
    colour = np.array(look.colour, np.float32) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    lesion = np.broadcast_to(colour, (h, w, 3)).copy()
    mottle = _smooth_noise(rng, h, w, 6)[..., None]
    lesion *= 1 + 0.08 * mottle
    if code == "akiec":  # rough scale: white flecks on a speckled red
        lesion *= 1 + 0.12 * rng.standard_normal((h, w, 1)).astype(np.float32)
        flecks = rng.random((h, w)) < 0.06
        lesion[flecks] = 0.4 * lesion[flecks] + 0.6 * 245
    elif code == "bcc":  # pearly sheen and branching red vessels
        lesion += 18 * (1 - rnorm[..., None]) ** 2
        for _ in range(rng.integers(2, 4)):
            a, b = rng.uniform(0, 2 * math.pi, 2)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            line = np.abs(np.sin(a) * (xx - w / 2) - np.cos(a) * (yy - h / 2) + 4 * np.sin(0.3 * xx + b))
            lesion[line < 0.8] = (190, 40, 55)
    elif code == "bkl":  # waxy with dark crypts
        crypts = rng.random((h, w)) < 0.05
        lesion[crypts] *= 0.55
    elif code == "df":  # brown ring around a white scar-like centre
        centre = np.clip((0.55 - rnorm) / 0.15, 0, 1)[..., None]
        lesion = lesion * (1 - centre) + np.array((238, 222, 212), np.float32) * centre
    elif code == "mel":  # blotches of blue-grey and black, very uneven
        blotch = _smooth_noise(rng, h, w, 4)[..., None]
        blue = np.array((95, 105, 130), np.float32)
        lesion = np.where(blotch > 0.25, 0.5 * lesion + 0.5 * blue, lesion * (1 + 0.25 * blotch))
    elif code == "nv":  # faint pigment network
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        net = (np.sin(xx * 1.3) * np.sin(yy * 1.3) > 0.6)[..., None]
        lesion = np.where(net, lesion * 0.85, lesion)
        lesion *= (1 + 0.15 * (rnorm[..., None] - 0.5))
    elif code == "vasc":  # darker lobule centres
        lesion *= (0.8 + 0.2 * rnorm[..., None])
    alpha = np.clip(dist / (look.softness * softness) + 0.5, 0, 1)[..., None]
    return skin * (1 - alpha) + lesion * alpha


def _skin(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Skin background with a slight texture and the dark vignette of a dermoscope's lens."""
    tone = np.array((228, 188, 160), np.float32) * rng.uniform(0.88, 1.05)
    tone += rng.uniform(-8, 8, 3).astype(np.float32)
    skin = tone * (1 + 0.04 * _smooth_noise(rng, h, w, 5)[..., None])
    skin += 3 * rng.standard_normal((h, w, 1)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    vignette = np.clip((r - 1.05) / 0.25, 0, 1)[..., None]
    return skin * (1 - 0.85 * vignette)


def render_lesion(code: str, seed: int, size: tuple[int, int] = DEMO_IMAGE_SIZE, view: int = 0,
                  difficulty: str = "easy") -> tuple[np.ndarray, np.ndarray]:
    """One lesion of class `code`: (RGB uint8 image H×W×3, mask uint8 H×W with values 0/1).

    `seed` fixes the lesion; `view` > 0 gives another photograph of the same
    lesion (same shape and colour, new skin noise and lighting), as HAM10000
    holds several images of some lesions.  ``difficulty="hard"`` adds what makes
    real dermoscopy hard to segment (`_hard_view`); the mask stays the lesion's shape.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    w, h = size
    shape_rng = np.random.default_rng([seed, 0])
    offset, softness, contrast = (0.0, 0.0), 1.0, 1.0
    if difficulty == "hard":  # the lesion's own hard traits, from a stream of their own (easy lesions unchanged)
        traits = np.random.default_rng([seed, 3])
        if traits.random() < 0.3:  # off centre, crossing the frame
            angle, d = traits.uniform(0, 2 * math.pi), traits.uniform(0.3, 0.45) * min(h, w)
            offset = (d * math.sin(angle), d * math.cos(angle))
        softness, contrast = traits.uniform(5.0, 9.0), traits.uniform(0.4, 0.7)
    dist, rnorm = _lesion_shape(code, shape_rng, h, w, offset)
    view_rng = np.random.default_rng([seed, 1 + view])
    skin = _skin(view_rng, h, w)
    image = _paint(code, np.random.default_rng([seed, 0, 1]), skin, dist, rnorm, softness)
    if difficulty == "hard":
        image = _hard_view(skin + contrast * (image - skin), np.random.default_rng([seed, 4 + view]))
    image *= view_rng.uniform(0.94, 1.06)
    mask = (dist > 0).astype(np.uint8)
    return np.clip(image, 0, 255).astype(np.uint8), mask


HAIR_REACH = 2
"""Pixels a hair's curve point can darken: those within this many pixels of it along each axis (a hair's half-width
is at most 1.2 pixels)."""


def _near_distance(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """Each pixel's distance to the nearest of `points` (N×2, x then y) where that is under `HAIR_REACH` pixels,
    and infinity elsewhere: the exact values of the all-pixels-to-all-points minimum below that reach (so a hair
    drawn from it has the same bytes) at the cost of a window around each point, not of the whole image."""
    offsets = np.arange(-HAIR_REACH, HAIR_REACH + 1)
    px = np.floor(points[:, 0]).astype(np.int64)[:, None, None] + offsets[None, None, :]
    py = np.floor(points[:, 1]).astype(np.int64)[:, None, None] + offsets[None, :, None]
    px, py = np.broadcast_arrays(px, py)
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    cx = np.broadcast_to(points[:, 0, None, None], px.shape)[inside]
    cy = np.broadcast_to(points[:, 1, None, None], py.shape)[inside]
    px, py = px[inside], py[inside]
    # the same float64 arithmetic as hypot(xx - x, yy - y) on the float32 pixel grid (whose integers are exact)
    dist = np.hypot(px.astype(np.float64) - cx, py.astype(np.float64) - cy)
    out = np.full(h * w, np.inf)
    np.minimum.at(out, py * w + px, dist)
    return out.reshape(h, w)


def _hard_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One photograph's hard conditions over a painted image (float RGB): uneven illumination and a
    stronger, off-centre vignette; hair strands across lesion and skin; sometimes air bubbles or the
    ruler marks of a dermoscope's scale."""
    h, w, _ = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t, a = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.35)
    light = 1 + a * 2 * ((xx / w - 0.5) * math.cos(t) + (yy / h - 0.5) * math.sin(t))
    light += 0.1 * _smooth_noise(rng, h, w, 3)
    cy, cx = h / 2 * (1 + rng.uniform(-0.2, 0.2)), w / 2 * (1 + rng.uniform(-0.2, 0.2))
    r = np.hypot((yy - cy) / (h / 2), (xx - cx) / (w / 2))
    light *= 1 - 0.7 * np.clip((r - rng.uniform(0.75, 0.95)) / 0.3, 0, 1)
    image = image * light[..., None]
    for _ in range(int(rng.integers(3, 11))):  # hair: dark quadratic curves, about a pixel wide
        p0, p2 = rng.uniform(0, 1, 2) * (w, h), rng.uniform(0, 1, 2) * (w, h)
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.25, 2) * (w, h)
        s = np.linspace(0, 1, 4 * max(h, w))[:, None]
        curve = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s ** 2 * p2
        d = _near_distance(curve, h, w)
        alpha = np.clip(1 - d / rng.uniform(0.6, 1.2), 0, 1)[..., None] * rng.uniform(0.6, 0.95)
        image = image * (1 - alpha) + np.array((38, 27, 22), np.float32) * rng.uniform(0.7, 1.3) * alpha
    if rng.random() < 0.4:  # air bubbles: bright discs with a dark rim
        for _ in range(int(rng.integers(1, 4))):
            by, bx, br = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 5)
            d = np.hypot(yy - by, xx - bx)
            image = image + (30 * np.clip(1 - (d / br) ** 2, 0, 1))[..., None]
            image = image * (1 - 0.5 * np.clip(1 - np.abs(d - br) / 0.8, 0, 1))[..., None]
    if rng.random() < 0.3:  # ruler marks along the bottom edge
        spacing, x0 = int(rng.integers(4, 7)), int(rng.integers(0, 4))
        for i, x in enumerate(range(x0, w, spacing)):
            length = 6 if i % 5 == 0 else 3
            image[h - 2 - length:h - 2, x] *= 0.35
    return image


def write_demo_dataset(root: str | Path, counts: dict[str, int] | None = None, seed: int = 0,
                       size: tuple[int, int] = DEMO_IMAGE_SIZE, first_number: int = 0,
                       difficulty: str = "easy") -> Path:
    """Write a HAM10000-layout folder of procedural lesions; returns `root`.

    `counts` is images per class (default `demo_counts()`); about a fifth of the
    lesions get a second image, as in HAM10000 (lesion_id shared).  Image and lesion ids
    count from `first_number` (a second set with other ids: a separate test set).  `difficulty`:
    `render_lesion`'s.
    """
    counts = counts or demo_counts()
    root = Path(root)
    for d in (*IMAGE_DIRS, MASKS_DIR):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    rows = []
    image_number = lesion_number = first_number
    for cls in CLASSES:
        made = 0
        while made < counts.get(cls.code, 0):
            lesion_seed = int(rng.integers(2**31))
            views = 1 if made + 1 == counts[cls.code] or rng.random() > 0.2 else 2
            age = "" if rng.random() < 0.03 else str(int(rng.integers(1, 18)) * 5)
            sex = str(rng.choice(["male", "female", "unknown"], p=[0.53, 0.45, 0.02]))
            site = str(rng.choice(LOCALIZATIONS))
            lesion_id = f"HAM_{lesion_number:07d}"
            lesion_number += 1
            for view in range(views):
                image, mask = render_lesion(cls.code, lesion_seed, size, view, difficulty)
                image_id = f"ISIC_{image_number:07d}"
                folder = IMAGE_DIRS[image_number % 2]
                image_number += 1
                Image.fromarray(image).save(root / folder / f"{image_id}.jpg", quality=92)
                Image.fromarray(mask * 255).save(root / MASKS_DIR / f"{image_id}_segmentation.png")
                dx_type = "histo" if cls.code != "nv" or rng.random() < 0.3 else "follow_up"
                rows.append([lesion_id, image_id, cls.code, dx_type, age, sex, site, "demo"])
                made += 1
    with open(root / METADATA_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"])
        writer.writerows(rows)
    return root


def render_batch(per_class: int, seed: int, size: int = 64,
                 difficulty: str = "easy") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_class` square lesions of every class, in memory: (images N×S×S×3, masks N×S×S, class indices N).

    The demo base model is pretrained on such a class-balanced set, drawn from
    seeds apart from any demo dataset: it stands in for Stable Diffusion's
    web-scale pretraining, and never sees the demo "real" data.
    """
    images, masks, labels = [], [], []
    for cls in CLASSES:
        for i in range(per_class):
            image, mask = render_lesion(cls.code, seed * 1_000_003 + cls.index * 100_003 + i, (size, size),
                                        difficulty=difficulty)
            images.append(image)
            masks.append(mask)
            labels.append(cls.index)
    return np.stack(images), np.stack(masks), np.array(labels, np.int64)
