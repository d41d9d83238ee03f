"""The sample-level sections: fidelity, diversity and near-copies per class (from fdd.json), and
the memorization audit (from a jobs/audit.py folder: audit.json and closest.png).

fdd.json gained its per-image metrics (``kid``, ``prdc``, ``fdd_excess``, ``memorization`` in
each synthetic row; their settings under ``metrics``) after its first format: a key that is
absent means "not measured", which the section says together with the command that measures
it; a null value is an undefined number and shows as a dash, as everywhere in the report.
"""

from __future__ import annotations

from scipy.stats import binomtest

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cxrfactory.report.inputs import AuditInfo, finite
from cxrfactory.report.render import Block, Figure, Note, Paragraph, Section, Table
from cxrfactory.report.sections import DASH, fmt, opening

QUALITY, AUDIT = "Fidelity, diversity and privacy per class", "Memorization audit"
PRDC = ("precision", "recall", "density", "coverage")
# The synthetic-row keys read here, in column order, and the --metrics name that writes each.
SAMPLE_METRICS = {"fdd_excess": "fdd", "kid": "kid", "prdc": "prdc", "memorization": "memorization"}
SHOWN = {"fdd_excess": "excess over the floor", "kid": "KID", "prdc": "precision/recall/density/coverage",
         "memorization": "near-copy rate"}
MEASURE = "jobs/fdd.py --metrics fdd class_consistency kid prdc"


def class_mean(values: Iterable[Any]) -> float | None:
    """The mean of the defined numbers; None when there are none."""
    numbers = [n for n in map(finite, values) if n is not None]
    return sum(numbers) / len(numbers) if numbers else None


def percent(value: Any) -> str:
    number = finite(value)
    return DASH if number is None else f"{100 * number:.1f}%"


def _entry(row: Mapping[str, Any], key: str, label: str) -> Any:
    """``row[key][label]``; None when the metric or the class is absent."""
    per_class = row.get(key)
    return per_class.get(label) if isinstance(per_class, Mapping) else None


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, Mapping) else None


def measured(result: Mapping[str, Any]) -> list[str]:
    """The sample-metric keys some synthetic row of fdd.json holds (empty for an old file)."""
    rows = result["synthetic"].values()
    return [k for k in SAMPLE_METRICS if any(isinstance(row.get(k), Mapping) for row in rows)]


def sample_means(row: Mapping[str, Any]) -> dict[str, float | None]:
    """One synthetic row's class means of precision, recall, density, coverage, KID and the
    near-copy rate: only those it holds."""
    means: dict[str, float | None] = {}
    if isinstance(row.get("prdc"), Mapping):
        means |= {k: class_mean(_field(e, k) for e in row["prdc"].values()) for k in PRDC}
    if isinstance(row.get("kid"), Mapping):
        means["kid"] = class_mean(_field(e, "kid") for e in row["kid"].values())
    if isinstance(row.get("memorization"), Mapping):
        means["memorization"] = class_mean(row["memorization"].values())
    return means


# --------------------------------------------------------------------------------------------
# Cells


def excess_cell(entry: Any) -> str:
    """``+1.230 [0.800, 1.700]``: the excess over the floor and its 95% interval."""
    excess = finite(_field(entry, "excess"))
    if excess is None:
        return DASH
    bounds = _field(entry, "interval")
    if isinstance(bounds, Sequence) and len(bounds) == 2 and None not in map(finite, bounds):
        return f"{fmt(excess, signed=True)} [{fmt(bounds[0])}, {fmt(bounds[1])}]"
    return fmt(excess, signed=True)


def kid_cell(entry: Any) -> str:
    """KID ± its jackknife standard error, three significant digits (its scale follows the
    classifier's features, so no fixed multiplier reads well), e.g. ``0.0123 ± 0.000561``.
    Files from before ``kid_se`` show KID alone (their subset spread is 0 at equal counts)."""
    kid, std = finite(_field(entry, "kid")), finite(_field(entry, "kid_se"))
    if kid is None:
        return DASH
    return f"{kid:.3g}" + ("" if std is None else f" ± {std:.3g}")


# --------------------------------------------------------------------------------------------
# Fidelity, diversity and privacy per class


