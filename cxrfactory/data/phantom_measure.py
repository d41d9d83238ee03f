"""Measure the disease signatures of a chest image, and classify it by rules on them.

Built to check that a generator obeys its condition: the measurements take any grayscale image
of 32 px and up, ``(H, W)``, ``(1, H, W)`` or ``(H, W, 1)``, uint8 or float on any scale (a
GAN's [-1, 1] too: only relative brightness counts), and tolerate a small GAN's blur and noise.
Every image is resized to ``WORK_SIZE`` and lightly smoothed first, so a threshold means the
same at every input resolution; sizes in cm assume a 43-cm field of view, as NIH's images.

Segmentation: the body is what is brighter than the air around it (its holes filled); the
lungs are the broad dark regions inside it (Otsu's threshold between lung and soft tissue), on
each side of the body's midline. Brightness is then read on two scales that exposure and gamma
hardly move: ``z`` (0 at the median lung, 1 at the median soft tissue of the chest) for
opacities, and air-referenced (0 at the air, 1 at soft tissue) for lucency and haze, which a
diseased lung would drag along if it were the reference.

``measure`` returns (NaN everywhere when no pair of lungs is found):

- ``ctr``: cardiothoracic ratio. The heart's width is the gap between the lungs' medial edges
  at the heart's widest row (the first plateau below the mediastinal waist, above the image-left
  dome); the thorax's is the widest gap between the lungs' lateral edges. Sub-pixel edges.
- ``effusion``: how far the lateral lung base lies above the base under the middle of the
  hemithorax, over the lung height, the larger side: a sharp costophrenic angle is negative, a
  meniscus rising laterally positive.
- ``base_asymmetry``: how much higher the image-left costophrenic angle lies than the image-right
  one, over the lung height (about +0.04 normally: the liver; a raised dome moves it).
- ``pneumothorax``: the larger fraction of a hemithorax that is lucent: darker than any normal
  lung (``LUCENT``).
- ``lesion_cm``, ``lesion_contrast``, ``nodule_count``: the largest compact round opacity inside
  the lungs (equivalent diameter, mean z) and the number of those under 3 cm.
- ``plate_cm``: length of the longest thin horizontal band opacity (plate-like atelectasis).
- ``consolidation_cm2``: area of the largest broad opacity (found at a coarser scale) that is
  neither a mass (dense and round) nor a plate.
- ``infiltration``: fraction of the lungs' interior under a haze, brighter than their clearest
  fifth by a quarter of the lung-to-soft-tissue contrast.

The opacity measurements (lesions, plates, consolidation, haze) need at least
``MIN_LESION_SIZE`` px of input; below they are NaN. ``predict_class`` walks a decision list
(``_RULES``) from the most to the least specific sign.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from cxrfactory import labels as L

#: Side every image is resized to before measuring.
WORK_SIZE = 128
#: Field of view assumed for sizes in cm.
CM_PER_IMAGE = 43.0
_CM_PER_PX = CM_PER_IMAGE / WORK_SIZE
#: Mean z of a dense opacity (a mass); consolidations are fainter.
MASS_CONTRAST = 0.95
#: Brightness (air 0, soft tissue 1) under which a lung region is lucent: no normal lung is.
LUCENT = 0.3
#: Smallest input side at which the opacity measurements (lesions, plates, consolidation,
#: haze) are made; below it they are NaN and ``predict_class`` ignores them.
MIN_LESION_SIZE = 48
#: Keys of ``measure``'s result.
MEASUREMENTS = ("ctr", "effusion", "base_asymmetry", "pneumothorax", "lesion_cm",
                "lesion_contrast", "nodule_count", "plate_cm", "consolidation_cm2",
                "infiltration")


def _as_2d(image: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(1, H, W)`` or ``(H, W, 1)`` -> float32 ``(H, W)``, checked."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or min(arr.shape) < 16:
        raise ValueError(f"expected a 2-D grayscale image of at least 16 px, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image holds NaN or inf values")
    return arr


def _prepare(arr: np.ndarray) -> np.ndarray:
    """A 2-D image -> float32 (WORK_SIZE, WORK_SIZE) in about [0, 1], lightly smoothed."""
    size = (WORK_SIZE, WORK_SIZE)
    filt = Image.BOX if min(arr.shape) > WORK_SIZE else Image.BILINEAR
    arr = np.asarray(Image.fromarray(arr, mode="F").resize(size, filt))
    arr = ndimage.gaussian_filter(arr, 1.0)
    lo, hi = np.percentile(arr, [1.0, 99.5])
    return (arr - lo) / max(float(hi - lo), 1e-6)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the border filled.

    Labelling the background once is an order of magnitude faster than scipy's iterative
    ``binary_fill_holes``.
    """
    labels, _ = ndimage.label(~mask)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, border[border > 0])


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample."""
    hist, edges = np.histogram(values, bins=128)
    centers = 0.5 * (edges[1:] + edges[:-1])
    weight = np.cumsum(hist).astype(np.float64)
    total = weight[-1]
    mean = np.cumsum(hist * centers)
    between = (mean[-1] * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1)
    return float(centers[int(np.argmax(between[:-1]))])


class _Segmentation:
    """One prepared image: its midline, lungs (as found and with holes filled), brightness
    levels and the two brightness scales ``z`` and ``v``."""

    def __init__(self, img: np.ndarray) -> None:
        n = img.shape[0]
        self.img = img
        body = _fill_holes(img > 0.1)
        cols = np.arange(n)
        rows_w = body.sum(axis=1)
        mid_rows = slice(int(0.2 * n), int(0.8 * n))
        centres = (body[mid_rows] * cols).sum(axis=1) / np.maximum(rows_w[mid_rows], 1)
        self.mid = float(np.median(centres))
        self.threshold = _otsu(img[body])
        # the body's own edge fades through lung-dark values: keep clear of it
        inner = ndimage.binary_erosion(body, iterations=3)
        dark = (img < self.threshold) & inner
        dark = ndimage.binary_opening(dark)  # drop one-pixel specks of noise
        dark[:, int(round(self.mid))] = False  # the lungs never cross the midline
        labels, count = ndimage.label(dark)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        centres = ndimage.center_of_mass(dark, labels, range(1, count + 1)) if count else []
        heights = [s[0].stop - s[0].start for s in ndimage.find_objects(labels)]
        # A lung is every sizeable, broad dark region on its side (an opacity may cut it in
        # two); thin strips along a blurred body outline are not lung.
        self.lungs: list[np.ndarray] = []
        for side in (0, 1):
            keep = [k for k in range(1, count + 1) if sizes[k] > 0.005 * n * n
                    and sizes[k] / heights[k - 1] > 0.06 * n
                    and (centres[k - 1][1] > self.mid) == bool(side)]
            self.lungs.append(np.isin(labels, keep))
        self.filled = [_fill_holes(m) for m in self.lungs]
        lung_any = self.lungs[0] | self.lungs[1]
        self.ok = bool(self.lungs[0].any() and self.lungs[1].any())
        self.lung_level = float(np.median(img[lung_any])) if lung_any.any() else 0.0
        rows = np.flatnonzero(lung_any.any(axis=1))
        tissue = body & ~dark
        if rows.size:
            tissue[: rows[0]] = False
            tissue[rows[-1] + 1:] = False
        self.tissue_level = float(np.median(img[tissue])) if tissue.any() else 1.0
        self.z = (img - self.lung_level) / max(self.tissue_level - self.lung_level, 1e-3)
        # brightness between the air (0, the darkest percentile) and the soft tissue (1): a
        # scale that lung disease does not move, unlike the median lung
        self.v = img / max(self.tissue_level, 1e-3)


def _row_edges(img: np.ndarray, mask: np.ndarray, threshold: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the sub-pixel left and right edges of ``mask`` (where ``img`` crosses the
    threshold; meaningless in rows without mask pixels)."""
    n = mask.shape[1]
    rows = np.arange(mask.shape[0])
    first = np.argmax(mask, axis=1)
    last = n - 1 - np.argmax(mask[:, ::-1], axis=1)

    def refine(cols: np.ndarray, step: int) -> np.ndarray:
        inside = img[rows, cols]
        outside = img[rows, np.clip(cols + step, 0, n - 1)]
        delta = outside - inside
        frac = np.clip((threshold - inside) / np.where(np.abs(delta) > 1e-6, delta, 1e-6), 0, 1)
        return cols + step * frac  # where the interpolated profile crosses the threshold

    return refine(first, -1), refine(last, 1)


