"""The one config system: presets of every kind, strict loading, overrides, the jobs' CLI pair.

No Ray is started here: the jobs' parsers and resolve functions are called directly.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from cxrfactory import config as C
from cxrfactory.classifier.config import ClassifierConfig, load_classifier_preset
from cxrfactory.classifier.utility_config import UtilityConfig
from cxrfactory.config import ConfigError
from cxrfactory.data.nih import IngestConfig
from cxrfactory.gan.config import Config, GANConfig, TrainConfig, load_config
from cxrfactory.models.config import ModelConfig, model_config
from cxrfactory.report.report import ReportConfig
from cxrfactory.synthesis.plan import SynthesisConfig

LOCATIONS = {"real": "shards/real", "out": "out"}


def _demo_size():
    from jobs.demo import DemoSize

    return DemoSize


def _load(kind: str, name: str):
    """One preset as its kind's config class (data locations supplied where a run needs them)."""
    data = C.preset_data(kind, name)
    if kind == "gan":
        return Config.from_dict(data)
    if kind == "classifier":
        return ClassifierConfig.from_dict({**data, **LOCATIONS})
    if kind == "utility":
        return UtilityConfig.from_dict(C.merge(data, {"classifier": LOCATIONS}))
    return C.from_dict(_demo_size(), data)


# ------------------------------------------------------------------------------------ presets
def test_every_kind_has_its_presets():
    assert {kind: C.available_presets(kind) for kind in C.KINDS} == {
        "gan": ["demo", "paper", "smoke"], "classifier": ["demo", "full", "smoke"],
        "utility": ["demo", "full", "smoke"], "demo": ["full", "quick"]}


@pytest.mark.parametrize("kind, name", [(k, n) for k in C.KINDS for n in C.available_presets(k)])
def test_every_preset_loads_and_holds_what_its_file_says(kind, name):
    loaded = C.to_dict(_load(kind, name))

    def check(file_part, loaded_part, where):
        for key, value in file_part.items():
            if isinstance(value, dict):
                check(value, loaded_part[key], f"{where}{key}.")
            else:
                got = loaded_part[key]
                assert got == value or (isinstance(value, tuple) and list(value) == got), where + key

    check(C.preset_data(kind, name), loaded, "")


def test_presets_keep_the_values_they_had_as_code():
    """The presets were dicts and module constants before they were YAML; same values."""
    smoke = C.preset_data("gan", "smoke")
    assert smoke == {"model": {"ngf": 16, "ndf": 8, "base_resolution": 8, "num_branches": 2, "z_dim": 16,
                               "num_residual": 1}, "train": {"max_steps": 2, "batch_size": 8, "use_gpu": False}}
    assert C.preset_data("classifier", "full") == {}
    assert C.preset_data("classifier", "demo") == {"arch": "small", "resolution": 64, "epochs": 10,
                                                  "batch_size": 32, "lr": 2e-3, "class_weighted": True,
                                                  "torch_threads": 2}
    assert C.preset_data("classifier", "smoke") == {"arch": "tiny", "resolution": 32, "epochs": 1,
                                                   "batch_size": 8, "max_steps_per_epoch": 2}
    import jobs.demo as demo

    assert dataclasses.astuple(demo.FULL) == (
        3000, 80, 64, 1500, ("--preset", "demo", "--epochs", "100", "--torch-threads", "2"), 300,
        ("--preset", "demo", "--balance-per-class", "200"), 200)
    assert dataclasses.astuple(demo.QUICK) == (
        240, 14, 32, 6, ("--preset", "demo", "--set", "model.base_resolution=8", "--set",
                         "model.num_branches=3", "--batch-size", "8"), 30, ("--preset", "smoke"), 8)


@pytest.mark.parametrize("name", C.available_presets("utility"))
def test_utility_presets_train_the_classifier_preset_of_their_name(name):
    assert _load("utility", name).classifier == load_classifier_preset(name, **LOCATIONS)


def test_a_partial_file_takes_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  ngf: 32\ntrain:\n  seed: 7\n")
    config = load_config(path)
    assert (config.model.ngf, config.train.seed) == (32, 7)
    assert (config.model.ndf, config.gan, config.train.epochs) == (ModelConfig().ndf, GANConfig(), TrainConfig().epochs)


