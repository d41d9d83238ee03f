"""What a phantom is: its spec, the patient's chest geometry, and how findings change it.

Canonical coordinates, in units of the image side: X in [-0.5, 0.5] from the image's left to its
right (the patient's right lung is on the image's left, as on a PA film), Y in [0, 1] from top
to bottom. Sides are indexed 0 = image left, 1 = image right; ``SIGNS[side]`` mirrors X onto a
side. The signatures are listed in :mod:`cxrfactory.data.phantom`; import public names there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from cxrfactory import labels as L

#: Field of view of a phantom, in cm (NIH's 1024-px images span about 43 cm).
CM_PER_IMAGE = 43.0
#: Side of NIH's images, the frame of ``LesionBox`` coordinates.
NIH_IMAGE_PX = 1024
#: Smallest output side.
MIN_RESOLUTION = 32
#: Bumped whenever the drawing changes, so a folder of older phantoms is not "resumed".
RENDERER_VERSION = 1

#: Signature ranges (the measurement module and the tests rely on them).
NORMAL_CTR = (0.36, 0.45)
CARDIOMEGALY_CTR = (0.57, 0.68)
NODULE_CM = (2.3, 2.9)
MASS_CM = (4.5, 6.0)
CONSOLIDATION_CM = (6.0, 7.5)  # diameter of the consolidated region before its fissure cut
AP_HEART_MAGNIFICATION = 1.04
#: Lung kept free around a lesion (image-side units, 5 px at 128), so it reads as a lesion
#: inside the lung rather than a bulge of the mediastinum or the chest wall.
CLEARANCE = 0.04


@dataclass(frozen=True)
class LesionBox:
    """One NIH bounding box: where a finding sits on the 1024-px image."""

    finding: str  # NIH finding name (BBox_List's "Infiltrate" is stored as "Infiltration")
    x: float  # left edge, px of NIH's 1024-px image
    y: float  # top edge, px
    w: float  # width, px
    h: float  # height, px

    @property
    def center(self) -> tuple[float, float]:
        """Box centre as (x, y) fractions of the image side."""
        return ((self.x + self.w / 2) / NIH_IMAGE_PX, (self.y + self.h / 2) / NIH_IMAGE_PX)


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that defines one phantom image (render(spec) is a pure function of it)."""

    image_id: str  # NIH Image Index, "<patient:08d>_<follow-up:03d>.png"
    patient_id: int
    follow_up: int  # 0 for a patient's first image
    age: int  # years
    gender: str  # "M" or "F"
    view: str  # "PA" or "AP"
    findings: tuple[str, ...] = ()  # NIH finding names in the CSV's order; () = No Finding
    boxes: tuple[LesionBox, ...] = ()  # NIH boxes of this image (may be empty)
    seed: int = 0  # image seed: pose, exposure, noise, lesions
    patient_seed: int = 0  # anatomy seed, shared by the patient's follow-ups

    @property
    def finding_labels(self) -> str:
        """NIH's ``Finding Labels`` cell."""
        return "|".join(self.findings) if self.findings else L.NIH_NO_FINDING

    @property
    def label(self) -> str:
        """The class of a single-finding spec (``Normal`` for none), else the first finding."""
        return L.nih_to_class(self.findings[0]) if self.findings else "Normal"


SIGNS = (-1.0, 1.0)


@dataclass(frozen=True)
class Chest:
    """The geometry of one image: the patient's anatomy with its findings applied."""

    half_width: float  # lateral lung edge |X| at the widest row: thoracic width / 2
    apex_y: float  # lung apex
    widest_y: float  # first row where the lung reaches half_width
    apex_x: float  # |X| of the apex
    mediastinum: float  # medial lung edge |X| below the apex
    dome_y: tuple[float, float]  # top of each hemidiaphragm (image left, image right)
    dome_x: float  # |X| of the dome tops
    cp_drop: float  # how far the lateral costophrenic angle lies below the dome top
    shift: float  # mediastinal shift in X (atelectasis pulls it towards the collapsed side)
    ctr: float  # cardiothoracic ratio of the drawn heart
    heart_x: float  # X where the heart's right and left halves meet
    heart_y: float  # heart centre Y (its widest row)
    heart_h: float  # heart half height
    body_w: float  # body half width at the shoulders
    rib_phase: float  # vertical phase of the rib pattern (rib spacings)
    rib_spacing: float  # distance between posterior ribs
    vessel_n: tuple[int, int]  # number of vessel streaks per side (per 2 pi)
    vessel_phase: tuple[float, float]
    # Findings (None / () when absent)
    effusion: tuple[tuple[int, float], ...] = ()  # (side, meniscus rise)
    pneumothorax: tuple[int, float] | None = None  # (side, collapse factor)
    nodules: tuple[tuple[float, float, float], ...] = ()  # (X, Y, diameter)
    mass: tuple[float, float, float, float] | None = None  # (X, Y, diameter, lobulation phase)
    consolidation: tuple[float, float, float] | None = None  # (X, Y, radius)
    infiltration: tuple[float, float] | None = None  # weights of (image left, image right)
    plate: tuple[float, float, float, float, float] | None = None  # X, Y, length, thick, tilt
    patches: tuple[tuple[float, float, float], ...] = ()  # generic mild opacities (X, Y, radius)

    @property
    def heart_right(self) -> float:
        """How far the heart reaches to the patient's right (image left) of ``heart_x``."""
        return 0.38 * 2.0 * self.ctr * self.half_width

    @property
    def heart_left(self) -> float:
        """How far the heart reaches to the patient's left (image right): 62 % of its width."""
        return 0.62 * 2.0 * self.ctr * self.half_width


