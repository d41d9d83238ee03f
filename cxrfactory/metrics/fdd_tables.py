"""FDD results as files: ``fdd.json`` (everything), ``fdd.csv`` and ``fdd.md`` (the tables).

The tables follow the paper's Table 1: classes as columns, one row per synthetic set, with a
"real vs real (floor)" row above them; images per class and class-consistency follow in the
same layout.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from typing import Any

from cxrfactory import filenames
from cxrfactory.storage import Location

__all__ = ["OUTPUTS", "format_csv", "format_markdown", "table_rows", "write_outputs"]

OUTPUTS = (filenames.FDD_JSON, filenames.FDD_CSV, filenames.FDD_MD)


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_rows(result: Mapping[str, Any]) -> list[tuple[str, str, list[Any], Any]]:
    """``(metric, set, per-class values, mean or total)`` for the CSV and Markdown tables."""
    classes, real = result["classes"], result["real"]
    rows: list[tuple[str, str, list[Any], Any]] = [
        ("fdd", "real vs real (floor)", [result["floor"][c] for c in classes], result["floor_mean"])]
    rows += [("fdd", name, [row["fdd"][c] for c in classes], row["fdd_mean"])
             for name, row in result["synthetic"].items()]
    rows.append(("n_images", f"real ({real['split']})", [real["n"][c] for c in classes],
                 sum(real["n"].values())))
    rows.append(("n_images", "real halves (floor)",
                 ["/".join(map(str, real["n_halves"][c])) for c in classes], ""))
    rows += [("n_images", name, [row["n"][c] for c in classes], sum(row["n"].values()))
             for name, row in result["synthetic"].items()]
    rows.append(("class_consistency", f"real ({real['split']})",
                 [real["class_consistency"][c] for c in classes], real["class_consistency_mean"]))
    rows += [("class_consistency", name, [row["class_consistency"][c] for c in classes],
              row["class_consistency_mean"]) for name, row in result["synthetic"].items()]
    return rows


def format_csv(result: Mapping[str, Any]) -> str:
    """One line per table row: ``metric, set, <class>..., mean_or_total`` (empty = undefined)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "set", *result["classes"], "mean_or_total"])
    for metric, name, values, summary in table_rows(result):
        writer.writerow([metric, name, *("" if v is None else v for v in (*values, summary))])
    return buffer.getvalue()


def format_markdown(result: Mapping[str, Any]) -> str:
    """The three tables (FDD, images, class-consistency) with what the numbers mean."""
    classes, real, clf = result["classes"], result["real"], result["classifier"]
    head = "| | " + " | ".join(classes) + " | {} |\n|---|" + "---:|" * (len(classes) + 1)
    sections = {"fdd": ("FDD per class (lower is better)", "mean"),
                "n_images": ("Images per class", "total"),
                "class_consistency": ("Class-consistency: the classifier's top-1 accuracy on each "
                                      "class's rows", "mean")}
    parts = [f"# FDD: `{real['uri']}` (split {real['split']}) against synthetic sets\n",
             f"Classifier sha256 `{clf['sha256'][:16]}…`, {clf['feature_dim']}-d pooled DenseNet "
             f"features at {clf['preprocessing']['resolution']} px. The floor is the FDD between "
             "two patient-disjoint halves of the real split through the same pipeline, at half "
             "the sample size (so a little above the true floor).\n"]
    for metric, (title, summary) in sections.items():
        parts.append(f"## {title}\n\n" + head.format(summary))
        for kind, name, values, total in table_rows(result):
            if kind == metric:
                shown = [v if isinstance(v, (int, str)) else _cell(v) for v in (*values, total)]
                parts.append(f"| {name} | " + " | ".join(map(str, shown)) + " |")
        parts.append("")
    if result["warnings"]:
        parts.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in result["warnings"]) + "\n")
    return "\n".join(parts)


def write_outputs(result: Mapping[str, Any], out: Location) -> None:
    """``fdd.json`` (everything), ``fdd.csv`` and ``fdd.md`` (the tables), each atomically."""
    out.join(filenames.FDD_JSON).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    out.join(filenames.FDD_CSV).write_text(format_csv(result))
    out.join(filenames.FDD_MD).write_text(format_markdown(result))
