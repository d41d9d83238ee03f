"""The results report: every section from small fixtures in the producers' own formats, inline
images, the numbers of the inputs in the output, partial inputs, and clear errors for bad ones."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from cxrfactory import shards
from cxrfactory.images import encode_png
from cxrfactory.gan.config import Config
from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.metrics.fdd import _add_means
from cxrfactory.metrics.fdd_tables import write_outputs
from cxrfactory.report.inputs import AuditInfo, ReportInputError, first_images, load_shard_set
from cxrfactory.report.quality_sections import audit_verdict
from cxrfactory.gan.plots import sample_grid_png
from cxrfactory.report.render import Document, Paragraph, Section, Table, render_html
from cxrfactory.report.report import ReportConfig, summary_lines, write_report
from cxrfactory.classifier.utility_schema import UTILITY_SCHEMA, UtilityFormatError, validate_utility
from cxrfactory.runtime import run_job
from cxrfactory.storage import resolve
from jobs import report as report_job

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("Cardiomegaly", "Effusion", "Pneumothorax")
REAL_TRAIN = {"Cardiomegaly": 6, "Effusion": 3, "Pneumothorax": 2}  # imbalance 3.0 before
REAL_TEST = 5
TARGET = 8  # balancing target: after = 8 per class, imbalance 1.0
SIDE = 16
HEADINGS = ("Fig. 2 Loss curves", "Table 1 FDD", "Fidelity, diversity and privacy per class",
            "Memorization audit", "Table 2 Samples", "Class balance", "Downstream utility")
PROPOSED_SHA = "ab" * 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------
# Fixtures in the producers' formats


def write_run(root: Path, name: str, arch: str, branches: list[int], steps: int, sha: str | None) -> Path:
    """A run folder as cxrfactory.gan.loop leaves it (config.json, metrics.jsonl, samples/)."""
    run = root / name
    (run / "samples").mkdir(parents=True)
    config = Config().to_dict()
    config["model"]["arch"] = arch
    (run / "config.json").write_text(json.dumps({"config": config, "classes": list(CLASSES),
                                                 "run_name": name, "total_steps": steps}))
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": 0, "images": 8 * step, "images_per_s": 50.0, "step_share": 0.9,
                  "elapsed_s": float(step), "resolutions": branches, "d_collapsed": 0.0, "tau": 0.0}
        for b in range(len(branches)):
            record |= {f"d_loss_b{b}": 1.0 / step + b, f"d_uncond_b{b}": 0.5, f"d_cond_b{b}": 0.5}
            if step % 2 == 0:  # G steps only every other interval, as with 5 D steps per G
                record |= {f"g_loss_b{b}": 2.0 - 0.1 * step, f"g_uncond_b{b}": 1.0, f"g_cond_b{b}": 1.0}
        record["d_loss"] = sum(record[f"d_loss_b{b}"] for b in range(len(branches)))
        if step % 2 == 0:
            record["g_loss"] = sum(record[f"g_loss_b{b}"] for b in range(len(branches)))
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    images = [torch.linspace(-1, 1, len(CLASSES) * 2 * r * r).reshape(-1, 1, r, r) for r in branches]
    (run / "samples" / f"step-{steps:07d}.png").write_bytes(sample_grid_png(images, CLASSES, 2))
    if sha:
        (run / "generator").mkdir()
        (run / "generator" / "sha256").write_text(sha + "\n")
    return run


def image_for(number: int) -> np.ndarray:
    """A flat image whose grey level encodes its row number, to check which rows were chosen."""
    return np.full((SIDE, SIDE), number % 256, dtype=np.uint8)


def write_shards(root: Path, rows_by_class: dict[str, list[tuple[str, str, int]]], *,
                 source: str, extra: dict | None = None) -> Path:
    """Two files per class, rows deliberately out of image_id order; manifest last."""
    loc, files, counts = resolve(root), [], {}
    for label, rows in rows_by_class.items():
        rows = sorted(rows, key=lambda r: -r[2])  # reverse order: the reader must sort
        pieces = [(split, part) for split in sorted({r[1] for r in rows})
                  for part in ([r for r in rows if r[1] == split][::2],
                               [r for r in rows if r[1] == split][1::2]) if part]
        for k, (piece_split, part) in enumerate(pieces):
            table = shards.make_table([{
                "image_id": image_id, "image": {"bytes": encode_png(image_for(number)), "path": None},
                "label": label, "findings": [label], "split": split,
                "patient_id": None if source == "synthetic" else number, "source": source,
                "seed": number if source == "synthetic" else None,
                "generator": PROPOSED_SHA if source == "synthetic" else None,
                "height": SIDE, "width": SIDE} for image_id, split, number in part])
            path = shards.shard_path(piece_split, label, k)
            shards.write_shard(loc.join(path), table)
            files.append(path)
            for _, split, _ in part:
                counts.setdefault(split, {}).setdefault(label, 0)
                counts[split][label] += 1
    shards.write_manifest(loc, shards.Manifest(source=source, classes=list(rows_by_class), counts=counts,
                                               files=files, extra=extra or {}))
    return root


def real_rows() -> dict[str, list[tuple[str, str, int]]]:
    rows, number = {}, 1
    for label in CLASSES:
        rows[label] = []
        for split, n in (("train", REAL_TRAIN[label]), ("test", REAL_TEST)):
            for _ in range(n):
                rows[label].append((f"{number:05d}_000.png", split, number))
                number += 1
    return rows


def synthetic_rows(offset: int) -> dict[str, list[tuple[str, str, int]]]:
    return {label: [(f"syn-{label}-{offset + k * 10 + i}", "synthetic", offset + k * 10 + i)
                    for i in range(TARGET - REAL_TRAIN[label])] for k, label in enumerate(CLASSES)}


def plan_extra(sha: str) -> dict:
    return {"generator": sha, "seed": 0, "target_per_class": TARGET, "resolution": SIDE,
            "plan": [{"class": c, "real": REAL_TRAIN[c], "to_generate": TARGET - REAL_TRAIN[c]} for c in CLASSES],
            "balance_against": {"uri": "shards/real", "split": "train"}}


def fdd_result(per_image: bool = False) -> dict:
    """An fdd.json in run_fdd's format (means added by fdd.py's own helper); ``per_image`` adds
    the sample-level metrics newer files hold (older ones lack them)."""
    def per_class(base: float) -> dict:
        return {c: base + 1.25 * k for k, c in enumerate(CLASSES)}

    result = {
        "format": 1, "created": "2020-01-01T00:00:00+00:00", "metric": "FDD", "classes": list(CLASSES),
        "classifier": {"path": "clf", "sha256": "c" * 64, "classes": list(DEFAULT_CLASSES),
                       "feature_dim": 1024, "preprocessing": {"resolution": 64, "mean": 0.5, "std": 0.25,
                                                              "grayscale": True}},
        "sampling": {"max_per_class": 5},
        "real": {"uri": "shards/real", "split": "test", "manifest_sha256": "d" * 64,
                 "n": dict.fromkeys(CLASSES, 5), "n_halves": {c: [2, 3] for c in CLASSES},
                 "class_consistency": {"Cardiomegaly": 0.9, "Effusion": 0.8, "Pneumothorax": None},
                 "statistics": "cache/real.npz", "statistics_reused": False},
        "floor": per_class(3.0),
        "synthetic": {
            "cDCGAN": {"uri": "synth/dc", "n": dict.fromkeys(CLASSES, 5), "fdd": per_class(41.5),
                       "class_consistency": dict.fromkeys(CLASSES, 0.2)},
            "proposed": {"uri": "synth/ms", "n": dict.fromkeys(CLASSES, 5), "fdd": per_class(17.125),
                         "class_consistency": {"Cardiomegaly": 0.6, "Effusion": 0.4, "Pneumothorax": 0.8}},
        },
        "warnings": ["real (test): 3 class(es) with at most 5 images for 1024 feature dimensions"],
    }
    _add_means(result)
    if per_image:
        add_per_image_metrics(result)
    return result


def add_per_image_metrics(result: dict) -> None:
    """KID, PRDC, FDD's excess over the floor and the near-copy rate, as jobs/fdd.py --metrics
    writes them; cDCGAN's Pneumothorax is undefined throughout (too few rows)."""
    for k, (name, row) in enumerate(result["synthetic"].items()):
        undefined = name == "cDCGAN"
        row["fdd_excess"] = {c: {"fdd": row["fdd"][c], "floor": result["floor"][c],
                                 "excess": row["fdd"][c] - result["floor"][c],
                                 "interval": [row["fdd"][c] - result["floor"][c] - 1.625 + 0.5 * k,
                                              row["fdd"][c] - result["floor"][c] + 2.625], "reps": 50}
                             for c in CLASSES}
        row["kid"] = {c: {"kid": 0.0125 + 0.01 * k + 0.001 * i, "kid_std": 0.0, "kid_se": 0.0005, "subset_size": 5,
                          "num_subsets": 100} for i, c in enumerate(CLASSES)}
        row["prdc"] = {c: {"precision": 0.75 - 0.25 * k, "recall": 0.5, "density": 1.25, "coverage": 0.625}
                       for c in CLASSES}
        row["memorization"] = {"Cardiomegaly": 0.0, "Effusion": 0.125, "Pneumothorax": None}
        if undefined:
            row["fdd_excess"]["Pneumothorax"] = {"fdd": row["fdd"]["Pneumothorax"], "floor": None, "excess": None,
                                                 "interval": None, "reps": 50}
            row["kid"]["Pneumothorax"] = row["prdc"]["Pneumothorax"] = None
    result["metrics"] = {"selected": ["fdd", "class_consistency", "kid", "prdc", "memorization"],
                         "fdd": {"excess": "FDD minus the floor", "reps": 50}, "class_consistency": {},
                         "kid": {"kernel": "cubic"}, "prdc": {"k": 5},
                         "memorization": {"rule": {"percentile": 1.0}, "thresholds": {"feature": 0.1},
                                          "held_out_flag_rate": 0.025}}


