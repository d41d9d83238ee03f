"""The results report: a training run, synthetic sets, FDD and audit results -> report.html + report.md.

    result = write_report(ReportConfig(out="demo_output/report", run="runs/demo",
                                       baseline_run="runs/demo-cdcgan", real="shards/real",
                                       synthetic=(("cDCGAN", "synth/cdcgan"), ("proposed", "synth/ms")),
                                       fdd="demo_output/fdd", utility="demo_output/utility.json",
                                       audit="demo_output/audit"))
    print("\\n".join(result.summary))

The report follows the paper's results: Fig. 2 (loss curves), Table 1 (FDD per class with a
real-vs-real floor and class-consistency), then per class the sample-level metrics of fdd.json
(excess over the floor, KID, precision/recall/density/coverage) and the memorization audit
(jobs/audit.py), Table 2 (per class, real images next to each synthetic set's), the class counts
before and after balancing, and the downstream-utility table
(:mod:`cxrfactory.classifier.utility_schema` documents ``utility.json``).

Every input is optional (at least one is needed): a section whose input is absent says so and
names the flag that supplies it, so the report of a half-run pipeline is still useful. A given
input that does not exist is noted the same way (an error with ``strict``); one that exists but
is the wrong kind of thing (a folder that is no run, a real set given as synthetic, malformed
JSON) is an error. ``report.html`` is self-contained (inline CSS, images as data URIs);
``report.md`` references ``figures/*.png`` next to it. Every file is written atomically.
Reading the inputs needs no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cxrfactory.named_sets import check_named_uris
from cxrfactory.report import quality_sections as Q
from cxrfactory.report import sections as S
from cxrfactory.report.inputs import (
    AuditInfo,
    ReportInputError,
    RunInfo,
    SampleImages,
    ShardSet,
    exists,
    first_images,
    load_audit,
    load_fdd,
    load_run,
    load_shard_set,
    load_utility,
)
from cxrfactory.report.render import FIGURE_DIR, Document, render_html, render_markdown
from cxrfactory.shards import SPLITS, SYNTHETIC_SPLIT
from cxrfactory.storage import Location, check_writable, resolve

__all__ = ["ReportConfig", "ReportInputError", "ReportResult", "build_document", "collect_inputs",
           "summary_lines", "write_report"]

REPORT_HTML, REPORT_MD = "report.html", "report.md"
DEFAULT_TITLE = "Synthetic chest X-rays: results"
PAPER = ("Ann et al. 2020, “Generation of High-Resolution Chest X-rays using Multi-scale "
         "Conditional GAN with Attention”")
MAX_PER_CLASS, MIN_TILE, MAX_TILE = 16, 16, 512


@dataclass(frozen=True)
class ReportConfig:
    """What the report is made from and where it goes (the job's flags, one to one)."""

    out: str  # output folder or s3:// URI: report.html, report.md, figures/
    run: str | None = None  # the proposed model's training run folder (<storage>/<run-name>)
    baseline_run: str | None = None  # the cDCGAN baseline's training run folder
    real: str | None = None  # real shard root: counts before balancing, Table 2's real column
    synthetic: tuple[tuple[str, str], ...] = ()  # (name, shard root) per synthetic set, column order
    balanced: tuple[tuple[str, str], ...] = ()  # sets made to balance the real data (class balance); default: the balanced --synthetic sets
    fdd: str | None = None  # jobs/fdd.py output folder (or its fdd.json)
    utility: str | None = None  # the downstream experiment's utility.json
    audit: str | None = None  # jobs/audit.py output folder (audit.json, closest.png) of one synthetic set
    title: str = DEFAULT_TITLE  # the report's heading
    samples_per_class: int = 4  # Table 2: images per class and source
    sample_split: str = "test"  # Table 2: the real split shown (another one if it is absent)
    tile_px: int = 128  # Table 2: side of every tile in px
    strict: bool = False  # a given input that does not exist is an error (default: a note)
    s3_endpoint: str | None = None  # S3-compatible endpoint (else CXRF_S3_ENDPOINT / AWS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "synthetic", check_named_uris(
            self.synthetic, flag="--synthetic", error=ReportInputError))
        object.__setattr__(self, "balanced", check_named_uris(
            self.balanced, flag="--balanced", error=ReportInputError))
        problems = [
            (not any([self.run, self.baseline_run, self.real, self.synthetic, self.balanced, self.fdd,
                      self.utility, self.audit]),
             "give at least one input: --run, --baseline-run, --real, --synthetic, --balanced, --fdd, "
             "--utility or --audit"),
            (not 1 <= self.samples_per_class <= MAX_PER_CLASS,
             f"samples per class must be 1..{MAX_PER_CLASS}, got {self.samples_per_class}"),
            (not MIN_TILE <= self.tile_px <= MAX_TILE,
             f"tile size must be {MIN_TILE}..{MAX_TILE} px, got {self.tile_px}"),
            (not self.out, "give an output folder"),
        ]
        for bad, message in problems:
            if bad:
                raise ReportInputError(message)