def test_the_networks_read_only_the_model_section_of_a_preset():
    assert model_config("demo") == load_config("demo").model != ModelConfig()


# ------------------------------------------------------------------------- bad input, named
@pytest.mark.parametrize("cls, data, message", [
    (Config, {"model": {"ngff": 3}}, r"unknown key\(s\) model.ngff; allowed in model: arch, classes"),
    (Config, {"trian": {}}, r"unknown key\(s\) trian; allowed: model, gan, train"),
    (Config, {"gan": {"lr_g": "fast"}}, "gan.lr_g must be a finite number, got 'fast'"),
    (ClassifierConfig, {**LOCATIONS, "learning_rate": 1.0}, r"unknown key\(s\) learning_rate; allowed: real, out"),
    (ClassifierConfig, {**LOCATIONS, "epochs": "ten"}, "epochs must be an integer, got 'ten'"),
    (ClassifierConfig, {"real": "r"}, r"missing required key\(s\) out"),
    (UtilityConfig, {"classifier": {**LOCATIONS, "lr": [1]}}, "classifier.lr must be a finite number"),
    (SynthesisConfig, {"generator": "g", "out": "o", "target_per_class": 2, "overwrite": "yes"},
     "overwrite must be true or false, got 'yes'"),
])
def test_bad_input_is_refused_with_the_field_named(cls, data, message):
    with pytest.raises(ConfigError, match=message):
        C.from_dict(cls, data)


def test_an_unknown_preset_lists_the_presets_of_its_kind():
    with pytest.raises(ConfigError, match="unknown preset 'fast'; classifier presets: demo, full, smoke"):
        C.preset_data("classifier", "fast")
    with pytest.raises(ConfigError, match="unknown preset 'papr'; gan presets: demo, paper, smoke"):
        load_config("papr")


def test_overrides_are_dotted_for_sections_and_plain_for_flat_configs():
    assert C.with_overrides(Config(), {"model.ngf": 32}).model.ngf == 32
    flat = C.with_overrides(ClassifierConfig(**LOCATIONS), C.parse_overrides(["lr=3e-4", "synthetic=[a, b]"]))
    assert (flat.lr, flat.synthetic) == (3e-4, ("a", "b"))
    with pytest.raises(ConfigError, match="unknown field 'model.width'; model fields: arch"):
        C.with_overrides(Config(), {"model.width": 1})
    with pytest.raises(ConfigError, match="unknown field 'lr.x'"):
        C.with_overrides(ClassifierConfig(**LOCATIONS), {"lr.x": 1})
    with pytest.raises(ConfigError, match="must look like"):
        C.parse_overrides(["lr"])


# ---------------------------------------------------------------------------- round trips
ROUND_TRIP = [
    ModelConfig(arch="cdcgan", classes=("Mass", "Normal"), ngf=32, attention=False),
    GANConfig(lr_g=1e-4, betas=(0.0, 0.99), ema_rampup=None, ema_batchnorm="standing"),
    TrainConfig(epochs=3, max_steps=5, use_gpu=True, seed=9),
    Config(model=ModelConfig(ngf=32), gan=GANConfig(bf16=True), train=TrainConfig(batch_size=4)),
    ClassifierConfig(real="r", out="o", classes=("Normal", "Mass"), synthetic=("s1", "s2"),
                     synthetic_ratio=0.25, cpus_per_worker=1.5, arch="tiny"),
    UtilityConfig(classifier=ClassifierConfig(real="r", out="o", lr=0.5), target_per_class=7, split="val"),
    SynthesisConfig(generator="g", out="o", target_per_class=3, classes=("Mass",), resolution=32,
                    gpus_per_worker=0.5, overwrite=True, command="x"),
    IngestConfig(nih_root="n", out="o", resolution=32, classes=("Normal", "Effusion"), val_fraction=0.2),
    ReportConfig(out="o", synthetic=(("a", "u1"), ("b", "u2")), strict=True, tile_px=64),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=lambda c: type(c).__name__)
