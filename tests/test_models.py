"""Config, generator, discriminators, cDCGAN baseline, sampling: shapes, SN, conditioning."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from cxrfactory.gan.config import (
    Config,
    ConfigError,
    GANConfig,
    ModelConfig,
    available_presets,
    load_config,
    parse_overrides,
)
from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.models import (
    build_discriminators,
    build_generator,
    count_parameters,
    generate,
    noise_for_seeds,
    to_uint8,
)
from cxrfactory.models.layers import ConditionalBatchNorm, SelfAttention

torch.set_num_threads(1)


def _onehot(indices, k: int = 9) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(indices), k).float()


def _tiny(**model) -> Config:
    """demo-like widths, cheap enough for many parametrised cases."""
    base = {"model.ngf": 16, "model.ndf": 8, "model.z_dim": 8, "model.base_resolution": 8}
    return load_config("demo").with_overrides({**base, **{f"model.{k}": v for k, v in model.items()}})


# ------------------------------------------------------------------------------------ config
def test_presets_load_and_paper_matches_the_paper():
    assert {"paper", "demo"} <= set(available_presets())
    paper = load_config("paper")
    assert paper.resolutions == [64, 128, 256]
    assert (paper.model.ngf, paper.model.channels, paper.model.classes) == (64, 1, DEFAULT_CLASSES)
    g = paper.gan
    assert (g.lr_g, g.lr_d, g.betas, g.d_steps_per_g) == (2e-5, 2e-5, (0.5, 0.999), 5)
    assert (g.loss_a, g.loss_b, g.loss_d, g.tau_step, g.tau_every_epochs, g.tau_max) == (0, 1, 1, 0.1, 5, 1.0)
    assert (paper.train.epochs, paper.train.batch_size) == (20, 16)
    # Where the paper states nothing else: no sampler, and attention as x + tau * o.
    assert (paper.train.class_balanced, paper.model.attention_gain) == (False, False)
    # The label as printed: concatenated to z and to D's last features; BatchNorm as StackGAN++'s.
    m = paper.model
    assert (m.generator_norm, m.discriminator_condition, m.init) == ("batchnorm", "concat", "pytorch")
    assert paper.gan.mismatch_weight == 0.0 and paper.train.synced_batchnorm is False
    demo = load_config("demo")
    assert demo.resolutions == [16, 32, 64]
    assert (demo.gan.lr_g, demo.gan.d_steps_per_g) == (2e-4, 1)


def test_dataclass_defaults_are_the_paper_preset():
    """The GPU benchmark falls back to the defaults where PyYAML is missing."""
    paper = load_config("paper")
    assert (paper.model, paper.gan) == (ModelConfig(), GANConfig())


def test_config_round_trips_through_json():
    cfg = load_config("demo").with_overrides({"model.classes": ["Cardiomegaly", "Normal"], "gan.betas": [0.0, 0.99]})
    assert cfg.model.classes == ("Normal", "Cardiomegaly")  # vocabulary order is the contract
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.gan.betas, tuple)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="presets: .*demo.*paper"):
        load_config("papr")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"ngff": 3}}, r"unknown key\(s\) model.ngff"),
        ({"modle": {}}, r"unknown key\(s\) modle"),
        ({"model": {"ngf": "wide"}}, "model.ngf must be an integer"),
        ({"gan": {"bf16": 1}}, "gan.bf16 must be true or false"),
        ({"model": {"base_resolution": 48}}, "power of two"),
        ({"model": {"classes": ["Normal", "Flu"]}}, "unknown class"),
        ({"model": {"arch": "biggan"}}, "model.arch must be one of"),
        ({"train": {"batch_size": 10, "num_workers": 4}}, "divisible"),
        ({"gan": {"betas": [0.5]}}, "2 items"),
        ({"model": {"generator_norm": "layernorm"}}, "model.generator_norm must be one of batchnorm, conditional"),
        ({"model": {"discriminator_condition": "acgan"}}, "model.discriminator_condition must be one of"),
        ({"model": {"init": "xavier"}}, "model.init must be one of pytorch, stackgan"),
        ({"train": {"sync_batchnorm": True, "num_workers": 2}}, "sync_batchnorm needs GPU workers"),
    ],
)
def test_config_rejects_bad_input_with_a_clear_message(data, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(data)


def test_overrides_are_dotted_and_typed():
    cfg = Config().with_overrides(parse_overrides(["model.ngf=32", "gan.lr_g=1e-4", "train.max_steps=null"]))
    assert (cfg.model.ngf, cfg.gan.lr_g, cfg.train.max_steps) == (32, 1e-4, None)
    assert Config().with_overrides(**{"gan.d_steps_per_g": 2}).gan.d_steps_per_g == 2
    with pytest.raises(ConfigError, match="unknown field 'gan.lr'"):
        Config().with_overrides({"gan.lr": 1.0})
    with pytest.raises(ConfigError, match="section.field"):
        parse_overrides(["ngf"])


# ------------------------------------------------------------------------ shapes, branches
@pytest.fixture(scope="module")
def paper_models():
    """The paper preset's G and Ds, built once (94M discriminator parameters)."""
    torch.manual_seed(0)
    cfg = load_config("paper")
    return build_generator(cfg).eval(), build_discriminators(cfg)