def patient_chest(spec: PhantomSpec) -> Chest:
    """The patient's normal anatomy, from ``patient_seed`` (and gender) only."""
    rng = np.random.default_rng([spec.patient_seed, 0xC4E57])
    size = rng.uniform(0.95, 1.04) * (1.0 if spec.gender == "M" else 0.97)
    dome_right = rng.uniform(0.64, 0.68)  # the patient's right dome (image left) is higher
    return Chest(
        half_width=0.325 * size,
        apex_y=rng.uniform(0.11, 0.14),
        widest_y=rng.uniform(0.50, 0.56),
        apex_x=rng.uniform(0.13, 0.16),
        mediastinum=rng.uniform(0.06, 0.075),
        dome_y=(dome_right, dome_right + rng.uniform(0.015, 0.035)),
        dome_x=rng.uniform(0.15, 0.19),
        cp_drop=rng.uniform(0.08, 0.11),
        shift=0.0,
        ctr=rng.uniform(*NORMAL_CTR),
        heart_x=rng.uniform(-0.005, 0.015),
        heart_y=rng.uniform(0.58, 0.61),
        heart_h=rng.uniform(0.13, 0.15),
        body_w=rng.uniform(0.44, 0.48),
        rib_phase=rng.uniform(0.0, 1.0),
        rib_spacing=rng.uniform(0.058, 0.066),
        vessel_n=(int(rng.integers(15, 22)), int(rng.integers(15, 22))),
        vessel_phase=(rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)),
    )


def lung_distance(c: Chest, X: np.ndarray, Y: np.ndarray, side: int) -> np.ndarray:
    """Signed distance-like field of one lung (positive inside), in image-side units."""
    sign = SIGNS[side]
    sx = sign * X  # lateral coordinate of this side
    sx_med = sign * (X - c.shift)  # the medial edge moves with the mediastinum
    t = np.clip((Y - c.apex_y) / (c.widest_y - c.apex_y), 0.0, 1.0)
    e = np.sqrt(1.0 - (1.0 - t) ** 2)  # 0 at the apex, 1 from the widest row down
    x_lat = c.apex_x + (c.half_width - c.apex_x) * e
    x_med = c.apex_x - (c.apex_x - c.mediastinum) * np.sqrt(e)
    if side == 1:  # the aortic knob bulges into the patient's left (image right) lung
        x_med = x_med + 0.03 * np.exp(-(((Y - 0.31) / 0.045) ** 2))
    curve = c.cp_drop / (c.half_width - c.dome_x) ** 2
    # diaphragm: flat under the heart, curving down to the lateral costophrenic angle
    floor = c.dome_y[side] + curve * np.maximum(sx - c.dome_x, 0.0) ** 2
    d = np.minimum(x_lat - sx, sx_med - x_med)
    d = np.minimum(d, floor - Y)
    return np.minimum(d, Y - c.apex_y)