def _set_table(name: str, row: Mapping[str, Any], classes: Sequence[str], keys: Sequence[str]) -> Table:
    """A row per class and a mean row; columns for the metrics measured."""
    header = ["class", "FDD"]
    if "fdd_excess" in keys:
        header += ["floor", "excess over floor [95% interval]"]
    if "kid" in keys:
        header.append("KID")
    if "prdc" in keys:
        header += list(PRDC)
    if "memorization" in keys:
        header.append("near-copies")
    rows = []
    columns: dict[str, list[Any]] = {}  # the numbers per column, for the mean row

    def add(column: str, value: Any) -> Any:
        columns.setdefault(column, []).append(value)
        return value

    for c in classes:
        excess = _entry(row, "fdd_excess", c)
        # FDD and floor as the excess was computed from them; Table 1's FDD without it.
        fdd = _field(excess, "fdd") if excess is not None else _entry(row, "fdd", c)
        cells = [c, fmt(add("fdd", fdd))]
        if "fdd_excess" in keys:
            add("excess", _field(excess, "excess"))
            cells += [fmt(add("floor", _field(excess, "floor"))), excess_cell(excess)]
        if "kid" in keys:
            cells.append(kid_cell(_entry(row, "kid", c)))
            add("kid", _field(_entry(row, "kid", c), "kid"))
        if "prdc" in keys:
            cells += [fmt(add(k, _field(_entry(row, "prdc", c), k))) for k in PRDC]
        if "memorization" in keys:
            cells.append(percent(add("memorization", _entry(row, "memorization", c))))
        rows.append(tuple(cells))
    mean = {k: class_mean(v) for k, v in columns.items()}
    cells = ["mean of classes", fmt(mean["fdd"])]
    if "fdd_excess" in keys:
        cells += [fmt(mean["floor"]), fmt(mean["excess"], signed=True)]
    if "kid" in keys:
        cells.append(DASH if mean["kid"] is None else f"{mean['kid']:.3g}")
    if "prdc" in keys:
        cells += [fmt(mean[k]) for k in PRDC]
    if "memorization" in keys:
        cells.append(percent(mean["memorization"]))
    rows.append(tuple(cells))
    return Table(f"{name}: per-class fidelity, diversity" + (" and near-copies" if "memorization" in keys else ""),
                 tuple(header), tuple(rows))


def quality_section(result: Mapping[str, Any] | None, absent: Sequence[str]) -> Section:
    """Per synthetic set and class: FDD's excess over the floor, KID, PRDC, near-copy rate."""
    blocks = opening(
        "FDD compares two Gaussians; these metrics look at the images themselves, in the same "
        "classifier features. **Precision** is the share of synthetic images inside the real "
        "images' manifold (the union of each real image's k-nearest-neighbour ball): fidelity. "
        "**Recall** and **coverage** are the share of the real variety the synthetic images "
        "reach: diversity (1 is best for all three); **density** above 1 means the synthetic "
        "images crowd around common real modes. **KID** (lower is better, 0 for identical "
        "distributions) is an unbiased kernel distance that, unlike FDD, is not biased upwards "
        "by having fewer images than feature dimensions.", absent)
    if result is None:
        return Section(QUALITY, tuple(blocks))
    keys = measured(result)
    if not keys:
        blocks.append(Note("Not measured: this fdd.json holds no per-image metrics (it was made "
                           f"before they existed, or without them); run `{MEASURE}` to add them."))
        return Section(QUALITY, tuple(blocks))
    lacking = [k for k in SAMPLE_METRICS if k not in keys]
    if lacking:
        names = " ".join(SAMPLE_METRICS[k] for k in lacking)
        blocks.append(Note(f"Not measured: {', '.join(SHOWN[k] for k in lacking)} "
                           f"(add `{names}` to `jobs/fdd.py --metrics`)."))
    classes = list(result["classes"])
    blocks += [_set_table(name, row, classes, keys) for name, row in result["synthetic"].items()]
    settings = result.get("metrics") or {}
    if "fdd_excess" in keys:
        reps = (settings.get("fdd") or {}).get("reps")
        blocks.append(Paragraph(
            "**Excess over floor** compares like with like: one patient half of the real split "
            "against the synthetic images and against the other real half, at equal sizes "
            "(FD(half a, synthetic) − FD(half a, half b)), so a set as good as new real images "
            "scores 0 up to noise; its 95% interval is the estimate ± 1.96 bootstrap standard "
            "errors" + (f" ({reps} replicates)" if reps else "") + ". An interval entirely above "
            "0 means the set is told apart from real images at this sample size; one that holds 0 "
            "means it is not. (FDD − floor itself would not do: the floor is measured on half as "
            "many images and carries more finite-sample bias.)"))
    if "memorization" in keys:
        rate = finite((settings.get("memorization") or {}).get("held_out_flag_rate"))
        blocks.append(Paragraph(
            "**Near-copies** is the share of a class's synthetic images closer to a training image "
            "than the memorization audit's rule allows"
            + (f"; the same rule flags {percent(rate)} of held-out real images, the rate a set that "
               "copies no one shows" if rate is not None else "") + "."))
    shown = []
    if (settings.get("prdc") or {}).get("k"):
        shown.append(f"precision/recall/density/coverage with k = {settings['prdc']['k']}")
    if (settings.get("kid") or {}).get("kernel"):
        shown.append(f"KID kernel `{settings['kid']['kernel']}`, ± its jackknife standard error")
    if shown:
        blocks.append(Paragraph(f"Settings: {'; '.join(shown)}."))
    return Section(QUALITY, tuple(blocks))