def _cardiothoracic_ratio(ch: _Segmentation) -> float:
    """Heart width at its widest row over the widest inner thoracic width (NaN if no lungs)."""
    lat0, med0 = _row_edges(ch.img, ch.filled[0], ch.threshold)  # image-left lung
    med1, lat1 = _row_edges(ch.img, ch.filled[1], ch.threshold)  # image-right lung
    both = ch.filled[0].any(axis=1) & ch.filled[1].any(axis=1)
    # Only rows above the image-left dome: below it the diaphragm, not the heart, cuts that
    # lung's medial edge (its dome is flat from the heart to mid-hemithorax).
    base = _base_profile(ch.filled[0], 0)
    if base is not None:
        bottom = base[0]
        dome = bottom[int(0.4 * bottom.size): max(int(0.85 * bottom.size), 1)]
        if dome.size:
            both[int(dome.min()) + 1:] = False
    rows = np.flatnonzero(both)
    if rows.size < 8:
        return float("nan")
    thorax = float(np.max(lat1[rows] - lat0[rows]))
    gap = ndimage.median_filter(med1[rows] - med0[rows], size=3, mode="nearest")
    # Below the apices the gap narrows to the mediastinum (the waist), widens over the heart's
    # top, runs nearly vertical along its widest part and narrows again; lower down the
    # diaphragm cuts the lungs and the gap jumps. The heart's width is the gap along that
    # vertical part: stop at the first narrowing, or at a jump once the gap has levelled off.
    k = rows.size
    lo, hi = int(0.2 * k), max(int(0.6 * k), int(0.2 * k) + 1)
    waist = lo + int(np.argmin(gap[lo:hi]))
    best, levelled = gap[waist], False
    tolerance = 0.015 * ch.img.shape[1]
    for i in range(waist + 1, k):
        step = gap[i] - gap[i - 1]
        narrowed, jumped = gap[i] < best - tolerance, levelled and step > tolerance
        if rows[i] != rows[i - 1] + 1 or narrowed or jumped:
            break
        levelled |= gap[i] > gap[waist] + 0.06 * ch.img.shape[1] and step <= 0.5
        best = max(best, gap[i])
    return float(best / thorax) if thorax > 0 else float("nan")


