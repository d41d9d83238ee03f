"""LSGAN losses, the GAN step object (phases, EMA, tau, checkpoints) and a short learning run."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import cxrfactory.gan.step as gan_module
from cxrfactory.gan.config import GANConfig, ModelConfig
from cxrfactory.models import build_discriminators, build_generator
from cxrfactory.gan.step import GANTrainer, Phase, ema_beta, phases_for, tau_schedule
from cxrfactory.gan.losses import lsgan_d_loss, lsgan_g_loss, multiscale_d_loss, multiscale_g_loss, total

torch.set_num_threads(1)

TINY = ModelConfig(
    classes=("Normal", "Cardiomegaly", "Effusion"), z_dim=8, ngf=16, ndf=8, num_branches=2,
    base_resolution=8, num_residual=1,
)


def _trainer(model: ModelConfig = TINY, seed: int = 0, **gan) -> GANTrainer:
    torch.manual_seed(seed)
    config = GANConfig(**{"lr_g": 1e-3, "lr_d": 1e-3, **gan})
    return GANTrainer(build_generator(model), build_discriminators(model), config, seed=seed)


def _batch(n: int = 6, model: ModelConfig = TINY, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = model.resolution
    labels = torch.arange(n) % model.num_classes
    return torch.rand(n, 1, r, r, generator=g) * 2 - 1, F.one_hot(labels, model.num_classes).float()


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# --------------------------------------------------------------------------------- losses
def test_lsgan_losses_against_hand_computation():
    real = torch.tensor([0.5, 1.5])
    fake = torch.tensor([0.2, -0.4])
    # eq. 5, a=0, b=1: 1/2 * mean((0.5-1)^2, (1.5-1)^2) + 1/2 * mean(0.2^2, 0.4^2) = 0.125 + 0.05
    assert lsgan_d_loss(real, fake).item() == pytest.approx(0.175)
    # a=-1, b=1 (Mao et al.'s other choice): 0.125 + 1/2 * mean(1.2^2, 0.6^2) = 0.125 + 0.45
    assert lsgan_d_loss(real, fake, a=-1.0, b=1.0).item() == pytest.approx(0.575)
    # eq. 6, d=1: 1/2 * mean((0.2-1)^2, (-0.4-1)^2) = 1/2 * (0.64 + 1.96) / 2
    assert lsgan_g_loss(fake).item() == pytest.approx(0.65)
    assert lsgan_g_loss(fake, d=0.0).item() == pytest.approx(0.05)
    assert lsgan_g_loss(fake.bfloat16()).dtype == torch.float32


def test_multiscale_losses_sum_both_heads_over_branches():
    t = torch.tensor
    real = [(t([1.0]), t([0.0])), (t([2.0]), t([1.0]))]
    fake = [(t([0.0]), t([1.0])), (t([1.0]), t([-1.0]))]
    d = multiscale_d_loss(real, fake)
    # branch 0: uncond 0 + 0, cond 0.5 + 0.5; branch 1: uncond 0.5 + 0.5, cond 0 + 0.5
    assert [(x.uncond.item(), x.cond.item()) for x in d] == [(0.0, 1.0), (1.0, 0.5)]
    assert total(d).item() == pytest.approx(2.5)
    g = multiscale_g_loss(fake)
    # branch 0: 0.5 + 0; branch 1: 0 + 1/2 * 4
    assert total(g).item() == pytest.approx(2.5)
    with pytest.raises(ValueError):
        multiscale_d_loss(real, fake[:1])


def test_mismatched_scores_add_their_weighted_term_to_the_conditional_head_only():
    t = torch.tensor
    real = [(t([1.0]), t([1.0]))]
    fake = [(t([0.0]), t([0.0]))]
    wrong = [t([1.0, 0.0])]  # D calls one mismatched pair real (error 1), the other fake (0)
    plain = multiscale_d_loss(real, fake)[0]
    with_wrong = multiscale_d_loss(real, fake, mismatched=wrong, mismatch_weight=2.0)[0]
    assert with_wrong.uncond.item() == plain.uncond.item() == 0.0
    # + w/2 * mean((1-0)^2, (0-0)^2) = 2/2 * 0.5
    assert with_wrong.cond.item() == pytest.approx(plain.cond.item() + 0.5)
    assert multiscale_d_loss(real, fake, mismatched=wrong, mismatch_weight=0.0)[0].cond.item() == plain.cond.item()
    with pytest.raises(ValueError, match="mismatched"):
        multiscale_d_loss(real, fake, mismatched=wrong * 2, mismatch_weight=1.0)


def test_discriminator_scores_mismatched_pairs_as_its_own_conditional_head_would():
    torch.manual_seed(0)
    d = build_discriminators(TINY)[1].eval()
    x, c = _batch(4)
    wrong = F.one_hot(torch.tensor([2, 0]), TINY.num_classes).float()
    uncond, cond = d(x, c, mismatched=wrong)
    assert uncond.shape == (4,) and cond.shape == (6,)
    alone_uncond, alone_cond = d(x, c)
    torch.testing.assert_close(uncond, alone_uncond)
    torch.testing.assert_close(cond[:4], alone_cond)
    torch.testing.assert_close(cond[4:], d(x[:2], wrong)[1])
    with pytest.raises(AssertionError, match="mismatched"):
        d(x, c, mismatched=torch.zeros(5, TINY.num_classes))


def test_mismatched_conditions_are_always_another_class_and_reach_every_other_class():
    trainer = _trainer(mismatch_weight=1.0)
    c = F.one_hot(torch.arange(300) % TINY.num_classes, TINY.num_classes).float()
    wrong = trainer._mismatched(c)
    assert wrong.sum(dim=1).eq(1).all() and not (wrong.argmax(1) == c.argmax(1)).any()
    for k in range(TINY.num_classes):
        assert set(wrong[c.argmax(1) == k].argmax(1).tolist()) == set(range(TINY.num_classes)) - {k}


def test_mismatch_weight_raises_the_d_conditional_term_it_reports():
    x, c = _batch()
    with_wrong = _trainer(mismatch_weight=1.0, d_steps_per_g=5).train_step(x, c)
    plain = _trainer(mismatch_weight=0.0, d_steps_per_g=5).train_step(x, c)
    # Same seeds, same networks: the unconditional terms agree, the conditional ones gain a
    # non-negative term (real images under a wrong class, pushed towards a = 0).
    assert with_wrong["d_uncond_b1"] == pytest.approx(plain["d_uncond_b1"], rel=1e-5)
    assert with_wrong["d_cond_b1"] > plain["d_cond_b1"]
    with pytest.raises(ValueError, match="mismatch_weight"):
        GANConfig(mismatch_weight=-0.5)


# ------------------------------------------------------------------------------ schedules
def test_tau_schedule_is_the_papers():
    taus = [tau_schedule(e) for e in range(0, 60)]
    assert taus[:5] == [0.0] * 5 and taus[5:10] == [0.1] * 5
    assert taus[19] == pytest.approx(0.3)  # the paper's 20 epochs end at tau = 0.3
    assert taus[49] == pytest.approx(0.9) and taus[50:] == [1.0] * 10
    assert tau_schedule(3, step=0.5, every=1, max=1.0) == 1.0
    with pytest.raises(ValueError):
        tau_schedule(-1)


def test_set_epoch_sets_tau_on_g_and_g_ema():
    trainer = _trainer(tau_step=0.25, tau_every_epochs=2)
    assert trainer.set_epoch(5) == 0.5
    assert trainer.G.tau == 0.5 and trainer.G_ema.tau == 0.5
    assert trainer.train_step(*_batch())["tau"] == 0.5


def test_phases_run_d_every_batch_and_g_every_kth():
    assert phases_for(GANConfig()) == [Phase("D", 1), Phase("G", 5)]
    trainer = _trainer(d_steps_per_g=3)
    ran_g = ["g_loss" in trainer.train_step(*_batch(seed=i)) for i in range(7)]
    assert ran_g == [False, False, True, False, False, True, False]
    assert (trainer.d_steps, trainer.g_steps, trainer.images_seen) == (7, 2, 42)


def test_metrics_name_every_branch_and_head():
    trainer = _trainer(d_steps_per_g=1)
    m = trainer.train_step(*_batch())
    for who in ("d", "g"):
        for i in range(2):
            assert m[f"{who}_loss_b{i}"] == pytest.approx(m[f"{who}_uncond_b{i}"] + m[f"{who}_cond_b{i}"], rel=1e-5)
        assert m[f"{who}_loss"] == pytest.approx(m[f"{who}_loss_b0"] + m[f"{who}_loss_b1"], rel=1e-5)
    assert all(math.isfinite(v) for v in m.values())


# ---------------------------------------------------------------------------- the steps
def test_d_step_moves_only_d_and_g_step_only_g():
    trainer = _trainer()
    real, c = _batch()
    g0, d0 = _flat(trainer.G), torch.cat([_flat(d) for d in trainer.Ds])
    trainer.d_step(real, c)
    g1, d1 = _flat(trainer.G), torch.cat([_flat(d) for d in trainer.Ds])
    assert torch.equal(g0, g1) and not torch.equal(d0, d1)
    trainer.g_step(c)
    g2, d2 = _flat(trainer.G), torch.cat([_flat(d) for d in trainer.Ds])
    assert not torch.equal(g1, g2) and torch.equal(d1, d2)
    assert all(p.requires_grad for d in trainer.Ds for p in d.parameters())  # unfrozen again


def test_real_pyramid_is_built_from_the_top_resolution():
    trainer = _trainer()
    real, c = _batch()
    reals, _ = trainer._prepare(real, c)
    assert [x.shape[-1] for x in reals] == [8, 16]
    assert torch.allclose(reals[0], F.avg_pool2d(real, 2))  # area = mean of 2x2 blocks
    with pytest.raises(ValueError, match="px"):
        trainer.d_step([real, real], c)
    with pytest.raises(ValueError, match="one-hot"):
        trainer.d_step(real, c[:, :2])


def test_ema_update_against_hand_computation():
    trainer = _trainer(ema_half_life_images=30.0, ema_rampup=None)
    real, c = _batch()
    ema_before = _flat(trainer.G_ema)
    trainer.d_step(real, c)  # 6 images seen
    trainer.g_step(c)
    beta = 0.5 ** (6 / 30.0)
    assert ema_beta(6, 6, 30.0, None) == pytest.approx(beta)
    expected = beta * ema_before + (1 - beta) * _flat(trainer.G)
    assert torch.allclose(_flat(trainer.G_ema), expected, atol=1e-6)
    running = [n for n, _ in trainer.G_ema.named_buffers() if n.endswith("running_mean")][0]
    assert torch.equal(dict(trainer.G_ema.named_buffers())[running], dict(trainer.G.named_buffers())[running])
    assert not trainer.G_ema.training


def test_ema_rampup_and_off():
    assert ema_beta(16, 100, 10_000.0, 0.05) == pytest.approx(0.5 ** (16 / 5.0))  # half-life capped at 5 images
    assert ema_beta(16, 10**6, 10_000.0, 0.05) == pytest.approx(0.5 ** (16 / 10_000))
    assert ema_beta(16, 0, 10_000.0, 0.05) == 0.0  # nothing seen yet: copy G
    trainer = _trainer(ema_half_life_images=0.0)
    real, c = _batch()
    trainer.d_step(real, c)
    trainer.g_step(c)
    assert torch.equal(_flat(trainer.G_ema), _flat(trainer.G))


def _batchnorm_inputs(net: torch.nn.Module, images: int, batch_size: int, seed: int) -> dict[str, list]:
    """Per BatchNorm, the per-channel mean and unbiased variance of its input in each of the
    train-mode batches standing statistics draw (the same noise and conditions), by hooks."""
    seen: dict[str, list] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            def record(module, inputs, output, name=name):
                x = inputs[0].transpose(0, 1).flatten(1)  # (C, everything else)
                seen.setdefault(name, []).append((x.mean(1), x.var(1, unbiased=True)))
            hooks.append(m.register_forward_hook(record))
    rng = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for b in range(images // batch_size):
            labels = torch.arange(b * batch_size, (b + 1) * batch_size) % net.num_classes
            net(torch.randn(batch_size, net.z_dim, generator=rng), F.one_hot(labels, net.num_classes).float())
    for h in hooks:
        h.remove()
    return seen


def test_standing_statistics_are_the_average_of_the_generators_own_batch_statistics():
    from cxrfactory.models.sampling import standing_statistics

    torch.manual_seed(0)
    net = build_generator(TINY).eval()
    reference = build_generator(TINY)
    reference.load_state_dict(net.state_dict())
    expected = _batchnorm_inputs(reference, 48, 16, seed=5)
    standing_statistics(net, images=48, batch_size=16, seed=5)
    assert not net.training and len(expected) >= 3
    modules = dict(net.named_modules())
    for name, stats in expected.items():
        bn = modules[name]
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
        assert torch.allclose(bn.running_mean, torch.stack([m for m, _ in stats]).mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var, torch.stack([v for _, v in stats]).mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="batches of >= 2"):
        standing_statistics(net, images=1, batch_size=1)


@pytest.mark.parametrize("mode", ["copy", "standing"])
def test_g_ema_batchnorm_statistics_are_its_own_only_when_standing(mode):
    trainer = _trainer(ema_batchnorm=mode, standing_images=64, ema_half_life_images=30.0, ema_rampup=None,
                       d_steps_per_g=1)
    for i in range(4):
        trainer.train_step(*_batch(seed=i))
    noise_state = trainer.noise.get_state()
    images = trainer.sample(_batch()[1], z=torch.zeros(6, TINY.z_dim))[-1]
    assert torch.equal(trainer.noise.get_state(), noise_state)  # training's noise stream untouched
    ema, live = dict(trainer.G_ema.named_buffers()), dict(trainer.G.named_buffers())
    means = [n for n in ema if n.endswith("running_mean")]
    same = [torch.equal(ema[n], live[n]) for n in means]
    if mode == "copy":
        assert all(same)
    else:
        assert not any(same)
        expected = _batchnorm_inputs(copy.deepcopy(trainer.G_ema), 64, 64, seed=0)
        for n in means:
            module = n.removesuffix(".running_mean")
            assert torch.allclose(ema[n], expected[module][0][0], atol=1e-5)
        # Remade only after G_ema changed: a second sample gives the same images.
        assert torch.equal(trainer.sample(_batch()[1], z=torch.zeros(6, TINY.z_dim))[-1], images)
    with pytest.raises(ValueError, match="ema_batchnorm"):
        GANConfig(ema_batchnorm="average")


@pytest.mark.parametrize("norm", ["batchnorm", "conditional"])
def test_g_ema_of_a_sync_batchnorm_generator_is_local_with_the_same_state(norm):
    """Several GPU workers train G with SyncBatchNorm; G_ema, sampled on one rank, must not
    wait for the others, and its state dict must load into a plain generator (the artifact)."""
    from torch import nn

    model = ModelConfig(**{**TINY.__dict__, "generator_norm": norm})
    torch.manual_seed(0)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(build_generator(model))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    trainer = GANTrainer(synced, build_discriminators(model), GANConfig(d_steps_per_g=1, ema_half_life_images=0),
                         seed=0)
    for i in range(2):  # outside a process group SyncBatchNorm computes what BatchNorm does
        trainer.train_step(*_batch(seed=i))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in trainer.G_ema.modules())
    plain = build_generator(model).eval()
    plain.load_state_dict(trainer.G_ema.state_dict())  # strict: same names, same shapes
    c = _batch()[1]
    z = torch.randn(6, model.z_dim)
    with torch.no_grad():
        torch.testing.assert_close(trainer.sample(c, z=z)[-1], plain(z, c)[-1])
    trainer.G_ema.train()
    with torch.no_grad():  # and in train mode (standing statistics) it normalises by the batch
        trainer.G_ema(z, c)


def test_sync_batchnorm_is_on_for_several_gpu_workers_only():
    from cxrfactory.gan.config import TrainConfig

    assert TrainConfig(use_gpu=True, num_workers=4).synced_batchnorm
    assert not TrainConfig(use_gpu=True, num_workers=4, sync_batchnorm=False).synced_batchnorm
    assert not TrainConfig(use_gpu=True, num_workers=1).synced_batchnorm
    assert not TrainConfig(use_gpu=False, num_workers=2, batch_size=16).synced_batchnorm


def test_checkpoint_resumes_bit_for_bit_with_weights_only_load():
    model = TINY
    a = _trainer(d_steps_per_g=2)
    a.set_epoch(7)
    for i in range(3):
        a.train_step(*_batch(seed=i))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # no pickled code in a checkpoint
    b = _trainer(model, seed=123, d_steps_per_g=2)  # different init and noise seed
    b.load_state_dict(state)
    assert (b.d_steps, b.g_steps, b.epoch, b.tau) == (3, 1, 7, a.tau)
    for i in range(3, 6):
        ma, mb = a.train_step(*_batch(seed=i)), b.train_step(*_batch(seed=i))
        assert ma == mb
    assert torch.equal(_flat(a.G_ema), _flat(b.G_ema))


def test_cdcgan_trains_through_the_same_step_object():
    model = ModelConfig(arch="cdcgan", classes=("Normal", "Mass"), z_dim=8, ngf=8, ndf=8, base_resolution=8, num_branches=2)
    trainer = _trainer(model, d_steps_per_g=1)
    m = trainer.train_step(*_batch(4, model))
    assert trainer.resolutions == [16] and {"d_loss_b0", "g_loss_b0"} <= set(m)
    assert "d_loss_b1" not in m


def test_collapse_warning_fires_once(monkeypatch):
    monkeypatch.setattr(gan_module, "_COLLAPSE_WARMUP_STEPS", 2)
    trainer = _trainer(collapse_threshold=1e9)  # every loss is "collapsed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flags = [trainer.train_step(*_batch(seed=i))["d_collapsed"] for i in range(4)]
    assert flags == [0.0, 1.0, 1.0, 1.0]
    assert sum("collapsed" in str(w.message) for w in caught) == 1
    assert _trainer(collapse_threshold=0.0).train_step(*_batch())["d_collapsed"] == 0.0


def test_mismatched_discriminator_count_is_an_error():
    G = build_generator(TINY)
    with pytest.raises(ValueError, match="1 discriminators for 2 generator outputs"):
        GANTrainer(G, build_discriminators(TINY)[:1], GANConfig())


def test_bf16_is_ignored_on_cpu():
    """bf16 autocasts on CUDA only: on a CPU the same seeds give bit-identical steps, weights
    and samples. CPU autocast to bfloat16 would change every one of them."""
    runs = []
    for bf16 in (False, True):
        trainer = _trainer(bf16=bf16)
        metrics = [trainer.train_step(*_batch(seed=i)) for i in range(2)]
        runs.append((metrics, _flat(trainer.G), _flat(trainer.Ds[0]), trainer.sample(_batch()[1])))
    (m32, g32, d32, s32), (m16, g16, d16, s16) = runs
    assert m16 == m32
    assert torch.equal(g16, g32) and torch.equal(d16, d32)
    assert all(torch.equal(a, b) for a, b in zip(s16, s32))


# ------------------------------------------------------------------------------ learning
def _discs(labels: torch.Tensor, gen: torch.Generator, side: int = 16) -> torch.Tensor:
    """Stand-in 'X-rays': a bright disc on black, small for class 0, large for class 1
    (radius 2.5 vs 5 px, +-0.5 px), centre jittered by +-1 px, mild noise; values in [-1, 1]."""
    n = len(labels)
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    radius = torch.where(labels == 1, 5.0, 2.5) + torch.rand(n, generator=gen) - 0.5
    cx = side / 2 + (torch.rand(n, generator=gen) - 0.5) * 2
    cy = side / 2 + (torch.rand(n, generator=gen) - 0.5) * 2
    dist = ((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2).sqrt()
    image = torch.sigmoid((radius[:, None, None] - dist) * 3) * 2 - 1
    return (image + 0.05 * torch.randn(image.shape, generator=gen)).clamp(-1, 1)[:, None]


def _bright_fraction(images: torch.Tensor) -> torch.Tensor:
    return (images > 0).float().mean(dim=(1, 2, 3))


def test_short_run_learns_the_condition():
    """A seeded CPU run (demo optimiser: lr 2e-4, 1 D step per G step) on two classes whose only
    difference is the disc size. The generated size must follow the condition: a threshold
    halfway between the real classes' bright fractions must classify the G_ema samples. An
    unconditional generator would put both classes on one side (accuracy about 0.5)."""
    model = ModelConfig(
        classes=("Normal", "Cardiomegaly"), z_dim=16, ngf=16, ndf=16, num_branches=1,
        base_resolution=16, num_residual=1, attention=False,
    )
    trainer = _trainer(model, seed=0, lr_g=2e-4, lr_d=2e-4, d_steps_per_g=1, ema_half_life_images=500.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        labels = torch.randint(0, 2, (32,), generator=gen)
        trainer.train_step(_discs(labels, gen), F.one_hot(labels, 2).float())
    labels = torch.arange(128) % 2
    fake = _bright_fraction(trainer.sample(F.one_hot(labels, 2).float())[-1])
    real = _bright_fraction(_discs(labels, gen))
    small, large = real[labels == 0].mean(), real[labels == 1].mean()  # ~0.08 and ~0.31
    accuracy = ((fake > (small + large) / 2).long() == labels).float().mean().item()
    assert accuracy >= 0.9
    assert fake[labels == 0].mean() == pytest.approx(small.item(), abs=0.05)
    assert fake[labels == 1].mean() == pytest.approx(large.item(), abs=0.05)
