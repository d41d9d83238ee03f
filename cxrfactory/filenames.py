"""Every file and folder name the parts agree on, defined once.

A run folder, an artifact or a shard set is a contract between the job that writes it and the
jobs (and users) that read it; spelling its names in one place keeps writer and readers in step.
See docs/architecture.md, "Contracts".
"""

# -- artifacts (generator and classifier) and checkpoints ------------------------------------
CONFIG = "config.json"  # resolved config of a run, checkpoint or artifact
SHA256 = "sha256"  # hex digest of an artifact's weights, written last: the artifact is complete
GENERATOR_WEIGHTS = "generator.pt"  # G_ema state dict
CLASSIFIER_WEIGHTS = "classifier.pt"  # XrayDenseNet state dict
STATE = "state.pt"  # a training checkpoint's state dicts (torch.load(weights_only=True))

# -- a GAN run folder: <storage>/<run name>/ -------------------------------------------------
METRICS = "metrics.jsonl"  # one JSON line per log interval (GAN) or epoch (classifier)
LOSS_CURVES = "loss_curves.png"
SAMPLES = "samples"  # samples/step-<step>.png
GENERATOR = "generator"  # the generator artifact folder

# -- a classifier output folder: <out>/ ------------------------------------------------------
CLASSIFIER = "classifier"  # the classifier artifact folder
CLASSIFIER_RUN = "classifier_run.json"  # the settings a run name was started with

# -- shard sets ------------------------------------------------------------------------------
MANIFEST = "_manifest.json"  # written last: the set is complete
LEGACY_MANIFEST = "manifest.json"  # shard format 1
PLAN = "_plan.json"  # what a writer set out to make (its identity), written first
CARD = "_README.md"  # the dataset card

# -- evaluation outputs ----------------------------------------------------------------------
FDD_JSON, FDD_CSV, FDD_MD = "fdd.json", "fdd.csv", "fdd.md"
UTILITY = "utility.json"
AUDIT = "audit.json"  # a memorization audit's summary: rule, thresholds, flagged per class
FLAGGED = "flagged.parquet"  # a memorization audit's flagged synthetic images, one row each
CLOSEST = "closest.png"  # a memorization audit's closest pairs, side by side

# -- feature banks: <shard root>/_features/<classifier sha256[:16]>/<split>-<identity>/ -------
FEATURES = "_features"  # hidden from the shard readers by its leading "_"
BANK = "bank.json"  # a bank's identity and counts, written last: the bank is complete
REPORT_HTML, REPORT_MD = "report.html", "report.md"

# -- a phantom folder ------------------------------------------------------------------------
PHANTOM_MARKER = "phantom.json"