@pytest.mark.parametrize("preset", ["paper", "demo"])
@pytest.mark.parametrize("branches", [1, 2, 3])
def test_every_branch_has_the_configured_shape(preset, branches, paper_models):
    torch.manual_seed(0)
    cfg = load_config(preset).with_overrides({"model.num_branches": branches})
    if preset == "paper" and branches == 3:
        G, Ds = paper_models
    else:
        G, Ds = build_generator(cfg).eval(), build_discriminators(cfg)
    c = _onehot([0, 2])
    with torch.no_grad():
        images = G(torch.randn(2, cfg.model.z_dim), c)
        scores = [D(x, c) for D, x in zip(Ds, images)]
    assert [tuple(x.shape) for x in images] == [(2, 1, r, r) for r in cfg.resolutions]
    assert len(Ds) == branches == len(cfg.resolutions)
    assert all(u.shape == (2,) and s.shape == (2,) for u, s in scores)
    assert all(float(x.abs().max()) <= 1.0 for x in images)  # tanh range
    assert all(torch.isfinite(torch.stack(s)).all() for s in scores)


def test_paper_widths_are_stackgan_plus_plus(paper_models):
    G, _ = paper_models
    assert G.first.init_channels == 1024  # ngf * 16 at 4x4
    assert [m[0].in_channels for m in G.to_image] == [64, 32, 16]
    assert G.first.attention.query.out_channels == 8  # C/8 for C = 64


def test_parameter_counts_of_the_paper_preset_are_stable(paper_models):
    G, Ds = paper_models
    # Regression guard for the architecture (see docs/model_card.md for the table).
    assert count_parameters(G) == 16_613_059  # no attention gain: the paper's x + tau * o
    assert [count_parameters(d) for d in Ds] == [5_172_162, 18_280_898, 70_712_770]


@pytest.mark.parametrize("preset", ["paper", "demo"])
def test_cdcgan_makes_the_top_resolution_in_one_network(preset):
    cfg = load_config(preset).with_overrides({"model.arch": "cdcgan"})
    G = build_generator(cfg).eval()
    with torch.no_grad():
        images = G(torch.randn(2, cfg.model.z_dim), _onehot([1, 5]))
    top = cfg.model.resolution
    assert [tuple(x.shape) for x in images] == [(2, 1, top, top)]
    assert cfg.resolutions == [top]  # so build_discriminators gives the one top-resolution D


# ------------------------------------------------------------------------ spectral norm
@pytest.mark.parametrize("preset", ["paper", "demo"])
def test_every_discriminator_weight_is_spectrally_normalised(preset, paper_models):
    for D in paper_models[1] if preset == "paper" else build_discriminators(preset):
        layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert layers, "a discriminator without conv layers"
        for m in layers:
            assert parametrize.is_parametrized(m, "weight"), m
            assert type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm"
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())


def test_d_step_with_a_real_and_a_fake_forward_under_spectral_norm():
    """Two forwards (real, fake) then one backward: the in-place power iteration must not break
    autograd on the pinned torch, and SN must bring every weight's top singular value to 1."""
    torch.manual_seed(0)
    cfg = _tiny()
    G, D = build_generator(cfg), build_discriminators(cfg)[-1]
    opt = torch.optim.Adam(D.parameters(), lr=1e-3)
    c = _onehot([0, 1, 2, 3])
    for _ in range(20):
        real = torch.rand(4, 1, D.resolution, D.resolution) * 2 - 1
        with torch.no_grad():
            fake = G(torch.randn(4, cfg.model.z_dim), c)[-1]
        ru, rc = D(real, c)
        fu, fc = D(fake, c)  # second forward: power iteration updates u, v in place again
        loss = ((ru - 1) ** 2).mean() + ((rc - 1) ** 2).mean() + (fu**2).mean() + (fc**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in D.parameters())
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for _ in range(30):  # with the weights fixed, let the power iteration converge
            for m in convs:
                m.weight
    D.eval()
    for m in convs:
        w = m.weight.detach().flatten(1)  # the normalised weight
        assert torch.linalg.matrix_norm(w, ord=2) == pytest.approx(1.0, abs=0.02)