def audit_record(synthetic_uri: str) -> dict:
    """An audit.json in jobs/audit.py's format."""
    def distances(median_feature: float, median_pixel: float, n: int) -> dict:
        return {space: {"n": n, "min": 0.0, "p1": 0.0, "p5": 0.0, "p25": median / 2, "median": median,
                        "mean": median} for space, median in (("feature", median_feature), ("pixel", median_pixel))}

    n, flagged = {"Cardiomegaly": 8, "Effusion": 10, "Pneumothorax": 6}, {"Cardiomegaly": 2, "Effusion": 3,
                                                                          "Pneumothorax": 0}
    return {
        "format": 1, "created": "2020-01-02T00:00:00+00:00",
        "synthetic": {"uri": synthetic_uri, "manifest_sha256": "e" * 64, "n": n},
        "real": {"uri": "shards/real", "split": "train", "n": 200, "manifest_sha256": "d" * 64},
        "held_out": {"uri": "shards/real", "split": "test", "n": 50, "distances": distances(0.0456, 2.25, 50)},
        "classifier": {"path": "clf", "sha256": "c" * 64},
        "rule": {"percentile": 1.0, "spaces": ["feature", "pixel"],
                 "description": "an image is a near-copy when it is closer than the held-out images"},
        "thresholds": {"feature": 0.0075, "pixel": 1.25},
        "held_out_flag_rate": 0.02,
        "flagged": flagged, "flag_rate": {c: flagged[c] / n[c] for c in n},
        "flagged_total": 5, "flag_rate_total": 5 / 24,
        "per_class": {c: {"n": n[c], "flagged": flagged[c], "flag_rate": flagged[c] / n[c],
                          "distances": distances(0.0123 + 0.001 * k, 1.5, n[c])} for k, c in enumerate(n)},
        "closest": [{"image_id": "syn-7", "label": "Effusion", "nearest_real_id": "00000042_000.png",
                     "feature_distance": 0.0, "pixel_distance": 0.0, "flagged": True}],
    }


