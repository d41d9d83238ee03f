"""How a phantom is drawn: the posed coordinate grid, anatomy and findings, exposure, noise.

The renderer is vectorised NumPy at ``internal_size(resolution)`` (128 px for outputs up to
256 px), resized smoothly to the output; noise is added at the output resolution. Local
features are drawn in windows around them, so a phantom costs a few milliseconds. Import the
public names from :mod:`cxrfactory.data.phantom`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxrfactory.data.phantom_anatomy import (
    CM_PER_IMAGE,
    MIN_RESOLUTION,
    SIGNS,
    PhantomSpec,
    CLEARANCE,
    Chest,
    apply_findings,
    heart_distance,
    lung_distance,
    patient_chest,
)

# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

def _edge(distance: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance: 0 outside, 1 inside, a ramp ``width`` wide.

    A linear ramp (not a smoothstep) because it is 3x cheaper and the output resize smooths it.
    """
    t = distance * (1.0 / width)
    t += 0.5
    return np.clip(t, 0.0, 1.0, out=t)


@functools.lru_cache(maxsize=8)
def _base_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an n x n image: x in [-0.5, 0.5] (1, n), y in [0, 1] (n, 1)."""
    ticks = (np.arange(n, dtype=np.float32) + 0.5) / n
    return ticks[None, :] - 0.5, ticks[:, None]


@dataclass(frozen=True)
class _Canvas:
    """The posed coordinate grid: canonical (X, Y) of every pixel, and its inverse for windows."""

    X: np.ndarray  # (n, n) canonical X of each pixel centre
    Y: np.ndarray  # (n, n) canonical Y
    angle: float  # patient rotation, radians
    scale: float  # patient size on the film
    offset: tuple[float, float]  # patient shift (x, y), image-side units

    @classmethod
    def posed(cls, n: int, angle: float, scale: float, offset: tuple[float, float]) -> _Canvas:
        gx, gy = _base_grid(n)
        dx, dy = gx - offset[0], gy - 0.5 - offset[1]
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        return cls(cos * dx + sin * dy, cos * dy - sin * dx + 0.5, angle, scale, offset)

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Pixel rows and columns that cover the canonical box [x0, x1] x [y0, y1]."""
        n = self.X.shape[0]
        xs, ys = np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]) - 0.5
        cos, sin = math.cos(self.angle) * self.scale, math.sin(self.angle) * self.scale
        cols = (cos * xs - sin * ys + self.offset[0] + 0.5) * n
        rows = (sin * xs + cos * ys + self.offset[1] + 0.5) * n
        r0, r1 = max(0, int(rows.min()) - 1), min(n, int(math.ceil(rows.max())) + 1)
        c0, c1 = max(0, int(cols.min()) - 1), min(n, int(math.ceil(cols.max())) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Band-limited noise in about [0, 1]: a ``cells``-square random grid upsampled to n x n."""
    coarse = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((n, n), Image.BICUBIC))


def _streaks(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, count: int, phase: float,
             sharpness: int, reach: float) -> np.ndarray:
    """Curving streaks radiating from (cx, cy), fading with distance (vessels, bronchi)."""
    dx, dy = X - cx, Y - cy
    r = np.sqrt(dx * dx + dy * dy)
    wave = 0.5 + 0.5 * np.cos(count * np.arctan2(dy, dx) + phase + 14.0 * r)
    return wave ** sharpness * np.exp(r * (-1.0 / reach))


def _disc(X: np.ndarray, Y: np.ndarray, x: float, y: float, radius: float,
          soft: float) -> np.ndarray:
    return _edge(radius - np.sqrt((X - x) ** 2 + (Y - y) ** 2), soft)


def _draw(c: Chest, cv: _Canvas, view: str, rng: np.random.Generator) -> np.ndarray:
    """Brightness (about 0 = air .. 1 = bone) of the chest ``c`` on the canvas ``cv``."""
    B, heart = _draw_body(c, cv, view)
    lungs = _draw_lungs(c, cv, B, heart)
    _draw_lesions(c, cv, B, lungs, rng)
    return B


def _draw_body(c: Chest, cv: _Canvas, view: str) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue, trachea, spine, clavicles and heart; returns (brightness, heart mask)."""
    X, Y = cv.X, cv.Y
    # Body and soft tissue: a neck widening into the shoulders, thicker (brighter) centrally
    ax = np.abs(X)
    body_w = 0.085 + (c.body_w - 0.085) * _edge(Y - 0.07, 0.11) - 0.07 * Y * Y
    B = _edge(body_w - ax, 0.012) * (0.62 - 0.12 * np.minimum(ax / body_w, 1.0) ** 2)
    win = cv.window(-0.05, 0.05, 0.0, 0.4)  # trachea, down to the carina
    B[win] -= 0.1 * _edge(0.016 - np.abs(X[win]), 0.01) * _edge(0.36 - Y[win], 0.02)
    win = cv.window(-0.05, 0.05, -0.2, 1.2)  # spine, vertebra by vertebra
    B[win] += (0.1 + 0.03 * np.cos(Y[win] * (2.0 * math.pi / 0.05))) * _edge(
        0.03 - np.abs(X[win]), 0.008)

    # Heart: no lung where it sits, and a little denser than soft tissue
    hx = c.heart_x + c.shift
    heart_win = cv.window(hx - c.heart_right - 0.02, hx + c.heart_left + 0.02,
                          c.heart_y - c.heart_h - 0.02, c.heart_y + c.heart_h + 0.02)
    heart = np.zeros_like(X)
    heart[heart_win] = _edge(heart_distance(c, X[heart_win], Y[heart_win]), 0.008)
    B += 0.05 * heart

    # Clavicles (higher on an AP film)
    lift = 0.03 if view == "AP" else 0.0
    win = cv.window(-0.36, 0.36, 0.0, 0.25)
    sx = np.abs(X[win]) - 0.04
    clavicle_y = 0.155 - lift - 0.2 * sx + 0.2 * sx * sx
    B[win] += 0.16 * (_edge(0.014 - np.abs(Y[win] - clavicle_y), 0.008)
                      * _edge(sx, 0.01) * _edge(0.3 - sx, 0.03))
    return B, heart


def _draw_lungs(c: Chest, cv: _Canvas, B: np.ndarray, heart: np.ndarray) -> np.ndarray:
    """Add both lungs, their markings, the ribs over them, pneumothorax and effusion to ``B``;
    returns the lungs' air fraction (heart excluded)."""
    X, Y = cv.X, cv.Y
    lungs = np.zeros_like(X)  # both lungs' air fraction, for findings that cross sides
    bottom = max(c.dome_y) + c.cp_drop + 0.03
    for side in (0, 1):
        sign = SIGNS[side]
        lo, hi = sorted((sign * 0.02 + c.shift, sign * (c.half_width + 0.05)))
        win = cv.window(lo, hi, 0.0, bottom)
        Xs, Ys = X[win], Y[win]
        distance = lung_distance(c, Xs, Ys, side)
        field = _edge(distance, 0.008)  # the lung as drawn on the film, heart included
        lung = field * (1.0 - heart[win])
        add = np.zeros_like(Xs)
        # vessels fan out from the hilum, which the mediastinum hides
        vessels = _streaks(Xs, Ys, sign * 0.055 + c.shift, 0.45, c.vessel_n[side],
                           c.vessel_phase[side], 8, 0.22)
        if c.pneumothorax is not None and c.pneumothorax[0] == side:
            # the lung collapses towards its hilum; the rim it leaves holds air, no markings
            k = c.pneumothorax[1]
            px, py = sign * (c.mediastinum + 0.04) + c.shift, c.dome_y[side]
            d = lung_distance(c, px + (Xs - px) / k, py + (Ys - py) / k, side) * k
            collapsed = _edge(d, 0.006)
            vessels *= collapsed
            add += lung * (0.12 * np.exp(-((d / 0.005) ** 2)) + 0.04 * collapsed
                           - 0.15 * (1.0 - collapsed))
        # air replaces soft tissue, thickest away from the lung's edges
        add += lung * (0.08 * vessels - 0.3 - 0.08 * _edge(distance - 0.03, 0.06))
        # posterior ribs: arches from the spine curving down to the lateral wall
        sx = sign * Xs
        q = (Ys - (2.2 * sx - 0.45) * sx) * (1.0 / c.rib_spacing) + c.rib_phase
        rib = 0.5 - 0.5 * np.cos(2.0 * math.pi * q)
        rib *= rib  # squared twice below: narrow bright bands
        thorax = (_edge(c.half_width + 0.03 - sx, 0.02) * _edge(sx - 0.03, 0.02)
                  * _edge(Ys - 0.1, 0.04) * _edge(c.dome_y[side] + 0.05 - Ys, 0.06))
        add += 0.08 * rib * rib * thorax
        for s, rise in c.effusion:  # fluid in the recess, its meniscus rising laterally
            if s == side:
                u = np.clip((sx - c.mediastinum) / (c.half_width - c.mediastinum), 0.0, 1.0)
                meniscus = c.dome_y[side] + 0.02 - rise * (0.25 + 0.75 * u * u)
                fluid = _edge(Ys - meniscus, 0.02) * lung
                add += fluid * (0.32 + 0.06 * _edge(Ys - meniscus - 0.05, 0.05))
        B[win] += add
        lungs[win] += lung
    return lungs


def _draw_lesions(c: Chest, cv: _Canvas, B: np.ndarray, lungs: np.ndarray,
                  rng: np.random.Generator) -> None:
    """Add the opacities (nodules, mass, consolidation, haze, plate, patches) to ``B``, each
    local one in its own window."""
    X, Y = cv.X, cv.Y
    n = X.shape[0]
    for x, y, d in c.nodules:
        win = cv.window(x - d, x + d, y - d, y + d)
        B[win] += 0.34 * _disc(X[win], Y[win], x, y, 0.5 * d, 0.004) * (
            0.3 + 0.7 * lungs[win])
    if c.mass is not None:
        x, y, d, phase = c.mass
        win = cv.window(x - d, x + d, y - d, y + d)
        dx, dy = X[win] - x, Y[win] - y
        phi = np.arctan2(dy, dx)
        radius = 0.5 * d * (1.0 + 0.08 * np.cos(3 * phi + phase) + 0.04 * np.cos(5 * phi - phase))
        B[win] += 0.46 * _edge(radius - np.sqrt(dx * dx + dy * dy), 0.006) * (
            0.3 + 0.7 * lungs[win])
    if c.consolidation is not None:
        x, y, radius = c.consolidation
        side = int(x > c.shift)
        win = cv.window(x - 2 * radius, x + 2 * radius, y - 2 * radius, y + 2 * radius)
        Xs, Ys = X[win], Y[win]
        r = np.sqrt((Xs - x) ** 2 + (Ys - y) ** 2)
        wobble = 1.0 + 0.3 * (_smooth_noise(rng, n, 5)[win] - 0.5)
        # a lobe: ill-defined towards the hilum and the wall, sharp along its fissure
        if y < 0.42:  # upper lobe, bounded below by the horizontal fissure
            fissure = _edge(y + 0.6 * radius - Ys, 0.006)
        else:  # lower lobe, bounded above by the oblique fissure
            fissure = _edge(Ys - (y - 0.45 * radius) + 0.4 * SIGNS[side] * (Xs - x), 0.006)
        # it spares a rim of aerated lung, so it reads as an opacity inside the lung
        spared = np.minimum(lung_distance(c, Xs, Ys, side), -heart_distance(c, Xs, Ys))
        region = _edge(radius * wobble - r, 0.03) * fissure * _edge(spared - CLEARANCE, 0.01)
        bronchi = _streaks(Xs, Ys, SIGNS[side] * 0.08 + c.shift, 0.45, 9,
                           rng.uniform(0, 2 * math.pi), 12, 0.5)
        B[win] += region * (0.32 - 0.1 * bronchi * _edge(0.8 * radius - r, 0.03)) * (
            0.3 + 0.7 * lungs[win])
    if c.infiltration is not None:  # reticulonodular texture (~1 cm) over patchy areas
        patchy = _edge(_smooth_noise(rng, n, 6) - 0.3, 0.3)
        reticular = _smooth_noise(rng, n, int(CM_PER_IMAGE / 0.9))
        weight = np.where(X < c.shift, c.infiltration[0], c.infiltration[1]) * lungs
        B += weight * patchy * (0.08 + 0.1 * reticular)
    if c.plate is not None:  # plate-like (discoid) atelectasis: a thin horizontal band
        x, y, length, thick, tilt = c.plate
        win = cv.window(x - length, x + length, y - length, y + length)
        dx, dy = X[win] - x, Y[win] - y
        u = dx * math.cos(tilt) + dy * math.sin(tilt)
        v = dy * math.cos(tilt) - dx * math.sin(tilt)
        B[win] += 0.34 * (_edge(0.5 * thick - np.abs(v), 0.004)
                         * _edge(0.5 * length - np.abs(u), 0.01) * lungs[win])
    for x, y, radius in c.patches:  # findings outside the vocabulary: a mild generic opacity
        win = cv.window(x - radius, x + radius, y - radius, y + radius)
        B[win] += 0.07 * _disc(X[win], Y[win], x, y, radius, 0.04) * lungs[win]


def internal_size(resolution: int) -> int:
    """Side at which ``render`` draws before resizing: half the output, at least 128 px."""
    return max(128, resolution // 2)


def render(spec: PhantomSpec, resolution: int = 256) -> np.ndarray:
    """Draw one phantom: a ``(resolution, resolution)`` uint8 image, a pure function of spec."""
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be at least {MIN_RESOLUTION} px, got {resolution}")
    rng = np.random.default_rng([spec.seed, 0x5EED])
    chest = apply_findings(patient_chest(spec), spec, rng)
    n = internal_size(resolution)
    canvas = _Canvas.posed(n, angle=math.radians(rng.uniform(-4.0, 4.0)),
                           scale=rng.uniform(0.95, 1.03),
                           offset=(rng.normal(0.0, 0.012), rng.normal(0.0, 0.012)))
    B = _draw(chest, canvas, spec.view, rng)

    # Exposure: gain, offset and gamma vary between films; AP films are a little flatter
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(0.0, 0.04)
    if spec.view == "AP":
        gain, offset = gain * 0.94, offset + 0.03
    image = offset + gain * np.maximum(B, 0.0) ** rng.uniform(0.85, 1.15)
    if resolution != n:
        filt = Image.BICUBIC if resolution > n else Image.BOX
        image = np.asarray(Image.fromarray(image.astype(np.float32), mode="F")
                           .resize((resolution, resolution), filt))
    # Quantum noise; uniform noise of the same variance is 5x cheaper than Gaussian
    sigma = rng.uniform(0.008, 0.02)
    noise = rng.random(image.shape, dtype=np.float32)
    image = image + (noise - 0.5) * (sigma * math.sqrt(12.0))
    return np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
