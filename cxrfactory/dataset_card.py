"""The dataset card: ``<root>/_README.md``, the first thing a person opens in a shard folder.

Written by every shard writer just before the manifest (:func:`finish_set`),
from the manifest alone: what the set is, classes and counts per split, where it came from
(generator sha256 and training run, seeds, the command), the license note, and how to read it.

Its YAML header is a Hugging Face dataset card header (``configs``, ``data_files``,
``dataset_info.features``), so the folder uploads to the Hub as is, the card renamed
``README.md``. It is not called ``README.md`` in the folder because pandas and pyarrow read
every file of a folder whose name does not start with ``_`` or ``.`` as Parquet, and would
fail on it.
"""

from __future__ import annotations

from typing import Any

import yaml

from cxrfactory import filenames
from cxrfactory import shards
from cxrfactory.storage import Location

#: The split names Hugging Face ``datasets`` gives our split folders when it infers them
#: itself (``val`` -> ``validation``; synthetic rows live in ``train/``). The card uses the
#: same names, so a user gets the same splits with and without it.
HF_SPLITS = {"train": "train", "val": "validation", "test": "test", shards.SYNTHETIC_SPLIT: "train"}

NIH_DOWNLOAD = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_LICENSE = (
    "Images derived from NIH ChestX-ray14 (NIH Clinical Center). NIH's terms: the use of the "
    "data is unrestricted, but users must link to the original download site "
    "(https://nihcc.app.box.com/v/ChestXray-NIHCC), acknowledge the NIH Clinical Center as the "
    "data provider and cite Wang et al., \"ChestX-ray8\", CVPR 2017. The labels were mined from "
    "radiology reports by NLP and are imperfect.")
PHANTOM_LICENSE = (
    "Procedural phantom images drawn by cxrfactory: no patient's image is in them. Their labels, "
    "patient ids and lesion boxes may come from NIH ChestX-ray14's metadata, whose terms (link "
    "to the download site, acknowledge the NIH Clinical Center, cite Wang et al., CVPR 2017) "
    "apply to that metadata.")
SYNTHETIC_LICENSE = (
    "Images made by a generative model. They inherit the terms of the data the generator was "
    "trained on: for a generator trained on NIH ChestX-ray14, NIH's terms (link to the download "
    "site, acknowledge the NIH Clinical Center, cite Wang et al., CVPR 2017). Synthetic images "
    "are not patients: do not use them for diagnosis.")

_WHAT = {
    "nih": ("Real chest X-rays", "Chest X-rays from NIH ChestX-ray14, resized and split by "
            "patient (a patient is never in two splits)."),
    "phantom": ("Phantom chest X-rays", "Procedural phantom chest X-rays in NIH ChestX-ray14's "
                "layout, ingested like the real data (splits by patient)."),
    "synthetic": ("Synthetic chest X-rays", "Class-conditional synthetic chest X-rays made by a "
                  "cxrfactory generator; each row's `label` is the class it was asked for, and "
                  "its `seed` with the generator remakes the image bit for bit."),
}


def finish_set(root: Location, manifest: shards.Manifest) -> None:
    """The dataset card, then the manifest: the manifest, written last, marks the set complete."""
    root.join(filenames.CARD).write_text(render_card(manifest))
    shards.write_manifest(root, manifest)


def render_card(manifest: shards.Manifest) -> str:
    """The whole card (YAML header and Markdown body) for a manifest."""
    header = yaml.safe_dump(hub_metadata(manifest), sort_keys=False, default_flow_style=False)
    title, what = _WHAT.get(manifest.source, (f"{manifest.source} chest X-rays", ""))
    parts = [f"---\n{header}---\n", f"# {title}\n", what + "\n", "## Contents\n",
             _count_table(manifest), "## Provenance\n", *_provenance(manifest),
             "## Reading it\n", _reading(manifest), "## License\n", _license(manifest) + "\n",
             "## Files\n", _files(manifest)]
    return "\n".join(parts)


def hub_metadata(manifest: shards.Manifest) -> dict[str, Any]:
    """The YAML header: what the Hugging Face Hub and ``datasets`` read from a card."""
    splits = _hub_splits(manifest)
    return {
        "pretty_name": _WHAT.get(manifest.source, (manifest.source,))[0],
        "license": "other",
        "license_name": "nih-chestxray14-terms",
        "license_link": NIH_DOWNLOAD,
        "task_categories": ["image-classification"],
        "tags": ["medical", "chest-x-ray", "cxrfactory", manifest.source],
        "configs": [{"config_name": "default", "data_files": [
            {"split": name, "path": [f"{folder}/*/*.parquet" for folder in folders]}
            for name, (folders, _) in splits.items()]}],
        "dataset_info": {
            "features": [_yaml_feature(name, spec) for name, spec in shards.HF_FEATURES.items()]
            + [{"name": "findings", "list": "string"}],
            "splits": [{"name": name, "num_examples": n} for name, (_, n) in splits.items()],
        },
    }