@dataclass
class ReportInputs:
    """Everything read, plus what each section must say about inputs that are absent."""

    runs: list[tuple[str, RunInfo]] = field(default_factory=list)  # (role, run)
    real: ShardSet | None = None
    synthetic: list[ShardSet] = field(default_factory=list)
    balanced: list[ShardSet] = field(default_factory=list)  # --balanced sets as given
    fdd: dict[str, Any] | None = None
    utility: dict[str, Any] | None = None
    audit: AuditInfo | None = None
    status: list[tuple[str, str, str, str]] = field(default_factory=list)  # input, flag, location, status
    absent: dict[str, list[str]] = field(default_factory=dict)  # section title -> notes

    def note(self, section: str, text: str) -> None:
        self.absent.setdefault(section, []).append(text)


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it says in brief."""

    html: str  # URI of report.html
    markdown: str  # URI of report.md
    figures: tuple[str, ...]  # URIs of figures/*.png
    missing: tuple[str, ...]  # one line per absent input
    summary: tuple[str, ...]  # summary_lines() of the FDD, utility and audit results


# --------------------------------------------------------------------------------------------
# Reading


ROLES = {"--run": "proposed model", "--baseline-run": "cDCGAN baseline"}
HINTS = {
    "--run": (S.LOSSES, "pass --run RUN_DIR, the proposed model's run folder (<storage>/<run-name>)"),
    "--baseline-run": (S.LOSSES, "pass --baseline-run RUN_DIR, the cDCGAN run (jobs/train.py --model cdcgan)"),
    "--real": (S.SAMPLES, "pass --real URI, the real shard folder (jobs/ingest_nih.py output)"),
    "--synthetic": (S.SAMPLES, "pass --synthetic NAME=URI per synthetic set (jobs/synthesize.py output)"),
    "--balanced": (S.BALANCE, "pass --balanced NAME=URI, a set made with jobs/synthesize.py --balance-against"),
    "--fdd": (S.FDD, "pass --fdd DIR, the --out folder of jobs/fdd.py"),
    "--utility": (S.UTILITY, "pass --utility FILE, the utility.json of the downstream experiment"),
    "--audit": (Q.AUDIT, "pass --audit DIR, the --out folder of jobs/audit.py on a synthetic set"),
}
NOT_GIVEN = {"--run": "No proposed-model run", "--baseline-run": "No cDCGAN baseline run",
             "--real": "No real shards", "--synthetic": "No synthetic sets", "--balanced": "No balanced set",
             "--fdd": "FDD not run", "--utility": "Downstream utility not run",
             "--audit": "Memorization not audited"}


def _absent(inputs: ReportInputs, flag: str, uri: str | None, what: str) -> None:
    """Record a flag that was not given, or whose location does not exist."""
    section, hint = HINTS[flag]
    if uri is None:
        text, status = f"{NOT_GIVEN[flag]}: {hint}.", "not given"
    else:
        text, status = f"{NOT_GIVEN[flag]}: {flag} `{uri}` does not exist (not made yet?).", "not found"
    inputs.status.append((what, flag, uri or "", status))
    inputs.note(section, text)
    if flag in ("--real", "--synthetic"):
        inputs.note(S.BALANCE, text)
    if flag == "--fdd":  # the per-image metrics come in the same fdd.json
        inputs.note(Q.QUALITY, text)


def _locate(config: ReportConfig, inputs: ReportInputs, flag: str, uri: str | None,
            what: str) -> Location | None:
    """The input's location when it exists; else record why it is absent and return None."""
    if uri is None:
        _absent(inputs, flag, None, what)
        return None
    loc = resolve(uri, config.s3_endpoint)
    if exists(loc, flag):
        return loc
    if config.strict:
        raise ReportInputError(f"{flag} {uri} does not exist")
    _absent(inputs, flag, uri, what)
    return None