def test_to_dict_from_dict_round_trips_through_json(config):
    again = C.from_dict(type(config), json.loads(json.dumps(C.to_dict(config))))
    assert again == config


def test_fdd_and_demo_configs_round_trip():
    from cxrfactory.metrics.fdd import FDDConfig

    for config in (FDDConfig(real="r", synthetic=(("a", "u"),), classifier="c", out="o", max_per_class=4,
                             use_gpu=False),
                   C.from_dict(_demo_size(), C.preset_data("demo", "quick"))):
        assert C.from_dict(type(config), json.loads(json.dumps(C.to_dict(config)))) == config


@pytest.mark.parametrize("config", ROUND_TRIP[-3:], ids=lambda c: type(c).__name__)
def test_stage_configs_are_frozen(config):
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.out = "elsewhere"


# ------------------------------------------------------------------------ the jobs' CLI pair
def _resolve(module: str, argv: list[str]):
    import importlib

    job = importlib.import_module(f"jobs.{module}")
    parser = job.build_parser()
    args = parser.parse_args(argv)
    if module == "demo":
        return job.resolve_size(args, parser)
    return job.resolve_config(args, parser)


def test_train_resolves_preset_then_smoke_then_flags_then_set():
    base = ["--data", "d", "--run-name", "r"]
    config = _resolve("train", [*base, "--preset", "demo", "--smoke", "--batch-size", "4",
                                "--checkpoint-every", "3", "--set", "gan.lr_g=1e-3"])
    assert (config.gan.lr_g, config.gan.lr_d) == (1e-3, 2e-4)  # --set over the preset, the rest demo's
    assert (config.model.ngf, config.train.max_steps, config.train.batch_size) == (16, 2, 4)  # smoke, flag
    assert config.train.checkpoint_every_images == 12  # steps x the resolved batch
    assert _resolve("train", [*base, "--epochs", "3", "--set", "train.epochs=5"]).train.epochs == 5
    # --set has the last word over the step flags too (they become images after the others)
    assert _resolve("train", [*base, "--checkpoint-every", "2",
                              "--set", "train.checkpoint_every_images=999"]).train.checkpoint_every_images == 999
    assert _resolve("train", base) == load_config("paper")


def test_classifier_flags_override_the_file_and_set_overrides_both(tmp_path):
    path = tmp_path / "classifier.yaml"
    path.write_text("arch: small\nlr: 0.01\nepochs: 4\n")
    base = ["--real", "r", "--out", "o", "--config", str(path)]
    config = _resolve("train_classifier", [*base, "--lr", "0.02"])
    assert (config.arch, config.lr, config.epochs, config.resolution) == ("small", 0.02, 4, 256)
    assert _resolve("train_classifier", [*base, "--lr", "0.02", "--set", "lr=0.03"]).lr == 0.03
    smoke = _resolve("train_classifier", ["--real", "r", "--out", "o", "--smoke", "--epochs", "2"])
    assert (smoke.arch, smoke.epochs) == ("tiny", 2)


def test_utility_sets_classifier_fields_by_section():
    config = _resolve("evaluate_utility", ["--real", "r", "--out", "o", "--synthetic", "s", "--preset", "demo",
                                           "--lr", "0.1", "--set", "classifier.epochs=3", "--split", "val"])
    assert (config.classifier.arch, config.classifier.lr, config.classifier.epochs) == ("small", 0.1, 3)
    assert (config.split, config.classifier.synthetic, config.classifier.out) == ("val", ("s",), "o")


def test_stage_jobs_take_a_file_under_their_flags(tmp_path):
    path = tmp_path / "stage.json"
    path.write_text(json.dumps({"seed": 7, "batch_size": 16, "workers": 2}))
    config = _resolve("synthesize", ["--generator", "g", "--target-per-class", "5", "--out", "o",
                                     "--config", str(path), "--batch-size", "8", "--set", "workers=3"])
    assert (config.seed, config.batch_size, config.workers, config.rows_per_file) == (7, 8, 3, 1000)
    path.write_text("val_fraction: 0.3\nresolution: 64\n")
    ingest = _resolve("ingest_nih", ["--nih-root", "n", "--out", "o", "--config", str(path), "--resolution", "32"])
    assert (ingest.val_fraction, ingest.resolution, ingest.rows_per_file) == (0.3, 32, 1000)
    path.write_text("batch_rows: 128\nsplit: val\n")
    fdd = _resolve("fdd", ["--real", "r", "--synthetic", "a=u", "--classifier", "c", "--out", "o",
                           "--config", str(path), "--smoke", "--set", "split=train"])
    assert (fdd.batch_rows, fdd.split, fdd.max_per_class, fdd.synthetic) == (128, "train", 8, (("a", "u"),))