def heart_distance(c: Chest, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Distance-like field of the heart (positive inside): two half ellipses, the larger one to
    the patient's left (image right)."""
    dx = X - (c.heart_x + c.shift)
    half_w = np.where(dx > 0, c.heart_left, c.heart_right)
    hr = np.sqrt((dx / half_w) ** 2 + ((Y - c.heart_y) / c.heart_h) ** 2)
    return (1.0 - hr) * np.minimum(half_w, c.heart_h)


def _lung_side_at(c: Chest, x: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
    """Per point, the side whose lung holds it ``margin`` clear of its edges and of the heart;
    -1 where neither does."""
    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
    side_of = np.full(x.shape, -1)
    clear = heart_distance(c, x, y) < -margin
    for side in (0, 1):
        side_of[(side_of < 0) & clear & (lung_distance(c, x, y, side) > margin)] = side
    return side_of


def _place_in_lung(c: Chest, x: float, y: float, margin: float, side: int) -> tuple[float, float]:
    """Move (x, y) along the line to the lung's centre until it sits inside the lung."""
    cx, cy = SIGNS[side] * (c.half_width * 0.62), c.apex_y + 0.55 * (c.dome_y[side] - c.apex_y)
    t = np.linspace(0.0, 1.0, 21)
    px, py = x + t * (cx - x), y + t * (cy - y)
    hits = np.flatnonzero(_lung_side_at(c, px, py, margin) >= 0)
    return (float(px[hits[0]]), float(py[hits[0]])) if hits.size else (float(cx), float(cy))


def _plate_in_lung(c: Chest, side: int, y: float, length: float, margin: float,
                   rng: np.random.Generator) -> tuple[float, float]:
    """(centre X, length) of a horizontal band at height ``y`` inside one lung, clear of the
    heart and the walls by ``margin``; shortened when the lung is narrower there."""
    xs = SIGNS[side] * np.linspace(0.0, c.half_width, 64)
    inside = _lung_side_at(c, xs, np.full_like(xs, y), margin) == side
    if not inside.any():
        return SIGNS[side] * 0.62 * c.half_width, 0.0
    # the longest run of inside samples
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(int), [0]])))
    starts, stops = edges[::2], edges[1::2]
    best = int(np.argmax(stops - starts))
    lo, hi = sorted((float(xs[starts[best]]), float(xs[stops[best] - 1])))
    length = min(length, hi - lo)
    slack = hi - lo - length
    centre = lo + 0.5 * length + (rng.uniform(0.0, slack) if slack > 0 else 0.5 * slack)
    return float(centre), float(length)


def _random_lung_point(c: Chest, rng: np.random.Generator, margin: float,
                       side: int | None = None,
                       avoid: tuple[tuple[float, float, float], ...] = ()) -> tuple[float, float]:
    """A uniformly drawn point inside a lung (``side`` or either), ``margin`` from its edges
    and from the discs ``avoid`` ((x, y, diameter) of lesions drawn already)."""
    x = rng.uniform(-c.half_width, c.half_width, size=256)
    y = rng.uniform(c.apex_y, max(c.dome_y), size=256)
    hit = _lung_side_at(c, x, y, margin)
    for ax, ay, ad in avoid:
        hit[np.hypot(x - ax, y - ay) < 0.5 * ad + margin] = -1
    hits = np.flatnonzero(hit >= 0 if side is None else hit == side)
    if hits.size:
        return float(x[hits[0]]), float(y[hits[0]])
    chosen = 0 if side is None else side
    return _place_in_lung(c, SIGNS[chosen] * c.half_width * 0.62, 0.4, margin, chosen)


def _box_for(spec: PhantomSpec, finding: str) -> LesionBox | None:
    return next((box for box in spec.boxes if box.finding == finding), None)


def _side_of(box: LesionBox | None, rng: np.random.Generator) -> int:
    """Image side of a box (its centre's half), else a random side."""
    return int(rng.integers(0, 2)) if box is None else int(box.center[0] >= 0.5)


def _atelectasis(c: Chest, spec: PhantomSpec, rng: np.random.Generator) -> tuple[Chest, tuple]:
    """The lifted dome (and heart) and the plate-like band of a collapsed lower lobe."""
    cm = 1.0 / CM_PER_IMAGE
    box = _box_for(spec, "Atelectasis")
    side = _side_of(box, rng)
    domes = list(c.dome_y)
    lift = rng.uniform(0.06, 0.08)
    domes[side] -= lift
    # the heart rests on the left hemidiaphragm (image right) and rises with it
    c = dataclasses.replace(c, dome_y=(domes[0], domes[1]),
                            heart_y=c.heart_y - (lift if side == 1 else 0.0),
                            shift=SIGNS[side] * rng.uniform(0.01, 0.015))
    length, thick = rng.uniform(5.0, 7.0) * cm, rng.uniform(1.4, 1.8) * cm
    y = c.dome_y[side] - rng.uniform(0.06, 0.1)
    if box is not None:  # NIH's box sets the height, kept within the lower half
        y = float(np.clip(box.center[1], c.apex_y + 0.5 * (c.dome_y[side] - c.apex_y),
                          c.dome_y[side] - 0.05))
    # beside a heart the lower lung may be too narrow: move up until the band fits
    for _ in range(8):
        x, fits = _plate_in_lung(c, side, y, length, 0.5 * thick + 0.01, rng)
        if fits >= length:
            break
        y -= 0.025
    return c, (x, y, fits, thick, rng.uniform(-0.1, 0.1))