# ------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("arch, norm, head", [
    ("stackgan", "batchnorm", "concat"), ("cdcgan", "batchnorm", "concat"),
    ("stackgan", "conditional", "projection"), ("cdcgan", "conditional", "projection"),
])
def test_the_condition_changes_every_output(arch, norm, head):
    torch.manual_seed(0)
    cfg = _tiny(arch=arch, generator_norm=norm, discriminator_condition=head)
    G = build_generator(cfg).eval()
    G.set_tau(1.0)
    z = torch.randn(3, cfg.model.z_dim).repeat(2, 1)
    with torch.no_grad():
        images = G(z, _onehot([0, 1, 2, 3, 4, 5]))
    for x in images:
        assert (x[:3] - x[3:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    D = build_discriminators(cfg)[-1]
    x = images[-1][:3].repeat(2, 1, 1, 1)
    with torch.no_grad():
        uncond, cond = D(x, _onehot([0, 1, 2, 3, 4, 5]))
    assert torch.equal(uncond[:3], uncond[3:])  # the unconditional head ignores c
    assert not torch.allclose(cond[:3], cond[3:])


def test_later_branches_see_the_condition_directly():
    """The condition is joined into branch 2: with branch-1 features fixed, c still matters."""
    torch.manual_seed(0)
    G = build_generator(_tiny(num_branches=2)).eval()
    h = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        a = G.later[0](h, _onehot([0, 0]))
        b = G.later[0](h, _onehot([4, 4]))
    assert not torch.allclose(a, b)


def test_conditional_batchnorm_is_batchnorm_at_first_and_per_class_gain_and_bias_after():
    torch.manual_seed(0)
    cbn = ConditionalBatchNorm(4, 3)
    x, c = torch.randn(6, 4, 5, 5), _onehot([0, 1, 2, 0, 1, 2], 3)
    plain = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(cbn(x, c), plain)  # gain 1, bias 0 for every class at the start
    with torch.no_grad():
        cbn.gain.weight.copy_(torch.randn(4, 3))
        cbn.bias.weight.copy_(torch.randn(4, 3))
    out = cbn(x, c)
    for i, k in enumerate([0, 1, 2, 0, 1, 2]):
        g, b = 1 + cbn.gain.weight[:, k], cbn.bias.weight[:, k]
        torch.testing.assert_close(out[i], plain[i] * g[:, None, None] + b[:, None, None])
    vec = ConditionalBatchNorm(4, 3, dims=1)  # the first branch's fc: (B, C) inputs
    assert vec(torch.randn(6, 4), c).shape == (6, 4)


def test_conditional_norm_puts_the_label_into_the_first_branch():
    """With plain BatchNorm the first branch sees c only in its input; with conditional
    BatchNorm the same latent gives other features under another label."""
    latent = torch.randn(4, 9 + 8)
    outputs = {}
    for norm in ("batchnorm", "conditional"):
        torch.manual_seed(0)
        G = build_generator(_tiny(generator_norm=norm, init="stackgan")).eval()
        with torch.no_grad():
            outputs[norm] = G.first(latent, _onehot([0, 0, 0, 0])), G.first(latent, _onehot([5, 5, 5, 5]))
    assert torch.equal(*outputs["batchnorm"])
    assert (outputs["conditional"][0] - outputs["conditional"][1]).abs().max() > 1e-4
    G = build_generator(_tiny(generator_norm="conditional"))
    plain = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert plain and all(not m.affine for m in plain)  # every BatchNorm is a conditional one's
    assert len(plain) == sum(isinstance(m, ConditionalBatchNorm) for m in G.modules())


def test_projection_head_is_psi_plus_the_class_embedding_times_the_pooled_features():
    torch.manual_seed(0)
    D = build_discriminators(_tiny(discriminator_condition="projection"))[-1].eval()
    assert not hasattr(D, "cond_join")
    x, c = torch.rand(5, 1, D.resolution, D.resolution) * 2 - 1, _onehot([0, 3, 3, 8, 1])
    with torch.no_grad():
        uncond, cond = D(x, c)
        h = D.encode(x)
        embedding = D.embed.weight.T  # (classes, features), spectrally normalised
        expected = D.cond_head(h).flatten() + (embedding[[0, 3, 3, 8, 1]] * h.sum(dim=(2, 3))).sum(1)
    torch.testing.assert_close(cond, expected)
    torch.testing.assert_close(uncond, D.uncond_head(h).flatten())


@pytest.mark.parametrize("arch", ["stackgan", "cdcgan"])
def test_stackgan_init_is_orthogonal_with_converged_spectral_norm(arch):
    torch.manual_seed(0)
    cfg = _tiny(arch=arch, init="stackgan", generator_norm="conditional")
    G, D = build_generator(cfg), build_discriminators(cfg)[-1].eval()
    convs = [m for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    for m in convs:
        w = m.weight.detach().flatten(1)
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(small, torch.eye(small.shape[0]), atol=1e-4, rtol=0)
    gains = torch.cat([m.gain.weight.detach().flatten() for m in G.modules() if isinstance(m, ConditionalBatchNorm)])
    assert abs(float(gains.mean())) < 0.005 and 0.015 < float(gains.std()) < 0.025
    sn = [m for m in D.modules() if parametrize.is_parametrized(m, "weight")]
    assert sn
    for m in sn:
        original = m.parametrizations.weight.original.detach().flatten(1)
        small = original @ original.T if original.shape[0] <= original.shape[1] else original.T @ original
        torch.testing.assert_close(small, torch.eye(small.shape[0]), atol=1e-4, rtol=0)
        # An orthogonal weight has spectral norm 1, so the normalised weight is the weight itself
        # only when the power iteration was restarted on it (stale u, v would misjudge sigma).
        torch.testing.assert_close(m.weight.detach().flatten(1), original, atol=2e-3, rtol=0)


def test_default_init_leaves_pytorchs_weights():
    torch.manual_seed(0)
    a = build_generator(_tiny()).state_dict()
    torch.manual_seed(0)
    c = build_generator(_tiny(init="stackgan")).state_dict()
    assert a.keys() == c.keys() and not any(torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))


# ---------------------------------------------------------------------------- attention
def test_self_attention_matches_the_naive_sagan_formula():
    torch.manual_seed(0)
    att = SelfAttention(16)
    att.tau.fill_(0.7)
    with torch.no_grad():
        att.gamma.fill_(0.5)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        q = att.query(x).flatten(2)  # (B, 2, N)
        k = att.key(x).flatten(2)
        v = att.value(x).flatten(2)  # (B, 16, N)
        beta = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N), rows: queries
        o = (v @ beta.transpose(1, 2)).view_as(x)
        expected = x + 0.7 * 0.5 * o
        assert torch.allclose(att(x), expected, atol=1e-5)
        att.tau.zero_()
        assert torch.equal(att(x), x)  # tau = 0: the block is the identity


def test_tau_is_saved_with_the_generator():
    G = build_generator(_tiny())
    G.set_tau(0.3)
    assert G.state_dict()["first.attention.tau"].item() == pytest.approx(0.3)
    other = build_generator(_tiny())
    other.load_state_dict(G.state_dict())
    assert other.tau == pytest.approx(0.3)


# ----------------------------------------------------------------------------- sampling
def test_noise_depends_only_on_the_seed():
    a = noise_for_seeds([7, 8, 9], 16)
    b = noise_for_seeds([9, 7], 16)
    assert a.dtype == torch.float32 and a.shape == (3, 16)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], a[1])


