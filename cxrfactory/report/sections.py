"""The report's sections, in the paper's terms: what each shows and the sentences that explain it.

Each builder takes what :mod:`cxrfactory.report.inputs` read (or None) and returns a
:class:`~cxrfactory.report.render.Section`; when its input is absent the section still appears,
with a note that says so and which flag supplies it, so a partial pipeline still reports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.metrics.fdd_tables import table_rows
from cxrfactory.report.figures import class_balance_png, sample_table_png
from cxrfactory.report.inputs import RunInfo, SampleImages, ShardSet, finite
from cxrfactory.report.render import Block, Bullets, Figure, Note, Paragraph, Section, Table
from cxrfactory.shards import SYNTHETIC_SPLIT

LOSSES, FDD, SAMPLES, BALANCE, UTILITY = ("Fig. 2 Loss curves", "Table 1 FDD", "Table 2 Samples",
                                          "Class balance", "Downstream utility")
DASH = "–"  # an undefined number


def fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    """A number for a table cell; a dash for None/NaN."""
    number = finite(value)
    if number is None:
        return DASH
    return f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"


def opening(intro: str, absent: Sequence[str]) -> list[Block]:
    """A section's first blocks: what it shows, then a note per input that is absent."""
    return [Paragraph(intro), *(Note(text) for text in absent)]


def rare_deltas(utility: Mapping[str, Any]) -> str:
    """``"Pneumonia +0.004, Mass -0.001"``: the AUROC delta of each rare class, in the
    experiment's order; empty when it names none."""
    return ", ".join(f"{c} {fmt(utility['delta'][c], signed=True)}" for c in utility["rare_classes"])


def _or_inf(value: Any) -> float:
    """For ranking FDDs: an undefined one ranks last."""
    number = finite(value)
    return float("inf") if number is None else number


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def vocabulary_order(names: Sequence[str]) -> list[str]:
    """Distinct class names, the default vocabulary's order first, unknown names after."""
    known = [c for c in DEFAULT_CLASSES if c in names]
    return known + sorted(set(names) - set(known))


# --------------------------------------------------------------------------------------------
# Fig. 2: loss curves