CLOSEST_PNG = encode_png(np.arange(64, dtype=np.uint8).reshape(8, 8))


def write_audit(folder: Path, synthetic_uri: str) -> Path:
    """A jobs/audit.py output folder (flagged.parquet is not read by the report)."""
    folder.mkdir(parents=True)
    (folder / "audit.json").write_text(json.dumps(audit_record(synthetic_uri)))
    (folder / "closest.png").write_bytes(CLOSEST_PNG)
    return folder


def utility_result() -> dict:
    real = {"Cardiomegaly": 0.75, "Effusion": 0.7, "Pneumothorax": 0.6}
    mixed = {"Cardiomegaly": 0.76, "Effusion": 0.68, "Pneumothorax": 0.67}
    n_real = dict(REAL_TRAIN)
    return {"classes": list(CLASSES),
            "arms": {"real": {"auroc": real, "macro_auroc": float(np.mean(list(real.values()))), "n_train": n_real},
                     "real+synthetic": {"auroc": mixed, "macro_auroc": float(np.mean(list(mixed.values()))),
                                        "n_train": dict.fromkeys(CLASSES, TARGET)}},
            "delta": {c: mixed[c] - real[c] for c in CLASSES},
            "macro_delta": float(np.mean(list(mixed.values())) - np.mean(list(real.values()))),
            "rare_classes": ["Pneumothorax"], "config": {"epochs": 3, "seed": 0}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_inputs")
    fdd_dir = root / "fdd"
    write_outputs(fdd_result(per_image=True), resolve(fdd_dir))
    (root / "utility.json").write_text(json.dumps(utility_result()))
    proposed = write_shards(root / "syn_ms", synthetic_rows(100), source="synthetic", extra=plan_extra(PROPOSED_SHA))
    return {
        "run": write_run(root / "runs", "ms", "stackgan", [8, 16], 4, PROPOSED_SHA),
        "baseline": write_run(root / "runs", "dc", "cdcgan", [16], 3, None),
        "real": write_shards(root / "real", real_rows(), source="phantom"),
        "cdcgan": write_shards(root / "syn_dc", synthetic_rows(500), source="synthetic", extra=plan_extra("ef" * 32)),
        "proposed": proposed,
        "fdd": fdd_dir,
        "audit": write_audit(root / "audit", resolve(proposed).uri),
        "utility": root / "utility.json",
        "runs": root / "runs",
    }


def full_config(inputs: dict[str, Path], out: Path) -> ReportConfig:
    return ReportConfig(out=str(out), run=str(inputs["run"]), baseline_run=str(inputs["baseline"]),
                        real=str(inputs["real"]),
                        synthetic=(("cDCGAN", str(inputs["cdcgan"])), ("proposed", str(inputs["proposed"]))),
                        fdd=str(inputs["fdd"]), utility=str(inputs["utility"]), audit=str(inputs["audit"]),
                        samples_per_class=3, tile_px=32)


def text_of(html: str) -> str:
    """The page's visible text, tags dropped (to find numbers in cells)."""
    return re.sub(r"<[^>]+>", " ", re.sub(r'src="data:[^"]+"', "", html))


# --------------------------------------------------------------------------------------------
# The whole report


@pytest.fixture(scope="module")
def full_report(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out")
    result = write_report(full_config(inputs, out), log=lambda line: None)
    return out, result, (out / "report.html").read_text(), (out / "report.md").read_text()


def test_every_section_is_present_in_both_renderings(full_report):
    out, result, html, md = full_report
    for heading in HEADINGS:
        assert f">{heading}</h2>" in html
        assert f"\n## {heading}\n" in md
    assert result.missing == ()
    assert "not given" not in html and "does not exist" not in md


def test_html_is_self_contained_with_every_figure_inline(full_report):
    out, result, html, md = full_report
    figures = sorted((out / "figures").iterdir())
    assert {f.name for f in figures} == {"fig2a-loss-proposed-model.png", "fig2b-loss-cdcgan-baseline.png",
                                         "training-samples-proposed-model.png",
                                         "training-samples-cdcgan-baseline.png",
                                         "table2-samples.png", "class-balance.png", "audit-closest.png"}
    inline = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert sorted(base64.b64decode(data) for data in inline) == sorted(f.read_bytes() for f in figures)
    for f in figures:
        assert f"(figures/{f.name})" in md
    # Nothing outside the file: no links, scripts, stylesheets or remote images.
    assert not re.search(r"<(script|link)\b|src=\"(?!data:)|https?://(?!json-schema)", html)


def test_fdd_table_holds_the_numbers_of_fdd_json(full_report):
    _, _, html, md = full_report
    fdd = fdd_result()
    text = text_of(html)
    for row_name, values in (("real vs real (floor)", fdd["floor"]),
                             ("cDCGAN", fdd["synthetic"]["cDCGAN"]["fdd"]),
                             ("proposed", fdd["synthetic"]["proposed"]["fdd"])):
        line = next(line for line in md.splitlines() if line.startswith(f"| {row_name} | ") and "." in line)
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")][1:]
        assert cells[:-1] == [f"{values[c]:.3f}" for c in CLASSES]
        for c in CLASSES:
            assert f"{values[c]:.3f}" in text
    # The proposed set wins every class here, so its cells are bold and cDCGAN's are not.
    assert f"<strong>{fdd['synthetic']['proposed']['fdd']['Effusion']:.3f}</strong>" in html
    assert f"<strong>{fdd['synthetic']['cDCGAN']['fdd']['Effusion']:.3f}</strong>" not in html
    # Class-consistency with chance = 1 / the classifier's 9 classes, an undefined cell as a dash.
    assert "chance is 1/9 = 0.11" in md
    consistency = next(line for line in md.splitlines() if line.startswith("| real (test) | 0.900"))
    assert "| 0.800 | – | 0.850 |" in consistency
    assert "| proposed | 0.600 | 0.400 | 0.800 | 0.600 |" in md
    assert "lowest FDD in 3 of 3 classes" in md
    assert fdd["warnings"][0] in md


def test_balance_and_utility_tables(full_report):
    _, _, _, md = full_report
    header = next(line for line in md.splitlines() if line.startswith("| class | real train (before)"))
    assert header.count("(after)") == 2
    assert "| Effusion | 3 | 5 | 8 | 5 | 8 |" in md
    assert "| total | 11 | 13 | 24 | 13 | 24 |" in md
    assert re.search(r"\| imbalance \(max/min\) \| 3\.0 \| +\| 1\.0 \| +\| 1\.0 \|", md)
    u = utility_result()
    assert "| Pneumothorax † | 2 | 8 | 0.600 | 0.670 | +0.070 |" in md
    assert "| Effusion | 3 | 8 | 0.700 | 0.680 | -0.020 |" in md
    assert f"| macro | 11 | 24 | {u['arms']['real']['macro_auroc']:.3f} |" in md
    assert "Rare classes: Pneumothorax +0.070." in md


def test_runs_table_and_provenance(full_report):
    _, _, html, md = full_report
    # Final losses are the last record that has them (G is logged only every other record).
    assert "| ms | proposed model | stackgan | 8/16 | 4/4 | 32 |" in md
    last_d = 1.0 / 4 + 1.0 / 4 + 1  # branches 0 and 1 at step 4
    assert f"| {last_d:.4f} | {(2.0 - 0.4) * 2:.4f} | – |" in md
    assert "| dc | cDCGAN baseline | cdcgan | 16 | 3/3 |" in md
    # The proposed synthetic set is recognised as made by the proposed run's generator.
    assert f"generator `{PROPOSED_SHA[:12]}` (the proposed model run's)" in md


def test_per_image_table_holds_the_numbers_of_fdd_json(full_report):
    _, _, html, md = full_report
    section = md.split("## Fidelity, diversity and privacy per class")[1].split("\n## ")[0]
    assert "| class | FDD | floor | excess over floor [95% interval] | KID | precision | recall | density " \
           "| coverage | near-copies |" in section
    # proposed, Cardiomegaly: FDD, floor, excess, interval and KID as fdd.json gives them 
    assert "| Cardiomegaly | 17.125 | 3.000 | +14.125 [13.000, 16.750] | 0.0225 ± 0.0005 | 0.500 | 0.500 | 1.250 " \
           "| 0.625 | 0.0% |" in section
    # cDCGAN's Pneumothorax: undefined floor, KID and PRDC are dashes; FDD itself is defined.
    assert "| Pneumothorax | 44.000 | – | – | – | – | – | – | – | – |" in section
    # The mean row is over the classes with a value.
    assert "| mean of classes | 42.750 | 3.625 | +38.500 | 0.013 | 0.750 | 0.500 | 1.250 | 0.625 |" in section
    assert section.count("per-class fidelity, diversity and near-copies**") == 2
    assert "entirely above 0 means the set is told apart from real images" in section
    assert "(50 replicates)" in section and "flags 2.5% of held-out real images" in section
    assert "Not measured" not in section
    assert "+14.125 [13.000, 16.750]" in text_of(html)
    # The summary at the top gives each set's class-mean precision and recall.
    assert "**Per image** (fidelity, diversity; means over classes): cDCGAN precision 0.75, recall 0.50" in md


def test_an_fdd_json_without_per_image_metrics_still_renders(tmp_path):
    write_outputs(fdd_result(), resolve(tmp_path / "fdd"))
    result = write_report(ReportConfig(out=str(tmp_path / "out"), fdd=str(tmp_path / "fdd")), log=lambda line: None)
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("## Fidelity, diversity and privacy per class")[1].split("\n## ")[0]
    assert "Not measured: this fdd.json holds no per-image metrics" in section
    assert "`jobs/fdd.py --metrics fdd class_consistency kid prdc`" in section
    assert "|" not in section  # no table
    assert f"| proposed | **{fdd_result()['synthetic']['proposed']['fdd']['Cardiomegaly']:.3f}** |" in md  # Table 1
    assert not any(line.startswith("Per image") for line in result.summary)
    # Some measured, some not: the table shows those measured, a note names the others.
    partial = fdd_result()
    add_per_image_metrics(partial)
    for row in partial["synthetic"].values():
        del row["kid"], row["memorization"]
    write_outputs(partial, resolve(tmp_path / "partial"))
    write_report(ReportConfig(out=str(tmp_path / "out2"), fdd=str(tmp_path / "partial")), log=lambda line: None)
    md = (tmp_path / "out2" / "report.md").read_text()
    assert "Not measured: KID, near-copy rate (add `kid memorization` to `jobs/fdd.py --metrics`)." in md
    assert "| class | FDD | floor | excess over floor [95% interval] | precision | recall | density | coverage |" in md


def test_audit_section_shows_the_rule_rates_and_closest_pairs(full_report, inputs):
    out, _, html, md = full_report
    section = md.split("## Memorization audit")[1].split("\n## ")[0]
    assert "Audited: **proposed** `" in section  # the audited folder is a --synthetic set
    assert "**Rule**: An image is a near-copy when it is closer than the held-out images." in section
    assert "Thresholds: feature 0.0075, pixel 1.2500. The same rule flags 2.0% of the held-out" in section
    assert ("**Verdict**: 5 of 24 images (20.8%) flagged; held-out real images are flagged at 2.0% by the "
            "same rule: more than chance allows (one-sided binomial test, p < 0.05), so the set holds "
            "near-copies") in section
    assert f"`jobs/synthesize.py --exclude-flagged {inputs['audit']}`" in section
    assert "| class | images | flagged | flag rate | median feature distance | median pixel distance |" in section
    assert "| Cardiomegaly | 8 | 2 | 25.0% | 0.0123 | 1.5000 |" in section
    assert "| Pneumothorax | 6 | 0 | 0.0% | 0.0143 | 1.5000 |" in section
    assert "| all synthetic | 24 | 5 | 20.8% | – | – |" in section
    assert "| held-out real (test) | 50 | – | 2.0% | 0.0456 | 2.2500 |" in section
    assert "| syn-7 | Effusion | 00000042_000.png | 0.0000 | 0.0000 | yes |" in section
    assert "(figures/audit-closest.png)" in section
    assert (out / "figures" / "audit-closest.png").read_bytes() == CLOSEST_PNG
    assert base64.b64encode(CLOSEST_PNG).decode() in html
    assert "**Memorization audit**: 5 of 24 images (20.8%) flagged" in md.split("## Fig. 2")[0]


def test_class_verdict_names_a_class_above_chance_after_correction():
    from cxrfactory.report.quality_sections import class_verdict

    record = audit_record("synth/x") | {"held_out_flag_rate": 0.02}
    record["per_class"] = {c: {"n": 200, "flagged": 4, "flag_rate": 0.02} for c in ("A", "B", "C")}
    clean = class_verdict(AuditInfo("audits/x", record, None))
    assert clean.startswith("**Per class**: no class is flagged more often") and "0.05/3" in clean
    record["per_class"]["B"] = {"n": 200, "flagged": 16, "flag_rate": 0.08}  # p ~ 1e-4 at 2%
    named = class_verdict(AuditInfo("audits/x", record, None))
    assert "B 16 of 200" in named and "A " not in named.split(":", 2)[2]
    # 11 of 200 at 2.8% (p = 0.026) is chance once nine classes are tested
    record["per_class"] = {c: {"n": 200, "flagged": 11 if c == "Mass" else 1, "flag_rate": 0.0}
                           for c in ("Mass", "A", "B", "C", "D", "E", "F", "G", "H")}
    record["held_out_flag_rate"] = 0.028
    assert "lowest p is Mass's, 0.026" in class_verdict(AuditInfo("audits/x", record, None))
    record["held_out_flag_rate"] = None
    assert class_verdict(AuditInfo("audits/x", record, None)) is None


def test_audit_verdict_compares_with_the_held_out_rate():
    record = audit_record("synth/x")
    assert "the set holds near-copies" in audit_verdict(AuditInfo("audits/x", record, None))
    record |= {"flagged_total": 0, "flag_rate_total": 0.0}
    clean = audit_verdict(AuditInfo("audits/x", record, None))
    assert clean == ("0 of 24 images (0.0%) flagged; held-out real images are flagged at 2.0% by the same "
                     "rule: the set is no closer to the training patients than new patients are.")
    # One flag in 24 at a held-out rate of 2.0% is what chance gives: no accusation of copying.
    record |= {"flagged_total": 1, "flag_rate_total": 1 / 24}
    chance = audit_verdict(AuditInfo("audits/x", record, None))
    assert "within what new patients get by chance" in chance and "holds near-copies" not in chance
    record |= {"flagged_total": 1, "flag_rate_total": 1 / 24, "held_out_flag_rate": None}
    assert "could not be measured: the set holds near-copies" in audit_verdict(AuditInfo("a", record, None))


def test_sample_table_takes_the_first_ids_of_the_split(inputs):
    real = load_shard_set(resolve(inputs["real"]), "real", synthetic=False, flag="--real")
    chosen = first_images(real, list(CLASSES), "test", 3)
    rows = real_rows()
    for label in CLASSES:
        expected = sorted((image_id, n) for image_id, split, n in rows[label] if split == "test")[:3]
        assert [int(img[0, 0]) for img in chosen.images[label]] == [n for _, n in expected]
    few = first_images(real, ["Pneumothorax"], "train", 5)
    assert len(few.images["Pneumothorax"]) == REAL_TRAIN["Pneumothorax"]


# --------------------------------------------------------------------------------------------
# Partial inputs


def test_report_builds_from_a_single_input_and_says_what_is_missing(inputs, tmp_path):
    result = write_report(ReportConfig(out=str(tmp_path), utility=str(inputs["utility"]),
                                       fdd=str(tmp_path / "no-fdd-yet")), log=lambda line: None)
    md, html = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for heading in HEADINGS:
        assert f"## {heading}" in md and f">{heading}</h2>" in html
    assert "FDD not run: --fdd" in md and "does not exist" in md
    assert "No proposed-model run: pass --run RUN_DIR" in md
    assert "No real shards: pass --real URI" in md
    assert "No synthetic sets: pass --synthetic NAME=URI" in md
    assert "Memorization not audited: pass --audit DIR, the --out folder of jobs/audit.py" in md
    audit = md.split("## Memorization audit")[1].split("\n## ")[0]
    assert "pass --audit DIR" in audit and "|" not in audit
    assert "| Pneumothorax † |" in md  # the one input given is shown in full
    assert len(result.missing) == 6 and result.figures == ()
    assert "data:image/png" not in html


def test_strict_refuses_an_input_that_does_not_exist(tmp_path):
    with pytest.raises(ReportInputError, match="does not exist"):
        write_report(ReportConfig(out=str(tmp_path / "out"), fdd=str(tmp_path / "nope"), strict=True),
                     log=lambda line: None)


def test_synthetic_sets_without_real_shards_use_the_plan(inputs, tmp_path):
    write_report(ReportConfig(out=str(tmp_path), synthetic=(("proposed", str(inputs["proposed"])),),
                              tile_px=32), log=lambda line: None)
    md = (tmp_path / "report.md").read_text()
    assert "no --real given: the real counts are those proposed's plan recorded" in md.replace("No --real", "no --real")
    assert "| Cardiomegaly | 6 | 2 | 8 |" in md
    assert (tmp_path / "figures" / "table2-samples.png").read_bytes().startswith(b"\x89PNG")


def test_balance_section_shows_the_balanced_sets_not_evaluation_sets(inputs, tmp_path):
    # An evaluation set (N per class, nothing counted against real) balances nothing: with a
    # balanced set beside it, only the balanced one is a column of the class-balance table.
    rows = {label: [(f"eval-{label}-{i}", "synthetic", 900 + 10 * k + i) for i in range(4)]
            for k, label in enumerate(CLASSES)}
    evaluation = write_shards(tmp_path / "eval", rows, source="synthetic",
                              extra={"generator": PROPOSED_SHA, "seed": 0, "target_per_class": 4, "resolution": SIDE})
    mixed = ReportConfig(out=str(tmp_path / "a"), real=str(inputs["real"]), tile_px=32,
                         synthetic=(("eval", str(evaluation)), ("proposed", str(inputs["proposed"]))))
    explicit = ReportConfig(out=str(tmp_path / "b"), real=str(inputs["real"]), tile_px=32,
                            synthetic=(("eval", str(evaluation)),), balanced=(("bal", str(inputs["proposed"])),))
    for config, name in ((mixed, "proposed"), (explicit, "bal")):
        write_report(config, log=lambda line: None)
        md = (Path(config.out) / "report.md").read_text()
        header = next(line for line in md.splitlines() if line.startswith("| class | real train (before)"))
        assert f"real + {name} (after)" in header and "eval" not in header
        assert "| Effusion | 3 | 5 | 8 |" in md
        assert f"| balanced set {name} | --balanced |" in md or name == "proposed"
    with pytest.raises(ReportInputError, match="--balanced names must be unique"):
        ReportConfig(out="x", balanced=(("a", "p"), ("a", "q")))


def test_inputs_and_output_on_s3(inputs, s3_bucket, s3_endpoint):
    import pyarrow.fs as pafs

    for name in ("real", "fdd"):
        dest = resolve(f"{s3_bucket}/{name}", s3_endpoint)
        pafs.copy_files(str(inputs[name]), dest.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=dest.fs)
    result = write_report(ReportConfig(out=f"{s3_bucket}/report", real=f"{s3_bucket}/real", fdd=f"{s3_bucket}/fdd",
                                       tile_px=32, s3_endpoint=s3_endpoint), log=lambda line: None)
    out = resolve(f"{s3_bucket}/report", s3_endpoint)
    assert out.list_files() == sorted(["report.html", "report.md", "figures/table2-samples.png",
                                       "figures/class-balance.png"])
    html = resolve(result.html, s3_endpoint).read_text()
    assert ">Table 1 FDD</h2>" in html and html.count("data:image/png;base64,") == 2
    assert f"{fdd_result()['floor']['Effusion']:.3f}" in html


# --------------------------------------------------------------------------------------------
# Terminal summary


def test_summary_lines_show_fdd_consistency_and_utility():
    lines = summary_lines(fdd_result(), utility_result())
    header, rows = lines[0], {line.split()[0]: line.split()[1:] for line in lines[1:len(CLASSES) + 2]}
    assert header.split()[:3] == ["class", "FDD", "floor"]
    fdd = fdd_result()
    # floor, FDD cDCGAN, FDD proposed, cons. cDCGAN, cons. proposed, delta
    assert rows["Effusion"] == [f"{fdd['floor']['Effusion']:.2f}", f"{fdd['synthetic']['cDCGAN']['fdd']['Effusion']:.2f}",
                                f"{fdd['synthetic']['proposed']['fdd']['Effusion']:.2f}", "0.20", "0.40", "-0.020"]
    assert rows["mean"][0] == f"{fdd['floor_mean']:.2f}"
    assert any("chance 0.11" in line for line in lines)
    macro = utility_result()["macro_delta"]
    assert macro == pytest.approx(0.02)
    assert any(f"Δ {macro:+.3f}" in line and "Pneumothorax +0.070" in line for line in lines)
    assert summary_lines() == ["no FDD, downstream-utility or audit results to summarise"]


def test_summary_lines_show_per_image_metrics_and_the_audit(inputs):
    audit = AuditInfo(str(inputs["audit"]), audit_record("synth/x"), None)
    lines = summary_lines(fdd_result(per_image=True), None, audit)
    assert ("Per image (means over classes): cDCGAN precision 0.75, recall 0.50, coverage 0.62, KID 0.013, "
            "near-copies 6.2%; proposed precision 0.50, recall 0.50, coverage 0.62, KID 0.0235, "
            "near-copies 6.2%.") in lines
    assert lines[-1].startswith(f"Memorization audit ({inputs['audit']}): 5 of 24 images (20.8%) flagged; "
                                "held-out real images are flagged at 2.0%")
    assert "`" not in lines[-1]
    assert summary_lines(audit=audit) == [lines[-1]]


# --------------------------------------------------------------------------------------------
# utility.json contract


def test_utility_contract_accepts_the_agreed_schema_and_rejects_breaks():
    good = utility_result()
    jsonschema.validate(good, UTILITY_SCHEMA)
    assert validate_utility(good)["delta"]["Pneumothorax"] == pytest.approx(0.07)
    undefined = json.loads(json.dumps(good))
    undefined["arms"]["real"]["auroc"]["Pneumothorax"] = math.nan  # as a producer may write it
    undefined["delta"]["Pneumothorax"] = None
    undefined = json.loads(json.dumps(undefined))  # NaN survives Python's json round trip
    assert math.isnan(undefined["arms"]["real"]["auroc"]["Pneumothorax"])
    assert validate_utility(undefined)["arms"]["real"]["auroc"]["Pneumothorax"] is None
    no_arm = {**good, "arms": {"real": good["arms"]["real"]}}
    text_auroc = json.loads(json.dumps(good))
    text_auroc["arms"]["real"]["auroc"]["Effusion"] = "0.7"
    for bad in (no_arm, text_auroc):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, UTILITY_SCHEMA)
        with pytest.raises(UtilityFormatError):
            validate_utility(bad)
    fewer_counts = json.loads(json.dumps(good))
    del fewer_counts["arms"]["real"]["n_train"]["Effusion"]  # display-only: allowed, shown as a dash
    assert "Effusion" not in validate_utility(fewer_counts)["arms"]["real"]["n_train"]
    wrong_delta = {**good, "delta": {**good["delta"], "Effusion": 0.5}}
    jsonschema.validate(wrong_delta, UTILITY_SCHEMA)  # a schema cannot see this; the reader does
    with pytest.raises(UtilityFormatError, match=r"delta\[Effusion\]"):
        validate_utility(wrong_delta)


def test_html_escapes_text():
    doc = Document("<script>x</script>", "a & b", (Section("S", (
        Paragraph("1 < 2 and `code` and **bold**"), Table("t", ("a", "b"), (("<i>", "3"),)))),))
    html = render_html(doc)
    assert "<script>x" not in html and "&lt;script&gt;x" in html
    assert "1 &lt; 2 and <code>code</code> and <strong>bold</strong>" in html
    assert "&lt;i&gt;" in html


# --------------------------------------------------------------------------------------------
# The job: bad input -> one clear line, exit status 2


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_job(report_job.main, argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case, expected", [
    ("not_a_run", "is not a training run folder"),
    ("storage_instead_of_run", "it holds the run folder(s) dc, ms"),
    ("artifact_instead_of_run", "is a generator artifact, not a training run folder"),
    ("no_name", "expected NAME=URI"),
    ("balanced_no_name", "--balanced"),
    ("balanced_real", "not a synthetic set"),
    ("no_input", "give at least one input"),
    ("real_as_synthetic", "not a synthetic set"),
    ("synthetic_as_real", "is a synthetic set; pass it as --synthetic"),
    ("bad_utility", "delta[Effusion]"),
    ("not_an_audit", "is not a memorization audit folder: it has no audit.json"),
    ("fdd_as_audit", "it holds fdd.json, a jobs/fdd.py result: pass it as --fdd"),
    ("audit_json_of_another_kind", "lacks rule, thresholds"),
])
def test_bad_input_is_a_clear_error(case, expected, inputs, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    bad_utility = tmp_path / "utility.json"
    bad_utility.write_text(json.dumps({**utility_result(), "delta": {**utility_result()["delta"], "Effusion": 9.0}}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "generator").mkdir()
    (tmp_path / "generator" / "config.json").write_text(json.dumps({"kind": "generator", "config": {}}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "audit.json").write_text(json.dumps({k: v for k, v in audit_record("x").items()
                                                               if k not in ("rule", "thresholds")}))
    argv = {
        "not_a_run": ["--run", str(tmp_path / "empty")],
        "storage_instead_of_run": ["--run", str(inputs["runs"])],
        "artifact_instead_of_run": ["--run", str(tmp_path / "generator")],
        "no_name": ["--synthetic", str(inputs["proposed"])],
        "balanced_no_name": ["--balanced", str(inputs["proposed"])],
        "balanced_real": ["--balanced", f"x={inputs['real']}"],
        "no_input": [],
        "real_as_synthetic": ["--synthetic", f"x={inputs['real']}"],
        "synthetic_as_real": ["--real", str(inputs["proposed"])],
        "bad_utility": ["--utility", str(bad_utility)],
        "not_an_audit": ["--audit", str(tmp_path / "empty")],
        "fdd_as_audit": ["--audit", str(inputs["fdd"])],
        "audit_json_of_another_kind": ["--audit", str(tmp_path / "other")],
    }[case]
    code, err = run_cli(out + argv, capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "report.html").exists()


def test_cli_end_to_end(inputs, tmp_path):
    """The real command line: exit 0, the summary printed, both files written."""
    cmd = [sys.executable, str(REPO / "jobs" / "report.py"), "--out", str(tmp_path / "r"),
           "--fdd", str(inputs["fdd"]), "--utility", str(inputs["utility"]), "--audit", str(inputs["audit"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "FDD proposed" in done.stdout and "Downstream macro AUROC" in done.stdout
    assert "Per image (means over classes)" in done.stdout and "Memorization audit (" in done.stdout
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "report.md").exists()


def test_config_validation():
    with pytest.raises(ReportInputError, match="unique"):
        ReportConfig(out="o", synthetic=(("a", "x"), ("a", "y")))
    # The library config checks names as the command line does (cxrfactory.named_sets).
    with pytest.raises(ReportInputError, match=r"--balanced 'real=x': expected NAME=URI .* other than 'real'"):
        ReportConfig(out="o", balanced=(("real", "x"),))
    with pytest.raises(ReportInputError, match="--synthetic 'my set=x'"):
        ReportConfig(out="o", synthetic=(("my set", "x"),))
    with pytest.raises(ReportInputError, match="samples per class"):
        replace(ReportConfig(out="o", fdd="f"), samples_per_class=0)