# --------------------------------------------------------------------------------------------
# Memorization audit


def audit_verdict(audit: AuditInfo) -> str:
    """``N of M images (x%) flagged; held-out ... y%``, and what that means for the set."""
    record = audit.record
    total = sum(int(n) for n in record["synthetic"].get("n", {}).values())
    flagged, rate = int(record["flagged_total"]), finite(record["flag_rate_total"])
    held_out = finite(record.get("held_out_flag_rate"))
    text = f"{flagged} of {total} images ({percent(rate)}) flagged; "
    if held_out is None:
        text += "the held-out false-flag rate could not be measured"
        copies = flagged > 0
    else:
        text += f"held-out real images are flagged at {percent(held_out)} by the same rule"
        # More flags than new patients get by chance: a one-sided binomial test at 5%, so a
        # set that copies no one, whose rate scatters around the held-out rate, is not called
        # a copier half of the time.
        copies = total > 0 and binomtest(flagged, total, min(max(held_out, 1e-9), 1.0),
                                         alternative="greater").pvalue < 0.05
    if copies:
        return (text + (": more than chance allows (one-sided binomial test, p < 0.05), so the set"
                        if held_out is not None else ": the set") + " holds near-copies of training images; "
                f"`jobs/synthesize.py --exclude-flagged {audit.uri}` (same generator and seed, a new "
                "--out) makes a set with them replaced.")
    if held_out is None:
        return text + ": no image is closer to a training image than the rule allows."
    if flagged:
        return (text + ": within what new patients get by chance (one-sided binomial test), so "
                "the set is no closer to the training patients than new patients are; the "
                f"flagged images can still be replaced (`jobs/synthesize.py --exclude-flagged {audit.uri}`).")
    return text + ": the set is no closer to the training patients than new patients are."


def class_verdict(audit: AuditInfo) -> str | None:
    """Which classes are flagged more often than new patients are, each by a one-sided binomial
    test at 5% Bonferroni-corrected over the classes (a generator may copy one class's few
    training patients while the set as a whole looks clean). None without a held-out rate."""
    record = audit.record
    held_out = finite(record.get("held_out_flag_rate"))
    classes = {c: v for c, v in (record.get("per_class") or {}).items() if int(v.get("n", 0)) > 0}
    if held_out is None or not classes:
        return None
    p = {c: binomtest(int(v.get("flagged", 0)), int(v["n"]), min(max(held_out, 1e-9), 1.0),
                      alternative="greater").pvalue for c, v in classes.items()}
    level = 0.05 / len(classes)
    above = [c for c in classes if p[c] < level]
    lowest = min(p, key=p.get)
    if above:
        return ("**Per class**: flagged more often than new patients (one-sided binomial test, "
                f"p < 0.05/{len(classes)}): " + ", ".join(
                    f"{c} {classes[c]['flagged']} of {classes[c]['n']} (p = {p[c]:.2g})" for c in above)
                + "; those classes' generator copies training patients.")
    return (f"**Per class**: no class is flagged more often than new patients once the "
            f"{len(classes)} classes are tested together (one-sided binomial, p < 0.05/{len(classes)}); "
            f"the lowest p is {lowest}'s, {p[lowest]:.2g} ({classes[lowest]['flagged']} of {classes[lowest]['n']}).")


def _distance_cells(distances: Mapping[str, Any], spaces: Sequence[str]) -> list[str]:
    return [fmt(_field(distances.get(s), "median"), 4) for s in spaces]