def _base_profile(lung: np.ndarray, side: int) -> tuple[np.ndarray, float] | None:
    """Lowest lung row per column, ordered from the medial to the lateral edge, and the height."""
    cols = np.flatnonzero(lung.any(axis=0))
    rows = np.flatnonzero(lung.any(axis=1))
    if cols.size < 6 or rows.size < 6:
        return None
    n = lung.shape[0]
    bottom = n - 1 - np.argmax(lung[::-1, cols], axis=0)  # lowest True row of each column
    if side == 0:  # image-left lung: its medial edge is on the right
        bottom = bottom[::-1]
    return bottom.astype(np.float64), float(rows[-1] - rows[0] + 1)


def _effusion_and_bases(ch: _Segmentation) -> tuple[float, float]:
    """(meniscus score, costophrenic asymmetry), both over the mean lung height.

    The meniscus score compares the lateral base with the base under the middle of the
    hemithorax: a sharp costophrenic angle lies below the dome (negative), fluid lifts the
    lateral base above it (positive). The asymmetry is how much higher the image-left lung's
    costophrenic angle lies than the image-right one's (normally a little: the liver).
    """
    scores, angles, heights = [], [], []
    for side in (0, 1):
        profile = _base_profile(ch.filled[side], side)
        if profile is None:
            return float("nan"), float("nan")
        bottom, height = profile
        k = bottom.size
        middle = bottom[int(0.3 * k): max(int(0.65 * k), int(0.3 * k) + 1)]
        lateral = bottom[int(0.8 * k):]
        scores.append((middle.max() - lateral.max()) / height)
        angles.append(float(lateral.max()))
        heights.append(height)
    height = float(np.mean(heights))
    return float(max(scores)), (angles[1] - angles[0]) / height


def _pneumothorax(ch: _Segmentation) -> float:
    """Largest fraction of a hemithorax that is lucent: darker than normal lung by a margin."""
    v = ndimage.gaussian_filter(ch.v, 1.5)
    fractions = []
    for side in (0, 1):
        area = ch.filled[side].sum()
        lucent = (v < LUCENT) & ch.filled[side]
        fractions.append(float(lucent.sum() / area) if area else 0.0)
    return max(fractions)