def collect_inputs(config: ReportConfig) -> ReportInputs:
    """Read every given input; raises :class:`ReportInputError` for one of the wrong kind."""
    inputs = ReportInputs()
    for flag, uri in (("--run", config.run), ("--baseline-run", config.baseline_run)):
        loc = _locate(config, inputs, flag, uri, f"{ROLES[flag]} run")
        if loc is not None:
            run = load_run(loc, flag)
            inputs.runs.append((ROLES[flag], run))
            last = run.records[-1] if run.records else {}
            inputs.status.append((f"{ROLES[flag]} run", flag, loc.uri,
                                  f"{run.arch}, step {last.get('step', 0)}"
                                  + (f", generator `{run.generator_sha256[:12]}`" if run.generator_sha256
                                     else ", no generator artifact yet")))
    loc = _locate(config, inputs, "--real", config.real, "real shards")
    if loc is not None:
        inputs.real = load_shard_set(loc, "real", synthetic=False, flag="--real")
        counts = inputs.real.manifest.counts
        inputs.status.append(("real shards", "--real", loc.uri, f"{inputs.real.manifest.source}, " + ", ".join(
            f"{split} {sum(counts[split].values()):,}" for split in counts)))
    if not config.synthetic:
        _absent(inputs, "--synthetic", None, "synthetic sets")
    for flag, sets, kept in (("--synthetic", config.synthetic, inputs.synthetic),
                             ("--balanced", config.balanced, inputs.balanced)):
        for name, uri in sets:
            what = f"{'balanced' if flag == '--balanced' else 'synthetic'} set {name}"
            loc = _locate(config, inputs, flag, uri, what)
            if loc is None:
                continue
            shard_set = load_shard_set(loc, name, synthetic=True, flag=flag)
            kept.append(shard_set)
            sha = str(shard_set.manifest.extra.get("generator", ""))
            made_by = [role for role, run in inputs.runs if run.generator_sha256 and run.generator_sha256 == sha]
            inputs.status.append((what, flag, loc.uri,
                                  f"{shard_set.manifest.total(SYNTHETIC_SPLIT):,} images"
                                  + (f", generator `{sha[:12]}`" if sha else "")
                                  + (f" (the {made_by[0]} run's)" if made_by else "")))
    loc = _locate(config, inputs, "--fdd", config.fdd, "FDD result")
    if loc is not None:
        inputs.fdd = load_fdd(loc)
        inputs.status.append(("FDD result", "--fdd", loc.uri, f"{len(inputs.fdd['synthetic'])} synthetic "
                              f"set(s), {len(inputs.fdd['classes'])} classes"))
    loc = _locate(config, inputs, "--utility", config.utility, "downstream utility")
    if loc is not None:
        inputs.utility = load_utility(loc)
        inputs.status.append(("downstream utility", "--utility", loc.uri,
                              f"{len(inputs.utility['classes'])} classes"))
    loc = _locate(config, inputs, "--audit", config.audit, "memorization audit")
    if loc is not None:
        inputs.audit = load_audit(loc)
        record = inputs.audit.record
        inputs.status.append(("memorization audit", "--audit", loc.uri,
                              f"{record['flagged_total']} of {sum(record['synthetic'].get('n', {}).values()):,} "
                              f"images flagged, set `{record['synthetic'].get('uri')}`"))
    return inputs