def audit_section(audit: AuditInfo | None, absent: Sequence[str],
                  set_names: Mapping[str, str] | None = None) -> Section:
    """The rule and its thresholds, flag rates per class against held-out real images, the
    closest pairs, and a verdict. ``set_names`` maps shard URIs to --synthetic names."""
    blocks: list[Block] = opening(
        "Does a synthetic set copy the patients its generator was trained on? For every synthetic "
        "image, jobs/audit.py finds the nearest image of the real training split, in the "
        "classifier's feature space and in pixel space, and does the same for real images of "
        "held-out patients, who were never trained on: their distances are how close a new "
        "patient's image comes by chance.", absent)
    if audit is None:
        return Section(AUDIT, tuple(blocks))
    record = audit.record
    rule, held_out, real, synthetic = record["rule"], record["held_out"], record["real"], record["synthetic"]
    spaces = list(rule.get("spaces") or record["thresholds"])
    audited = (set_names or {}).get(str(synthetic.get("uri")))
    blocks.append(Paragraph(
        f"Audited: {f'**{audited}** ' if audited else ''}`{synthetic.get('uri')}` against the "
        f"`{real.get('split')}` split of `{real.get('uri')}` ({real.get('n', '?')} images); held-out: "
        f"its `{held_out.get('split')}` split ({held_out.get('n', '?')} images); made {record.get('created', '?')}."))
    description = str(rule.get("description", "")).strip().rstrip(".")
    thresholds = ", ".join(f"{s} {fmt(t, 4)}" for s, t in record["thresholds"].items())
    blocks.append(Paragraph(
        (f"**Rule**: {description[:1].upper()}{description[1:]}. " if description else "")
        + f"Thresholds: {thresholds}. The same rule flags {percent(record['held_out_flag_rate'])} of "
        "the held-out real images (cross-fitted over patient halves, so no image is judged by a "
        "threshold it helped set): the rate to expect from a set that copies no one."))
    blocks.append(Paragraph(f"**Verdict**: {audit_verdict(audit)}"))
    if (per_class := class_verdict(audit)) is not None:
        blocks.append(Paragraph(per_class))
    rows = [(c, f"{int(v.get('n', 0)):,}", f"{int(v.get('flagged', 0)):,}", percent(v.get("flag_rate")),
             *_distance_cells(v.get("distances") or {}, spaces))
            for c, v in record["per_class"].items()]
    rows.append(("all synthetic", f"{sum(int(n) for n in synthetic.get('n', {}).values()):,}",
                 f"{int(record['flagged_total']):,}", percent(record["flag_rate_total"]), *(DASH for _ in spaces)))
    rows.append((f"held-out real ({held_out.get('split')})", f"{held_out.get('n', 0):,}", DASH,
                 percent(record["held_out_flag_rate"]), *_distance_cells(held_out.get("distances") or {}, spaces)))
    blocks.append(Table("Near-copies per class, and the median distance to the nearest training image",
                        ("class", "images", "flagged", "flag rate", *(f"median {s} distance" for s in spaces)),
                        tuple(rows)))
    png = audit.closest_png
    if png and png.startswith(b"\x89PNG"):
        blocks.append(Figure("audit-closest.png", png,
                             "The closest synthetic images (top) and their nearest training images "
                             "(bottom), nearest first; d is the feature distance, FLAG marks a near-copy."))
    else:
        blocks.append(Note(f"The audit folder has no readable closest.png ({audit.uri})."))
    if record.get("closest"):
        blocks.append(Table("The closest pairs, as in the figure (left to right)",
                            ("synthetic image", "class", "nearest training image",
                             *(f"{s} distance" for s in spaces), "flagged"),
                            tuple((str(p.get("image_id")), str(p.get("label")), str(p.get("nearest_real_id")),
                                   *(fmt(p.get(f"{s}_distance"), 4) for s in spaces),
                                   "yes" if p.get("flagged") else "no") for p in record["closest"]),
                            left=3))
    return Section(AUDIT, tuple(blocks))


def headline(fdd: Mapping[str, Any] | None, audit: AuditInfo | None) -> list[str]:
    """For the summary at the top: precision, recall and coverage per set, the audit's verdict."""
    lines, parts = [], []
    for name, row in (fdd or {}).get("synthetic", {}).items():
        means = sample_means(row)
        if "precision" in means:
            parts.append(f"{name} precision {fmt(means['precision'], 2)}, recall {fmt(means['recall'], 2)}, "
                         f"coverage {fmt(means['coverage'], 2)}")
    if parts:
        lines.append(f"**Per image** (fidelity, diversity; means over classes): {'; '.join(parts)}.")
    if audit is not None:
        lines.append(f"**Memorization audit**: {audit_verdict(audit)}")
    return lines