def _envelope(ch: _Segmentation) -> np.ndarray:
    """Where lung should be: each lung with its holes filled, its notches closed, and every row
    reaching out to the widest lateral edge of the rows above it.

    The lateral chest wall only moves outwards from the apex down, so an opacity against the
    wall (a consolidation, a mass) shows as a row falling short of the rows above it.
    """
    n = ch.img.shape[1]
    cols = np.arange(n)[None, :]
    envelope = np.zeros_like(ch.lungs[0])
    for side in (0, 1):
        lung = ch.filled[side]
        envelope |= lung | ndimage.binary_closing(ch.lungs[side], _disk(5))
        rows = np.flatnonzero(lung.any(axis=1))
        if rows.size == 0:
            continue
        part = lung[rows[0]: rows[-1] + 1]
        first = np.argmax(part, axis=1)
        last = n - 1 - np.argmax(part[:, ::-1], axis=1)
        present = part.any(axis=1)
        if side == 0:  # lateral edge on the left: the running minimum column
            lateral = np.minimum.accumulate(np.where(present, first, n))
            reach = (cols >= lateral[:, None]) & (cols <= last[:, None])
        else:
            lateral = np.maximum.accumulate(np.where(present, last, -1))
            reach = (cols <= lateral[:, None]) & (cols >= first[:, None])
        envelope[rows[0]: rows[-1] + 1] |= reach & present[:, None]
    # the lungs' own rim (partial volume, the thin lung by the wall) is never an opacity
    return ndimage.binary_erosion(envelope, iterations=2)