def _sample_sources(config: ReportConfig, inputs: ReportInputs) -> tuple[list[SampleImages], list[str]]:
    """Table 2's columns (real, then each synthetic set) and its rows (classes)."""
    sets: list[tuple[ShardSet, str]] = []
    if inputs.real is not None:
        counts = inputs.real.manifest.counts
        split = next((s for s in (config.sample_split, *SPLITS, *counts) if counts.get(s)), None)
        if split is not None:
            sets.append((inputs.real, split))
            if split != config.sample_split:
                inputs.note(S.SAMPLES, f"The real set has no `{config.sample_split}` split; "
                                       f"showing its `{split}` split.")
    sets += [(s, SYNTHETIC_SPLIT) for s in inputs.synthetic]
    held = [c for s, split in sets for c, n in s.manifest.counts.get(split, {}).items() if n]
    classes = S.vocabulary_order(held)
    return [first_images(s, classes, split, config.samples_per_class) for s, split in sets], classes


# --------------------------------------------------------------------------------------------
# Building and writing


def balancing_sets(inputs: ReportInputs) -> list[ShardSet]:
    """The class-balance section's sets: --balanced, else the --synthetic sets made with
    --balance-against (an evaluation set of N per class balances nothing), else every one."""
    if inputs.balanced:
        return inputs.balanced
    made_to_balance = [s for s in inputs.synthetic if s.manifest.extra.get("balance_against")]
    return made_to_balance or inputs.synthetic


def build_document(config: ReportConfig, inputs: ReportInputs) -> Document:
    """The report's sections from what was read."""
    sources, classes = _sample_sources(config, inputs)
    absent = inputs.absent
    body = (
        S.loss_section(inputs.runs, absent.get(S.LOSSES, [])),
        S.fdd_section(inputs.fdd, absent.get(S.FDD, [])),
        Q.quality_section(inputs.fdd, absent.get(Q.QUALITY, [])),
        Q.audit_section(inputs.audit, absent.get(Q.AUDIT, []),
                        {s.root.uri: s.name for s in (*inputs.synthetic, *inputs.balanced)}),
        S.samples_section(sources, classes, config.samples_per_class, config.tile_px,
                          absent.get(S.SAMPLES, [])),
        S.balance_section(inputs.real, balancing_sets(inputs), absent.get(S.BALANCE, [])),
        S.utility_section(inputs.utility, absent.get(S.UTILITY, [])),
    )
    front = S.inputs_section(inputs.status, S.headline(inputs.fdd, inputs.utility)
                             + Q.headline(inputs.fdd, inputs.audit))
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    missing = tuple(dict.fromkeys(t for notes in absent.values() for t in notes))
    return Document(config.title, f"Results in the layout of {PAPER}. Made {made}.",
                    (front, *body), missing)


def write_report(config: ReportConfig, log: Callable[[str], None] = print) -> ReportResult:
    """Read the inputs, build the report, write figures, report.md and report.html (last)."""
    out = resolve(config.out, config.s3_endpoint)
    check_writable(out)
    inputs = collect_inputs(config)
    doc = build_document(config, inputs)
    figures = []
    for figure in doc.figures():
        loc = out.join(FIGURE_DIR, figure.name)
        loc.write_bytes(figure.png)
        figures.append(loc.uri)
    markdown, html = out.join(REPORT_MD), out.join(REPORT_HTML)
    markdown.write_text(render_markdown(doc))
    html.write_text(render_html(doc))
    for line in doc.missing:
        log(f"[report] missing: {line.replace('`', '')}")
    log(f"[report] wrote {html.uri} and {markdown.uri} (+ {len(figures)} figures)")
    return ReportResult(html.uri, markdown.uri, tuple(figures), doc.missing,
                        tuple(summary_lines(inputs.fdd, inputs.utility, inputs.audit)))


# --------------------------------------------------------------------------------------------
# Terminal summary


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