def _hub_splits(manifest: shards.Manifest) -> dict[str, tuple[list[str], int]]:
    """Hub split name -> (our split folders in it, rows)."""
    out: dict[str, tuple[list[str], int]] = {}
    for split in manifest.counts:
        name = HF_SPLITS.get(split, split)
        folders, n = out.get(name, ([], 0))
        folder = shards.SPLIT_FOLDERS.get(split, split)
        out[name] = (folders + [folder] * (folder not in folders), n + manifest.total(split))
    return out


def _yaml_feature(name: str, spec: dict[str, str]) -> dict[str, str]:
    return {"name": name, "dtype": "image" if spec["_type"] == "Image" else spec["dtype"]}


def _count_table(manifest: shards.Manifest) -> str:
    splits = list(manifest.counts)
    lines = ["| class | " + " | ".join(splits) + " | total |",
             "|---|" + "---:|" * (len(splits) + 1)]
    for c in manifest.classes:
        cells = [manifest.counts[s].get(c, 0) for s in splits]
        lines.append(f"| {c} | " + " | ".join(f"{n:,}" for n in cells) + f" | {sum(cells):,} |")
    totals = [manifest.total(s) for s in splits]
    lines.append("| **total** | " + " | ".join(f"{n:,}" for n in totals)
                 + f" | {sum(totals):,} |")
    return "\n".join(lines) + "\n"


def _provenance(manifest: shards.Manifest) -> list[str]:
    extra = manifest.extra
    items = [f"- source: `{manifest.source}`; shard format {manifest.format}; created "
             f"{manifest.created}"]
    if extra.get("resolution"):
        items.append(f"- images: {extra['resolution']} x {extra['resolution']} px, 8-bit "
                     "grayscale PNG")
    if extra.get("generator"):
        items.append(f"- generator sha256: `{extra['generator']}`"
                     + (f" (artifact `{extra['generator_uri']}`)" if extra.get("generator_uri") else ""))
    run = extra.get("generator_run") or {}
    if run:
        items.append("- training run: " + ", ".join(f"{k} `{v}`" for k, v in run.items()))
    if "seed" in extra:
        items.append(f"- run seed: {extra['seed']} (image i of class k has seed "
                     "`image_seed(seed, k, i)`, stored in the row's `seed` column)")
    if extra.get("target_per_class"):
        against = extra.get("balance_against")
        items.append(f"- target per class: {extra['target_per_class']:,}"
                     + (f", counting the real rows of `{against['uri']}` split "
                        f"`{against['split']}`" if against else ""))
    if extra.get("audit"):
        audit = extra["audit"]
        items.append(f"- memorization audit: {len(audit.get('excluded', [])):,} flagged image(s) "
                     f"excluded, {sum(audit.get('replaced', {}).values()):,} replaced from further "
                     f"seeds (audits, rule and thresholds in `{filenames.MANIFEST}`)")
    if manifest.skipped:
        items.append(f"- {len(manifest.skipped)} input image(s) skipped, each with its reason, "
                     f"in `{filenames.MANIFEST}`")
    command = extra.get("command")
    if extra.get("migrated_from_format"):
        items.append(f"- migrated in place from shard format {extra['migrated_from_format']} "
                     "(`jobs/migrate_shards.py`)")
    items.append(f"- made by: `{command}`" if command else "- made by: no command line recorded")
    return ["\n".join(items) + "\n"]


def _reading(manifest: shards.Manifest) -> str:
    return f"""One row per image; `label` is the class, `image` holds PNG bytes (a Hugging Face
`Image`), `split` is {", ".join(f"`{s}`" for s in manifest.counts)}. With `ROOT` this folder
(a local path or an `s3://` URI):

```python
pandas.read_parquet(ROOT)
pyarrow.dataset.dataset(ROOT, format="parquet", partitioning="hive").to_table()
polars.scan_parquet(f"{{ROOT}}/**/*.parquet").collect()
duckdb.sql(f"SELECT label, count(*) FROM read_parquet('{{ROOT}}/**/*.parquet') GROUP BY label")
datasets.load_dataset("parquet", data_dir=ROOT)   # splits {", ".join(sorted(set(HF_SPLITS.get(s, s) for s in manifest.counts)))}
ray.data.read_parquet(ROOT)
cxrfactory.shard_dataset.ShardDataset(ROOT)         # a PyTorch map-style dataset
```
"""


def _license(manifest: shards.Manifest) -> str:
    return {"nih": NIH_LICENSE, "phantom": PHANTOM_LICENSE}.get(manifest.source, SYNTHETIC_LICENSE)


def _files(manifest: shards.Manifest) -> str:
    synthetic = ("; synthetic rows are in `train/` (their `split` column says `synthetic`)"
                 if shards.SYNTHETIC_SPLIT in manifest.counts else "")
    return (f"- `<split folder>/<Class>/part-NNNNN.parquet`: {len(manifest.files)} shard "
            f"file(s){synthetic}\n"
            f"- `{filenames.MANIFEST}`: counts, files, the resolved config; written last, so "
            "its presence means the folder is complete\n"
            f"- `{filenames.PLAN}` (from the project's jobs): what the writer set out to make, "
            "so a stopped run resumes\n"
            f"- `{filenames.CARD}`: this card (as `README.md` on the Hugging Face Hub)\n")