def test_report_takes_a_file_under_its_flags(tmp_path, capsys):
    path = tmp_path / "report.yaml"
    path.write_text("title: From a file\nsynthetic: [[proposed, s/p], [cdcgan, s/c]]\nsamples_per_class: 2\n")
    config = _resolve("report", ["--out", "o", "--config", str(path), "--samples-per-class", "3"])
    assert config.synthetic == (("proposed", "s/p"), ("cdcgan", "s/c"))  # the file's sets, in order
    assert (config.title, config.samples_per_class, config.strict) == ("From a file", 3, False)
    replaced = _resolve("report", ["--out", "o", "--config", str(path), "--synthetic", "x=s/x"])
    assert replaced.synthetic == (("x", "s/x"),)
    with pytest.raises(SystemExit) as exit_info:  # no input at all, as before: a usage error
        _resolve("report", ["--out", "o"])
    assert exit_info.value.code == 2 and "give at least one input" in capsys.readouterr().err


def test_make_phantoms_takes_a_file_under_its_flags(tmp_path, capsys):
    import jobs.make_phantoms as make_phantoms

    path = tmp_path / "phantoms.yaml"
    path.write_text("num_images: 40\nresolution: 64\nmin_per_class: 2\n")
    args = make_phantoms.parse_args(["--out", "o", "--config", str(path), "--resolution", "32",
                                     "--set", "seed=5"])
    assert (args.phantoms.num_images, args.phantoms.resolution, args.phantoms.min_per_class,
            args.phantoms.seed) == (40, 32, 2, 5)
    with pytest.raises(SystemExit) as exit_info:  # neither a count nor metadata: usage error
        make_phantoms.parse_args(["--out", "o"])
    assert exit_info.value.code == 2 and "--num-images is required" in capsys.readouterr().err


def test_demo_sizes_come_from_the_presets_and_set():
    import jobs.demo as demo

    assert _resolve("demo", []) == demo.FULL and _resolve("demo", ["--quick"]) == demo.QUICK
    size = _resolve("demo", ["--quick", "--set", "gan_steps=12", "--set", "classifier=[--preset, demo]"])
    assert (size.gan_steps, size.classifier, size.images) == (12, ("--preset", "demo"), demo.QUICK.images)


JOB_ARGV = {
    "train": ["--data", "d", "--run-name", "r"],
    "train_classifier": ["--real", "r", "--out", "o"],
    "evaluate_utility": ["--real", "r", "--out", "o", "--synthetic", "s"],
    "demo": [],
    "synthesize": ["--generator", "g", "--target-per-class", "5", "--out", "o"],
    "ingest_nih": ["--nih-root", "n", "--out", "o"],
    "fdd": ["--real", "r", "--synthetic", "a=u", "--classifier", "c", "--out", "o"],
    "report": ["--out", "o", "--real", "r"],
}


@pytest.mark.parametrize("module", sorted(JOB_ARGV))
def test_a_bad_key_is_a_usage_error(module, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("no_such_field: 1\n")
    for extra, named in ((["--set", "no_such_key=1"], "no_such_key"), (["--config", str(path)], "no_such_field")):
        with pytest.raises(SystemExit) as exit_info:
            _resolve(module, [*JOB_ARGV[module], *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "usage:" in err and named in err


@pytest.mark.parametrize("module", ["train", "train_classifier", "evaluate_utility", "demo"])
def test_an_unknown_preset_is_a_usage_error(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _resolve(module, [*JOB_ARGV[module], "--preset", "nope"])
    assert exit_info.value.code == 2 and "unknown preset 'nope'" in capsys.readouterr().err