@dataclass(frozen=True)
class _Column:
    """One column of the terminal summary."""

    header: str
    per_class: Mapping[str, Any]
    mean: Any
    digits: int = 2
    signed: bool = False

    @property
    def width(self) -> int:
        return max(9, min(14, len(self.header)))

    def cell(self, value: Any) -> str:
        return f"{S.fmt(value, self.digits, signed=self.signed):>{self.width}}"


def summary_lines(fdd: Mapping[str, Any] | None = None,
                  utility: Mapping[str, Any] | None = None,
                  audit: AuditInfo | None = None) -> list[str]:
    """A few terminal lines: FDD per class (with the floor), class-consistency, utility deltas.

    A row per class (FDD and utility classes together), columns: the floor, each synthetic
    set's FDD, each set's class-consistency, the AUROC delta; then the means and one line each
    on class-consistency, the per-image metrics (when fdd.json has them), the downstream macro
    AUROC and the memorization audit.
    """
    if fdd is None and utility is None and audit is None:
        return ["no FDD, downstream-utility or audit results to summarise"]
    lines = _class_lines(fdd, utility) if fdd or utility else []
    if audit is not None:
        lines.append(f"Memorization audit ({audit.uri}): {Q.audit_verdict(audit).replace('`', '')}")
    return lines


def _sample_line(fdd: Mapping[str, Any]) -> str | None:
    """Precision/recall/coverage and KID per set, class means; None for an fdd.json without them."""
    parts = []
    for name, row in fdd["synthetic"].items():
        means = Q.sample_means(row)
        shown = [f"{key} {S.fmt(means[key], 2)}" for key in ("precision", "recall", "coverage") if key in means]
        if "kid" in means:
            shown.append("KID " + (S.DASH if means["kid"] is None else f"{means['kid']:.3g}"))
        if "memorization" in means:
            shown.append(f"near-copies {Q.percent(means['memorization'])}")
        if shown:
            parts.append(f"{name} {', '.join(shown)}")
    return f"Per image (means over classes): {'; '.join(parts)}." if parts else None


def _class_lines(fdd: Mapping[str, Any] | None, utility: Mapping[str, Any] | None) -> list[str]:
    """The per-class table of summary_lines() and the lines under it."""
    columns: list[_Column] = []
    if fdd:
        sets = fdd["synthetic"]
        columns.append(_Column("FDD floor", fdd["floor"], fdd.get("floor_mean")))
        columns += [_Column(f"FDD {name}", row["fdd"], row.get("fdd_mean")) for name, row in sets.items()]
        columns += [_Column(f"cons. {name}", row["class_consistency"], row.get("class_consistency_mean"))
                    for name, row in sets.items()]
    if utility:
        columns.append(_Column("Δ AUROC", utility["delta"], utility.get("macro_delta"), 3, signed=True))
    classes = S.vocabulary_order([*(fdd["classes"] if fdd else []), *(utility["classes"] if utility else [])])
    width = max(len(c) for c in [*classes, "mean"]) + 1
    lines = [f"{'class':<{width}}" + "".join(f" {_short(col.header, col.width):>{col.width}}" for col in columns)]
    lines += [f"{label:<{width}}" + "".join(f" {col.cell(col.per_class.get(label))}" for col in columns)
              for label in classes]
    lines.append(f"{'mean':<{width}}" + "".join(f" {col.cell(col.mean)}" for col in columns))
    if fdd:
        n = len(fdd["classifier"].get("classes", fdd["classes"]))
        lines.append(f"FDD: lower is better; floor = real vs real. Class-consistency (cons.): real "
                     f"{S.fmt(fdd['real'].get('class_consistency_mean'), 2)}, chance {1 / n:.2f}.")
        sample = _sample_line(fdd)
        if sample:
            lines.append(sample)
    if utility:
        real, mixed = utility["arms"]["real"], utility["arms"]["real+synthetic"]
        rare = S.rare_deltas(utility)
        lines.append(f"Downstream macro AUROC: real {S.fmt(real['macro_auroc'])} -> real+synthetic "
                     f"{S.fmt(mixed['macro_auroc'])} (Δ {S.fmt(utility['macro_delta'], signed=True)})"
                     + (f"; rare classes: {rare}" if rare else ""))
    return lines