def _opacities(ch: _Segmentation, envelope: np.ndarray, z_fine: np.ndarray, sigma: float,
               threshold: float) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Regions of ``envelope`` brighter than ``threshold`` (z smoothed by ``sigma`` px).

    Returns the label image and, per region of at least 1.2 cm^2, its size, shape and mean
    contrast (on ``z_fine``, so the contrast means the same at every ``sigma``).
    """
    lung_any = ch.lungs[0] | ch.lungs[1]
    z = ndimage.gaussian_filter(ch.z, sigma)
    labels, _ = ndimage.label(envelope & (z > threshold))
    found = []
    for k, region in enumerate(ndimage.find_objects(labels), start=1):
        pad = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in region)
        blob = labels[pad] == k
        area = int(blob.sum())
        if area * _CM_PER_PX ** 2 < 1.2:  # smaller than any drawn lesion: noise, rib edges
            continue
        ring = ndimage.binary_dilation(blob, iterations=2) & ~blob
        yy, xx = np.nonzero(blob)
        # a pixel's own extent adds 1/12 px^2 to each variance
        evals, evecs = np.linalg.eigh(np.cov(np.stack([xx, yy])) + np.eye(2) / 12.0)
        found.append({
            "label": k,
            "area_cm2": area * _CM_PER_PX ** 2,
            "diameter_cm": 2.0 * np.sqrt(area / np.pi) * _CM_PER_PX,
            "length_cm": 4.0 * np.sqrt(evals[1]) * _CM_PER_PX,  # axes of the same-moment ellipse
            "width_cm": 4.0 * np.sqrt(evals[0]) * _CM_PER_PX,
            "elongation": float(np.sqrt(evals[1] / evals[0])),
            "horizontal": float(abs(evecs[0, 1])),  # |cos| of the major axis' angle
            "fill": float(area / (4.0 * np.pi * np.sqrt(evals[0] * evals[1]))),
            "surrounded": float((ring & lung_any[pad]).sum() / max(ring.sum(), 1)),
            "contrast": float(z_fine[pad][blob].mean()),
        })
    return labels, found


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def _infiltration(ch: _Segmentation) -> float:
    """Fraction of the lungs' interior under a haze: brighter than the clearest lung by a margin.

    The clearest lung is the 20th percentile of the interior, so a haze over most of both lungs
    still stands out against what is left clear.
    """
    interior = ndimage.binary_erosion(ch.filled[0] | ch.filled[1], iterations=3)
    if interior.sum() < 20:
        return 0.0
    v = ndimage.gaussian_filter(ch.v, 2.0)
    normal = interior & (v >= LUCENT)  # a pneumothorax's lucent rim is no reference
    if normal.sum() < 20:
        return 0.0
    clear = float(np.percentile(v[normal], 20))
    haze = (v - clear) / max(1.0 - clear, 1e-3)
    return float(((haze > 0.25) & interior).sum() / interior.sum())


def _is_mass_like(blob: dict[str, float]) -> bool:
    """Dense, round and sharp: a mass, not a consolidation."""
    return blob["contrast"] >= MASS_CONTRAST and blob["elongation"] < 1.35


def measure(image: np.ndarray) -> dict[str, float]:
    """All signature measurements of one grayscale chest image (see the module docstring).

    Every value is NaN when no pair of lungs is found (e.g. an image that is no chest).
    """
    arr = _as_2d(image)
    ch = _Segmentation(_prepare(arr))
    if not ch.ok:
        return {key: float("nan") for key in MEASUREMENTS}
    effusion, base_asymmetry = _effusion_and_bases(ch)
    whole = {
        "ctr": _cardiothoracic_ratio(ch),
        "effusion": effusion,
        "base_asymmetry": base_asymmetry,
        "pneumothorax": _pneumothorax(ch),
    }
    if min(arr.shape) < MIN_LESION_SIZE:  # lesions of 2-7 cm are a few blurred pixels: not measured
        return whole | {key: float("nan") for key in MEASUREMENTS if key not in whole}
    envelope = _envelope(ch)
    z_fine = ndimage.gaussian_filter(ch.z, 1.0)
    # Small sharp opacities at fine scale: nodules, masses, plates
    fine_labels, fine = _opacities(ch, envelope, z_fine, sigma=1.0, threshold=0.45)
    lesions = [b for b in fine if b["elongation"] < 1.6 and b["fill"] > 0.8
               and b["surrounded"] > 0.7]
    largest = max(lesions, key=lambda b: b["area_cm2"], default=None)
    plates = [b for b in fine if b["elongation"] >= 2.2 and b["horizontal"] > 0.85
              and b["surrounded"] > 0.6 and b["length_cm"] >= 3.5 and b["width_cm"] < 2.4]
    # Large ill-defined opacities at coarse scale, unless they are a mass or a plate seen blurred
    explained = [b["label"] for b in plates + [b for b in lesions if _is_mass_like(b)]]
    coarse_labels, coarse = _opacities(ch, envelope, z_fine, sigma=2.0, threshold=0.4)
    consolidations = [
        b for b in coarse if b["area_cm2"] >= 12 and b["width_cm"] >= 2.4 and b["fill"] > 0.55
        and not np.isin(fine_labels[coarse_labels == b["label"]], explained).any()]
    return whole | {
        "lesion_cm": largest["diameter_cm"] if largest else 0.0,
        "lesion_contrast": largest["contrast"] if largest else 0.0,
        "nodule_count": float(sum(b["diameter_cm"] < 3.0 for b in lesions)),
        "plate_cm": max((b["length_cm"] for b in plates), default=0.0),
        "consolidation_cm2": max((b["area_cm2"] for b in consolidations), default=0.0),
        "infiltration": _infiltration(ch),
    }


# Decision list of ``predict_class``: the first rule that holds names the class. Ordered from
# the most to the least specific sign (a mass also raises the haze measure, an effusion the
# consolidation measure, so those are asked first).
_RULES: tuple[tuple[str, str, float], ...] = (
    # (class, measurement, threshold): the class holds when measurement > threshold
    ("Pneumothorax", "pneumothorax", 0.1),
    ("Effusion", "effusion", 0.0),
    ("Mass", "mass_score", 0.0),
    ("Pneumonia", "consolidation_cm2", 12.0),
    ("Atelectasis", "atelectasis_score", 0.0),
    ("Cardiomegaly", "ctr", 0.5),
    ("Nodule", "nodule_count", 0.5),
    ("Infiltration", "infiltration", 0.08),
)
#: Typical spread of each measurement, to compare margins when no rule holds.
_SCALES = {"pneumothorax": 0.08, "effusion": 0.04, "mass_score": 1.0, "consolidation_cm2": 8.0,
           "atelectasis_score": 1.0, "ctr": 0.04, "nodule_count": 1.0, "infiltration": 0.06}


def class_scores(m: dict[str, float]) -> dict[str, float]:
    """Signed margin of each disease's rule (positive: the rule holds), in typical spreads."""
    derived = dict(m)
    derived["mass_score"] = min(m["lesion_cm"] - 3.0, (m["lesion_contrast"] - MASS_CONTRAST) * 10)
    derived["atelectasis_score"] = max(
        m["plate_cm"] - 3.5, (abs(m["base_asymmetry"] - 0.04) - 0.1) * 25)
    scores = {}
    for name, key, threshold in _RULES:
        value = derived[key]
        scores[name] = (value - threshold) / _SCALES[key] if np.isfinite(value) else -np.inf
    return scores


def classify(measurements: dict[str, float],
             classes: Sequence[str] = L.DEFAULT_CLASSES) -> str:
    """The class that ``measure``'s result points to, among ``classes``.

    The first disease in the decision list whose rule holds wins; with none, ``Normal`` when it
    is among ``classes``, else the disease whose rule came closest to holding.
    """
    classes = L.validate_classes(classes)
    scores = class_scores(measurements)
    for name, _, _ in _RULES:
        if name in classes and scores[name] > 0:
            return name
    if "Normal" in classes:
        return "Normal"
    return max(classes, key=lambda c: scores.get(c, -np.inf))


def predict_class(image: np.ndarray, classes: Sequence[str] = L.DEFAULT_CLASSES) -> str:
    """The class of a chest image by the rules on its measurements, among ``classes``."""
    return classify(measure(image), classes)