def test_to_uint8_maps_the_tanh_range():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6)
    # (x + 1) * 127.5, rounded half to even, clipped: -0.5 -> 63.75 -> 64, 0 -> 127.5 -> 128
    assert to_uint8(x).tolist() == [[[0, 64, 128, 255, 255, 255]]]


def test_generate_is_independent_of_batch_size_and_order():
    torch.manual_seed(0)
    G = build_generator(_tiny())
    G.set_tau(0.5)
    with torch.no_grad():  # move BatchNorm's running statistics off their initial values
        for _ in range(3):
            G(torch.randn(16, 8), _onehot(torch.arange(16) % 9))
    classes, seeds = [0, 3, 8, 3, 1], [11, 12, 13, 14, 15]
    full = generate(G, classes, seeds, batch_size=5)
    assert full.dtype == np.uint8 and full.shape == (5, 32, 32)
    assert G.training  # restored after sampling in eval mode
    assert np.array_equal(generate(G, classes, seeds, batch_size=2), full)
    assert np.array_equal(generate(G, classes[::-1], seeds[::-1], batch_size=3), full[::-1])
    assert not np.array_equal(full[1], full[3])  # same class, different seed
    with pytest.raises(ValueError, match="out of range"):
        generate(G, [9], [1])


# ------------------------------------------------------------------------------ layering
def test_models_and_the_gan_step_import_no_pipeline_dependencies():
    """docs/architecture.md: models and gan.step run on a bare torch box (the GPU benchmark relies on it)."""
    code = (
        "import sys, cxrfactory.models, cxrfactory.gan.step, cxrfactory.gan.losses\n"
        "bad = [m for m in ('ray', 'pandas', 'pyarrow', 'boto3', 'yaml') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