def _last(records: Sequence[Mapping[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(records) if key in r), None)


def _run_row(role: str, run: RunInfo) -> tuple[str, ...]:
    gan, records = run.config.get("gan", {}), run.records
    branches = _last(records, "resolutions") or []
    step = _last(records, "step")
    collapsed = next((r["step"] for r in records if r.get("d_collapsed", 0) > 0), None)
    return (run.name, role, run.arch, "/".join(map(str, branches)) or DASH,
            DASH if step is None else f"{step}" + (f"/{run.total_steps}" if run.total_steps else ""),
            f"{_last(records, 'images') or 0:,}", f"{gan.get('lr_d', DASH)}",
            f"{gan.get('d_steps_per_g', DASH)}", fmt(_last(records, "d_loss"), 4),
            fmt(_last(records, "g_loss"), 4), DASH if collapsed is None else f"yes, step {collapsed}")


def loss_section(runs: Sequence[tuple[str, RunInfo]], absent: Sequence[str]) -> Section:
    """Fig. 2: D and G losses of each run, a table of where each run stands, its last samples."""
    blocks = opening(
        "Discriminator and generator losses (LSGAN; the paper's eq. 5 and 6) over training, as "
        "in the paper's Fig. 2. Thin lines are the branches (64, 128 and 256 px in the paper), "
        "the thick line their sum. Losses that settle without either one reaching zero mean the "
        "two networks are still teaching each other; a discriminator loss near zero means the "
        "generator gets almost no gradient (the run then warns, and the table says when).", absent)
    if runs:
        blocks.append(Table("Training runs", (
            "run", "role", "model", "branches (px)", "step", "images", "lr (D)", "D steps per G",
            "final D loss", "final G loss", "D collapsed"),
            tuple(_run_row(role, run) for role, run in runs), left=3))
    if runs:
        # Imported here: plots imports torch, which a report without runs need not load.
        from cxrfactory.gan.plots import loss_curves_png
    for k, (role, run) in enumerate(runs):
        letter = "ab"[k] if len(runs) > 1 else ""
        caption = (f"Fig. 2{letter}. Losses of {run.label}, the {role}, per logged step "
                   f"({len(run.records)} points).")
        if run.records:
            png = loss_curves_png(run.records, title=run.label)
        elif run.loss_curves_png:
            png, caption = run.loss_curves_png, caption + " (the run's own figure)"
        else:
            blocks.append(Note(f"{run.label} has logged no losses yet ({run.uri})."))
            continue
        blocks.append(Figure(f"fig2{letter}-loss-{slug(role)}.png", png, caption))
    for role, run in runs:
        if run.last_sample:
            name, png = run.last_sample
            step = re.findall(r"\d+", name)
            blocks.append(Figure(
                f"training-samples-{slug(role)}.png", png,
                f"Samples of {run.label}'s averaged (EMA) generator"
                + (f" at step {int(step[-1])}" if step else "")
                + ": fixed noise, a row per class, a column group per branch."))
    return Section(LOSSES, tuple(blocks))


# --------------------------------------------------------------------------------------------
# Table 1: FDD


def fdd_section(result: Mapping[str, Any] | None, absent: Sequence[str]) -> Section:
    """Table 1: FDD per class with the real-vs-real floor; images counted; class-consistency."""
    blocks = opening(
        "**FDD** (Fréchet DenseNet Distance) fits a Gaussian to the DenseNet-121 classifier's "
        "pooled features of the real images of a class and another to the synthetic images of "
        "that class, and reports the squared Fréchet distance between the two: **lower is "
        "better**, 0 means identical statistics.", absent)
    if result is None:
        return Section(FDD, tuple(blocks))
    classes, real, clf = list(result["classes"]), result["real"], result["classifier"]
    rows = table_rows(result)
    blocks.append(Paragraph(
        f"The first row is the **floor**: the FDD between two patient-disjoint halves of the real "
        f"`{real['split']}` split through the same pipeline, i.e. how far real images are from "
        "other real images (measured at half the sample size, so a little above the true floor). "
        "A synthetic set near the floor is as close to the real images as real images are to each "
        "other. The lowest synthetic FDD of each class is in bold."))
    fdd_rows = [(name, values, mean) for metric, name, values, mean in rows if metric == "fdd"]
    best = {c: min((_or_inf(values[i]) for _, values, _ in fdd_rows[1:]), default=None)
            for i, c in enumerate(classes)}
    table = []
    for k, (name, values, mean) in enumerate(fdd_rows):
        cells = [fmt(v) for v in values]
        if k > 0:  # row 0 is the floor, not a contestant
            cells = [f"**{cell}**" if finite(v) is not None and finite(v) == best[c] and len(fdd_rows) > 2
                     else cell for c, v, cell in zip(classes, values, cells)]
        table.append((name, *cells, fmt(mean)))
    blocks.append(Table("Table 1. FDD per class (lower is better)", ("set", *classes, "mean"), tuple(table)))
    counts = [(name, *(str(v) for v in values), str(total))
              for metric, name, values, total in rows if metric == "n_images"]
    blocks.append(Table("Images per class (real halves: the floor's two samples)",
                        ("set", *classes, "total"), tuple(counts)))
    chance = 1.0 / max(1, len(clf.get("classes", classes)))
    blocks.append(Paragraph(
        "**Class-consistency** is the classifier's top-1 accuracy on each class's images: is a "
        "synthetic image recognisably of the class it was asked for? The real row is the "
        "classifier's own accuracy on real images, the practical ceiling; chance is "
        f"1/{len(clf.get('classes', classes))} = {chance:.2f}."))
    consistency = [(name, *(fmt(v) for v in values), fmt(mean))
                   for metric, name, values, mean in rows if metric == "class_consistency"]
    blocks.append(Table(f"Class-consistency per class (higher is better; chance {chance:.2f})",
                        ("set", *classes, "mean"), tuple(consistency)))
    sampling = result.get("sampling") or {}
    sampling = (f"at most {sampling['max_per_class']} images per class" if "max_per_class" in sampling
                else "the paper's per-class counts, equal on every side (the smallest side's "
                "where a side holds fewer; the `n_images` rows give each class's)"
                if "paper_protocol" in sampling else "every image")
    blocks.append(Paragraph(
        f"Classifier `{str(clf.get('sha256', ''))[:16]}`, {clf.get('feature_dim')}-d features at "
        f"{clf.get('preprocessing', {}).get('resolution', '?')} px; real `{real.get('uri')}` "
        f"(split {real['split']}); sampling: {sampling}; measured {result.get('created', '?')}."))
    if result.get("warnings"):
        blocks.append(Note("The FDD job warned:"))
        blocks.append(Bullets(tuple(result["warnings"])))
    return Section(FDD, tuple(blocks))


# --------------------------------------------------------------------------------------------
# Table 2: samples


def samples_section(sources: Sequence[SampleImages], classes: Sequence[str], per_class: int,
                    tile_px: int, absent: Sequence[str]) -> Section:
    """Table 2: per class, real images next to each synthetic set's."""
    blocks = opening(
        f"Per class, the first {per_class} real images (by image id) next to the first "
        f"{per_class} images of each synthetic set (by image id, i.e. by seed), as in the paper's "
        f"Table 2. Every tile is shown at {tile_px} px: larger images are downsampled, smaller "
        "ones enlarged pixel by pixel, so a low-resolution generator looks as coarse as it is.", absent)
    for source in sources:
        lacking = [c for c in classes if len(source.images.get(c, [])) < per_class]
        if lacking:
            blocks.append(Note(f"{source.source} (split {source.split}) has fewer than {per_class} "
                               f"images of {', '.join(lacking)}; those tiles are blank."))
    if sources and classes:
        real = [s for s in sources if s.source == "real"]
        blocks.append(Figure(
            "table2-samples.png", sample_table_png(sources, classes, per_class, tile_px),
            "Table 2. Samples per class: " + ", ".join(
                f"{s.source}" + (f" ({s.split} split)" if s in real else "") for s in sources) + "."))
    return Section(SAMPLES, tuple(blocks))


# --------------------------------------------------------------------------------------------
# Class balance


def balance_counts(real: ShardSet | None,
                   synthetic: Sequence[ShardSet]) -> tuple[str, dict[str, int], list[str]]:
    """(real split, real counts per class before balancing, notes).

    The real split is the one the synthesis balanced against (train by default). Without a real
    set, the counts a synthetic set's plan recorded stand in for it.
    """
    notes = []
    splits = sorted({s.balance_split for s in synthetic if s.balance_split})
    split = splits[0] if len(splits) == 1 else "train"
    if len(splits) > 1:
        notes.append(f"the synthetic sets balanced against different real splits; counting {split}")
    if real is not None:
        before = dict(real.manifest.counts.get(split, {}))
        if not before:
            notes.append(f"the real set has no {split} split (it holds {', '.join(real.manifest.counts)})")
        for s in synthetic:
            planned = {p["class"]: int(p["real"]) for p in s.plan if p.get("real")}
            differ = [c for c, n in planned.items() if before.get(c, 0) != n]
            if differ:
                notes.append(f"{s.name}'s plan counted other real numbers for {', '.join(differ)} "
                             f"than the real set's {split} split (balanced against another folder?)")
        return split, before, notes
    planned_sets = [s for s in synthetic if s.plan]
    if planned_sets:
        notes.append(f"no --real given: the real counts are those {planned_sets[0].name}'s plan recorded")
        return split, {p["class"]: int(p["real"]) for p in planned_sets[0].plan}, notes
    return split, {}, notes


def imbalance(counts: Mapping[str, int]) -> str:
    """Largest class over smallest; infinite when a class has none."""
    values = list(counts.values())
    return f"{max(values) / min(values):.1f}" if min(values) > 0 else "∞"


def balance_section(real: ShardSet | None, synthetic: Sequence[ShardSet], absent: Sequence[str]) -> Section:
    """Images per class before balancing (real) and after (real + each synthetic set)."""
    blocks = opening(
        "Images per class in the real training split before balancing, and after adding each "
        "synthetic set. Balancing makes max(0, target − real) images of each class, so every "
        "class reaches the target and no real image is dropped; the imbalance row is the largest "
        "class divided by the smallest.", absent)
    split, before, notes = balance_counts(real, synthetic)
    blocks += [Note(n[0].upper() + n[1:] + ".") for n in notes]
    names = [*before, *(c for s in synthetic for c in s.manifest.counts.get(SYNTHETIC_SPLIT, {}))]
    classes = vocabulary_order(names)
    if not classes:
        return Section(BALANCE, tuple(blocks))
    # (header, counts per class, whether it is a whole training set, i.e. has an imbalance)
    columns: list[tuple[str, dict[str, int], bool]] = []
    chart: dict[str, dict[str, int]] = {}
    if before:
        real_counts = {c: int(before.get(c, 0)) for c in classes}
        columns.append((f"real {split} (before)", real_counts, True))
        chart[f"real {split}"] = real_counts
    for s in synthetic:
        made = {c: int(s.manifest.counts.get(SYNTHETIC_SPLIT, {}).get(c, 0)) for c in classes}
        columns.append((f"{s.name} (synthetic)", made, not before))
        if before:
            after = {c: made[c] + real_counts[c] for c in classes}
            columns.append((f"real + {s.name} (after)", after, True))
            chart[f"real + {s.name}"] = after
        else:
            chart[s.name] = made
    rows = [(c, *(f"{counts[c]:,}" for _, counts, _ in columns)) for c in classes]
    rows.append(("total", *(f"{sum(counts.values()):,}" for _, counts, _ in columns)))
    rows.append(("imbalance (max/min)", *(imbalance(counts) if whole else ""
                                          for _, counts, whole in columns)))
    blocks.append(Table(f"Images per class ({'real ' + split + ' split' if before else 'synthetic only'})",
                        ("class", *(header for header, _, _ in columns)), tuple(rows)))
    for s in synthetic:
        target = s.manifest.extra.get("target_per_class")
        if target is not None:
            against = s.manifest.extra.get("balance_against")
            blocks.append(Paragraph(
                f"{s.name}: target {target:,} per class" + (
                    f", balanced against `{against.get('uri')}` (split {against.get('split')})"
                    if isinstance(against, dict) else ", without counting real images")
                + f"; generator `{str(s.manifest.extra.get('generator', ''))[:12]}`."))
    blocks.append(Figure("class-balance.png", class_balance_png(classes, chart, reference=f"real {split}"),
                         "Images per class before balancing (grey) and after (colours)." if before
                         else "Synthetic images per class."))
    return Section(BALANCE, tuple(blocks))


# --------------------------------------------------------------------------------------------
# Downstream utility


def utility_section(utility: Mapping[str, Any] | None, absent: Sequence[str]) -> Section:
    """Per-class AUROC of a classifier trained on real vs real + synthetic images."""
    blocks = opening(
        "Does synthetic data help a downstream model? The same multilabel classifier is trained "
        "on the real training split alone and on real plus synthetic images, and both are scored "
        "on the same real test split: per-class AUROC (one class against the rest; 0.5 is "
        "chance) and Δ = real+synthetic − real (positive: the synthetic images helped). Rare "
        "classes (†), those with the fewest real training images, are where balancing should "
        "help most.", absent)
    if utility is None:
        return Section(UTILITY, tuple(blocks))
    real, mixed = utility["arms"]["real"], utility["arms"]["real+synthetic"]
    rare = set(utility["rare_classes"])
    def count(arm: Mapping[str, Any], c: str) -> str:
        return f"{arm['n_train'][c]:,}" if c in arm["n_train"] else DASH

    rows = [(c + (" †" if c in rare else ""), count(real, c), count(mixed, c),
             fmt(real["auroc"][c]), fmt(mixed["auroc"][c]), fmt(utility["delta"][c], signed=True))
            for c in utility["classes"]]
    rows.append(("macro", f"{sum(real['n_train'].values()):,}", f"{sum(mixed['n_train'].values()):,}",
                 fmt(real["macro_auroc"]), fmt(mixed["macro_auroc"]), fmt(utility["macro_delta"], signed=True)))
    blocks.append(Table("Downstream AUROC per class (higher is better; † rare class)",
                        ("class", "train images (real)", "train images (real+synthetic)",
                         "AUROC real", "AUROC real+synthetic", "Δ AUROC"), tuple(rows)))
    if rare:
        blocks.append(Paragraph(f"Rare classes: {rare_deltas(utility)}."))
    if utility.get("config"):
        shown = ", ".join(f"{k} {v}" for k, v in utility["config"].items()
                          if isinstance(v, (int, float, str, bool)) and len(str(v)) < 60)
        if shown:
            blocks.append(Paragraph(f"Settings: {shown}."))
    return Section(UTILITY, tuple(blocks))


# --------------------------------------------------------------------------------------------
# Front matter


def headline(fdd: Mapping[str, Any] | None, utility: Mapping[str, Any] | None) -> list[str]:
    """One sentence per synthetic set (FDD against the floor, class-consistency) and one for utility."""
    lines = []
    if fdd:
        floor, classes = finite(fdd.get("floor_mean")), fdd["classes"]
        chance = 1.0 / max(1, len(fdd["classifier"].get("classes", classes)))
        real_cons = fdd["real"].get("class_consistency_mean")
        best = {c: min(fdd["synthetic"], key=lambda n: _or_inf(fdd["synthetic"][n]["fdd"][c])) for c in classes}
        for name, row in fdd["synthetic"].items():
            mean = finite(row.get("fdd_mean"))
            ratio = (f", {mean / floor:.2f}× the real-vs-real floor ({fmt(floor, 2)})"
                     if mean is not None and floor else "")
            wins = sum(1 for c in classes if best[c] == name)
            ranked = f"; lowest FDD in {wins} of {len(classes)} classes" if len(fdd["synthetic"]) > 1 else ""
            lines.append(f"**{name}**: mean FDD {fmt(mean, 2)}{ratio}{ranked}"
                         + f"; class-consistency {fmt(row.get('class_consistency_mean'), 2)} "
                         f"(real images {fmt(real_cons, 2)}, chance {chance:.2f}).")
    if utility:
        real, mixed = utility["arms"]["real"], utility["arms"]["real+synthetic"]
        rare = rare_deltas(utility)
        lines.append(f"**Downstream**: macro AUROC {fmt(real['macro_auroc'])} (real) → "
                     f"{fmt(mixed['macro_auroc'])} (real+synthetic), "
                     f"Δ {fmt(utility['macro_delta'], signed=True)}"
                     + (f"; rare classes {rare}." if rare else "."))
    return lines


def inputs_section(rows: Sequence[tuple[str, str, str, str]], summary: Sequence[str]) -> Section:
    """Headline numbers first, then where every input came from and what was missing."""
    blocks: list[Block] = []
    if summary:
        blocks += [Paragraph("In brief (details in the sections below):"), Bullets(tuple(summary))]
    blocks.append(Table("Inputs", ("input", "flag", "location", "status"), tuple(rows), left=4))
    return Section("Summary and inputs", tuple(blocks))
