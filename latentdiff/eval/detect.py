"""Find the coloured shapes in an image: background, then objects (colour, shape, centre), numpy only.

1. background: the median of the border pixels, named by the nearest of the three backgrounds.
2. per pixel, for each palette colour c, unmix p = bg + alpha * (c - bg): anti-aliased and blurred edges
   lie on that segment. A pixel is foreground when its best colour explains it with alpha >= 0.5.
3. connected components (8-neighbour) of the foreground; specks under `MIN_AREA` of the canvas dropped.
4. per component: colour = palette colour nearest the median of its core (alpha ~1) pixels.
5. shape by analysis-by-synthesis: the component's soft silhouette (its alpha) against each shape rendered
   with the same area and centroid (which blur leaves alone), blurred by the best of a few widths; the
   least-squares fit wins. The fitted template also gives the object's centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from latentdiff.data.shapes import BACKGROUNDS, COLORS, SUPERSAMPLE, ShapeObject, shape_polygon
from latentdiff.eval.captions import SHAPE_NAMES

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (8, 3)
COLOR_NAMES = list(COLORS)
BG_PALETTE = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
BG_NAMES = list(BACKGROUNDS)

WORK_SIZE = 128  # larger images are box-filtered down to this first
MAX_BG_DISTANCE = 60.0  # border median further than this (RGB) from every background: background unknown
MIN_ALPHA = 0.5  # foreground: at least half object colour
MAX_RESIDUAL = 70.0  # and within this (RGB) of the bg-to-colour segment
CORE_ALPHA = 0.85  # pixels this solid give the object's colour
MIN_AREA = 0.004  # components smaller than this fraction of the canvas are noise
MAX_COLOR_DISTANCE = 110.0  # a component whose median colour is further than this from the palette: no object
PAD = 3  # pixels around a component that its soft silhouette may reach (anti-aliasing, blur)
BLUR_SIGMAS = (0.0, 0.5, 0.9, 1.4, 2.0)  # blur widths tried per template, pixels at 64x64


@dataclass
class FoundObject:
    color: str
    shape: str  # circle | square | triangle | star
    cx: float  # bounding-box centre, fraction of the width
    cy: float  # fraction of the height
    area: float  # fraction of the canvas


@dataclass
class Detection:
    background: str | None  # white | black | gray, or None when the border matches none of them
    objects: list[FoundObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "objects": [
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(o).items()} for o in self.objects
            ],
        }


def detect(image: Image.Image) -> Detection:
    """Find the background and every object in `image` (any size, RGB or convertible)."""
    image = image.convert("RGB")
    if max(image.size) > WORK_SIZE:
        scale = WORK_SIZE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BOX)
    x = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    h, w, _ = x.shape

    # 1. background from the border
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    bg = np.median(border, axis=0)
    bg_dist = np.linalg.norm(BG_PALETTE - bg, axis=1)
    background = BG_NAMES[int(bg_dist.argmin())] if bg_dist.min() <= MAX_BG_DISTANCE else None

    # 2. unmix each pixel against each palette colour
    d = PALETTE - bg  # (8, 3)
    v = x - bg  # (H, W, 3)
    raw_alpha = (v @ d.T) / np.maximum((d * d).sum(1), 1.0)  # (H, W, 8)
    alpha = np.clip(raw_alpha, 0.0, 1.0)
    residual = np.linalg.norm(v[:, :, None, :] - alpha[..., None] * d, axis=-1)  # (H, W, 8)
    residual = np.where(alpha >= MIN_ALPHA, residual, np.inf)  # only colours that explain a majority
    best = residual.argmin(-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    mask = (best_alpha >= MIN_ALPHA) & (best_residual <= MAX_RESIDUAL)

    # 3. components
    labels = connected_components(mask)
    objects = []
    for label in np.unique(labels[labels >= 0]):
        comp = labels == label
        area = int(comp.sum())
        if area < MIN_AREA * h * w:
            continue
        # 4. colour from the core pixels
        core = comp & (best_alpha >= CORE_ALPHA)
        if core.sum() < 3:
            core = comp
        dist = np.linalg.norm(PALETTE - np.median(x[core], axis=0), axis=1)
        if dist.min() > MAX_COLOR_DISTANCE:
            continue
        c = int(dist.argmin())
        # 5. shape from the soft silhouette in that colour, other components blanked out
        ys, xs = np.nonzero(comp)
        y0, y1 = max(ys.min() - PAD, 0), min(ys.max() + 1 + PAD, h)
        x0, x1 = max(xs.min() - PAD, 0), min(xs.max() + 1 + PAD, w)
        level = max(float(np.median(raw_alpha[..., c][core])), 0.5)  # the object's own alpha (colour jitter)
        soft = np.clip(raw_alpha[y0:y1, x0:x1, c] / level, -0.5, 1.5)
        crop = labels[y0:y1, x0:x1]
        soft[_dilate((crop >= 0) & (crop != label))] = 0.0
        shape, cx, cy = fit_shape(soft, scale=max(h, w) / 64)
        objects.append(FoundObject(COLOR_NAMES[c], shape, float((x0 + cx) / w), float((y0 + cy) / h), area / (h * w)))
    objects.sort(key=lambda o: (o.cx, o.cy))
    return Detection(background, objects)


def _unit_templates() -> dict[str, tuple[float, float, float]]:
    """Per shape at width 1 centred at 0: (area, centroid x, centroid y), by the shoelace formula."""
    out = {}
    for shape in SHAPE_NAMES:
        px, py = np.array(shape_polygon(ShapeObject(shape, "red", 0.0, 0.0, 1.0))).T
        qx, qy = np.roll(px, -1), np.roll(py, -1)
        cross = px * qy - qx * py
        a = cross.sum() / 2
        out[shape] = (
            abs(a),
            float(((px + qx) * cross).sum() / (6 * a)),
            float(((py + qy) * cross).sum() / (6 * a)),
        )
    return out


UNIT_TEMPLATES = _unit_templates()


def fit_shape(soft: np.ndarray, scale: float = 1.0) -> tuple[str, float, float]:
    """The shape whose rendering best matches the silhouette `soft` (least squares, best blur of a few);
    returns (shape, bounding-box centre x, y) in the crop's pixels. Mass and centroid fix each template's
    size and place: blur moves neither."""
    h, w = soft.shape
    weights = np.clip(soft, 0.0, None)
    mass = float(weights.sum())
    gy, gx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    mx, my = float((weights * gx).sum() / mass), float((weights * gy).sum() / mass)
    best = (np.inf, "circle", mx, my)
    for shape, (unit_area, ux, uy) in UNIT_TEMPLATES.items():
        size = (mass / unit_area) ** 0.5
        cx, cy = mx - ux * size, my - uy * size
        template = _coverage(ShapeObject(shape, "red", cx, cy, size), h, w)
        for sigma in BLUR_SIGMAS:
            err = float(((_blur(template, sigma * scale) - soft) ** 2).sum())
            if err < best[0]:
                best = (err, shape, cx, cy)
    return best[1], best[2], best[3]


def _coverage(obj: ShapeObject, h: int, w: int) -> np.ndarray:
    """Fraction of each pixel an object covers, (h, w), supersampled like the renderer."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (w * k, h * k), 0)
    ImageDraw.Draw(canvas).polygon([(x * k - 0.5, y * k - 0.5) for x, y in shape_polygon(obj)], fill=255)
    return np.asarray(canvas.reduce(k), dtype=np.float32) / 255.0


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a small map as two matrix products (zero outside)."""
    if sigma <= 0:
        return x
    return _blur_matrix(x.shape[0], sigma) @ x @ _blur_matrix(x.shape[1], sigma).T


@lru_cache(maxsize=1024)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    i = np.arange(n)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)
    return g.astype(np.float32)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    return np.logical_or.reduce(
        [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )


def connected_components(mask: np.ndarray) -> np.ndarray:
    """8-neighbour labels of a boolean mask (-1 off it), by min-label propagation + pointer jumping."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.minimum.reduce(neighbours), big)
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[flat[new.ravel()]].reshape(h, w), big)  # jump: label of my label
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new