def _nodules(c: Chest, spec: PhantomSpec, rng: np.random.Generator) -> tuple:
    """One to three nodules apart from each other; the first in NIH's box when there is one."""
    cm = 1.0 / CM_PER_IMAGE
    count = 1 + int(rng.choice(3, p=[0.7, 0.2, 0.1]))
    box = _box_for(spec, "Nodule")
    nodules = []
    for i in range(count):
        d = rng.uniform(*NODULE_CM) * cm
        x, y = _random_lung_point(c, rng, 0.5 * d + CLEARANCE, avoid=tuple(nodules))
        if box is not None and i == 0:
            x, y = box.center[0] - 0.5, box.center[1]
            x, y = _place_in_lung(c, x, y, 0.5 * d + CLEARANCE, _side_of(box, rng))
        nodules.append((x, y, d))
    return tuple(nodules)


def apply_findings(c: Chest, spec: PhantomSpec, rng: np.random.Generator) -> Chest:
    """Change the patient's chest by the spec's findings (see the module's table)."""
    changes: dict[str, object] = {}
    findings = set(spec.findings)
    cm = 1.0 / CM_PER_IMAGE  # one cm in image-side units
    if "Atelectasis" in findings:  # volume loss first: it moves the dome the others use
        c, changes["plate"] = _atelectasis(c, spec, rng)
    if "Cardiomegaly" in findings:
        box = _box_for(spec, "Cardiomegaly")
        ctr = rng.uniform(*CARDIOMEGALY_CTR)
        if box is not None:  # NIH's heart box: its width over a typical 0.65-wide thorax
            ctr = float(np.clip(box.w / NIH_IMAGE_PX / 0.65, *CARDIOMEGALY_CTR))
        changes["ctr"] = ctr
    if spec.view == "AP":  # the heart is further from the film: magnified
        changes["ctr"] = float(changes.get("ctr", c.ctr)) * AP_HEART_MAGNIFICATION
    if "Effusion" in findings:
        box = _box_for(spec, "Effusion")
        sides = [_side_of(box, rng)] if box is not None or rng.random() < 0.6 else [0, 1]
        changes["effusion"] = tuple((s, rng.uniform(0.13, 0.22)) for s in sides)
    if "Pneumothorax" in findings:
        changes["pneumothorax"] = (_side_of(_box_for(spec, "Pneumothorax"), rng),
                                   rng.uniform(0.55, 0.72))
    if "Nodule" in findings:
        changes["nodules"] = _nodules(c, spec, rng)
    if "Mass" in findings:
        box = _box_for(spec, "Mass")
        d = rng.uniform(*MASS_CM) * cm
        x, y = _random_lung_point(c, rng, 0.56 * d + CLEARANCE)
        if box is not None:
            x, y = _place_in_lung(c, box.center[0] - 0.5, box.center[1], 0.56 * d + CLEARANCE,
                                  _side_of(box, rng))
        changes["mass"] = (x, y, d, rng.uniform(0, 2 * math.pi))
    if "Pneumonia" in findings:
        box = _box_for(spec, "Pneumonia")
        radius = rng.uniform(*CONSOLIDATION_CM) * 0.5 * cm
        x, y = _random_lung_point(c, rng, 0.8 * radius + CLEARANCE)
        if box is not None:
            x, y = _place_in_lung(c, box.center[0] - 0.5, box.center[1], 0.8 * radius + CLEARANCE,
                                  _side_of(box, rng))
        changes["consolidation"] = (x, y, radius)
    if "Infiltration" in findings:
        box = _box_for(spec, "Infiltration")
        weights = [1.0, 1.0]
        if box is not None or rng.random() < 0.4:  # one side predominantly
            weights[1 - _side_of(box, rng)] = rng.uniform(0.3, 0.6)
        changes["infiltration"] = (weights[0], weights[1])
    others = findings - set(L.DISEASES)
    if others:
        changes["patches"] = tuple(
            (*_random_lung_point(c, rng, 0.04), rng.uniform(0.05, 0.08)) for _ in others)
    return dataclasses.replace(c, **changes)
