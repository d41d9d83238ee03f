"""One GAN training step: discriminator and generator updates, EMA generator, tau schedule.

:class:`GANTrainer` owns the networks' optimisers, the loss terms and the backward calls; the
training loop (Ray Train or a plain script) only feeds it real batches::

    trainer = GANTrainer(G, Ds, config.gan, device=device)
    for epoch in range(config.train.epochs):
        trainer.set_epoch(epoch)                     # tau schedule
        for real, c in batches:                      # real in [-1, 1], c one-hot
            metrics = trainer.train_step(real, c)    # D step; G step every 5th call

The alternation is data (:class:`Phase`, as stylegan2-ada's ``phases``): ``D`` runs on every
real batch, ``G`` on every ``d_steps_per_g``-th, after that batch's D update. So one call
consumes one real minibatch, each D update sees a fresh one (the paper's "5 D updates per G
update"), and one "iteration" is ``d_steps_per_g`` calls. ``d_step`` and ``g_step`` are public
for loops that schedule differently.

DDP: ``G`` and each discriminator may come wrapped in their own ``DistributedDataParallel``
(``broadcast_buffers=False``: G's BatchNorm runs twice per iteration). In the G step the
discriminators are frozen and run under ``no_sync()`` so their reducers expect no gradients;
in the D step the fakes are made under ``no_grad``. Each D scores ``cat([real, fake])`` in one
forward: one spectral-norm power iteration and one DDP reduction per D step.

Imports no Ray.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cxrfactory.gan.config import GANConfig
from cxrfactory.models.layers import local_batchnorm
from cxrfactory.models.sampling import standing_statistics, unwrap
from cxrfactory.gan.losses import BranchLosses, multiscale_d_loss, multiscale_g_loss, total

#: Running-average weight of the D-loss collapse detector, and how many D steps it waits.
_COLLAPSE_MOMENTUM = 0.98
_COLLAPSE_WARMUP_STEPS = 100


def tau_schedule(epoch: int, step: float = 0.1, every: int = 5, max: float = 1.0) -> float:  # noqa: A002
    """The paper's attention scale: 0 for the first ``every`` epochs, then +``step``, capped."""
    if epoch < 0 or every < 1:
        raise ValueError(f"need epoch >= 0 and every >= 1, got epoch={epoch}, every={every}")
    return round(min(max, step * (epoch // every)), 10)


@dataclass(frozen=True)
class Phase:
    """One kind of update and how often it runs: on every ``interval``-th real batch."""

    name: str  # "D" or "G"
    interval: int


def phases_for(config: GANConfig) -> list[Phase]:
    """``[D every batch, G every d_steps_per_g-th batch]`` (G after that batch's D update)."""
    return [Phase("D", 1), Phase("G", config.d_steps_per_g)]


def ema_beta(batch_images: int, images_seen: int, half_life_images: float, rampup: float | None) -> float:
    """Per-update EMA decay for a half-life in images (StyleGAN); 0 when averaging is off."""
    half_life = half_life_images
    if rampup is not None:
        half_life = min(half_life, images_seen * rampup)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch_images / half_life)


def _no_sync(module: nn.Module):
    """DDP's ``no_sync()`` for a wrapped module, else a no-op context."""
    return module.no_sync() if hasattr(module, "no_sync") else nullcontext()


def _branch_metrics(prefix: str, losses: Sequence[BranchLosses]) -> dict[str, Tensor]:
    out = {f"{prefix}_loss": total(losses)}
    for i, t in enumerate(losses):
        out[f"{prefix}_loss_b{i}"] = t.total
        out[f"{prefix}_uncond_b{i}"] = t.uncond
        out[f"{prefix}_cond_b{i}"] = t.cond
    return out


class GANTrainer:
    """LSGAN training of a (multi-scale) generator against one discriminator per output.

    Args:
        generator: ``G(z, c)`` -> list of images low to high (optionally DDP-wrapped); it must
            expose ``z_dim``, ``num_classes``, ``resolutions`` and ``set_tau``.
        discriminators: one ``D(x, c)`` -> ``(uncond, cond)`` per generator output.
        config: optimisation settings (:class:`~cxrfactory.gan.config.GANConfig`).
        device: where the batches go; defaults to the generator's device.
        world_size: data-parallel replicas, so image counts (EMA, progress) are global.
        seed: seeds this replica's noise stream (give each DDP rank its own).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminators: Sequence[nn.Module],
        config: GANConfig,
        *,
        device: torch.device | str | None = None,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.G = generator
        self.Ds = list(discriminators)
        self.config = config
        net = unwrap(generator)
        self.z_dim: int = net.z_dim
        self.num_classes: int = net.num_classes
        self.resolutions: list[int] = list(net.resolutions)
        if len(self.Ds) != len(self.resolutions):
            raise ValueError(
                f"{len(self.Ds)} discriminators for {len(self.resolutions)} generator outputs "
                f"({self.resolutions})"
            )
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.world_size = world_size
        # Local BatchNorms: G_ema is sampled and given standing statistics on one rank, where
        # a SyncBatchNorm (train.sync_batchnorm) would wait for the other ranks.
        self.G_ema = local_batchnorm(copy.deepcopy(net)).eval().requires_grad_(False)
        d_params = [p for d in self.Ds for p in d.parameters()]
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr_g, betas=config.betas)
        self.opt_d = torch.optim.Adam(d_params, lr=config.lr_d, betas=config.betas)
        self.phases = phases_for(config)
        self._run: dict[str, Callable[[list[Tensor], Tensor], dict[str, Tensor]]] = {
            "D": self._d_update,
            "G": lambda real, c: self._g_update(c),
        }
        self.noise = torch.Generator(device=self.device)
        self.noise.manual_seed(seed)
        # Progress counters (global images, so a batch-size change keeps every schedule).
        self.batches = 0  # train_step calls
        self.d_steps = 0
        self.g_steps = 0
        self.images_seen = 0  # real images consumed by D steps, all replicas
        self.epoch = 0
        self.tau = 0.0
        self._standing_at: tuple[int, float] | None = None  # (g_steps, tau) of G_ema's standing statistics
        self._d_loss_avg = [float("nan")] * len(self.resolutions)
        self._warned_collapse = False
        self.set_epoch(0)

    # ---------------------------------------------------------------- schedule
    def tau_for(self, epoch: int) -> float:
        """The configured tau schedule at ``epoch``."""
        c = self.config
        return tau_schedule(epoch, step=c.tau_step, every=c.tau_every_epochs, max=c.tau_max)

    def set_epoch(self, epoch: int) -> float:
        """Enter ``epoch``: set tau on G and G_ema; returns tau."""
        self.epoch = epoch
        self.tau = self.tau_for(epoch)
        unwrap(self.G).set_tau(self.tau)
        self.G_ema.set_tau(self.tau)
        return self.tau

    # ------------------------------------------------------------- the steps
    def train_step(self, real: Tensor | Sequence[Tensor], c: Tensor) -> dict[str, float]:
        """Consume one real batch: run every phase due on it (D always; G every k-th).

        ``real``: ``(B, channels, R, R)`` at the top resolution (smaller branches get area
        down-sampled copies) or one tensor per branch, low to high; values in [-1, 1].
        ``c``: ``(B, num_classes)`` one-hot. Returns floats: D terms per branch (``d_loss``,
        ``d_loss_b{i}``, ``d_uncond_b{i}``, ``d_cond_b{i}``), the G terms likewise when the G
        step ran, ``tau`` and ``d_collapsed``.
        """
        reals, c = self._prepare(real, c)
        due = [p for p in self.phases if (self.batches + 1) % p.interval == 0]
        metrics: dict[str, Tensor] = {}
        for phase in due:
            metrics.update(self._run[phase.name](reals, c))
        self.batches += 1
        return self._finish(metrics)

    def d_step(self, real: Tensor | Sequence[Tensor], c: Tensor) -> dict[str, float]:
        """One discriminator update on this real batch and fresh fakes (detached)."""
        reals, c = self._prepare(real, c)
        return self._finish(self._d_update(reals, c))

    def g_step(self, c: Tensor) -> dict[str, float]:
        """One generator update for conditions ``c`` (plus the EMA update)."""
        _, c = self._prepare(None, c)
        return self._finish(self._g_update(c))

    def _autocast(self):
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _z(self, batch: int) -> Tensor:
        return torch.randn(batch, self.z_dim, device=self.device, generator=self.noise)

    def _mismatched(self, c: Tensor) -> Tensor:
        """For each one-hot row of ``c``, another class drawn uniformly from the rest."""
        k = self.num_classes
        shift = torch.randint(1, k, (c.shape[0],), device=self.device, generator=self.noise)
        return F.one_hot((c.argmax(dim=1) + shift) % k, k).to(c.dtype)

    def _d_update(self, reals: list[Tensor], c: Tensor) -> dict[str, Tensor]:
        batch = c.shape[0]
        for d in self.Ds:
            d.requires_grad_(True)
        with torch.no_grad(), self._autocast():
            fakes = self.G(self._z(batch), c)
        wrong = self._mismatched(c) if self.config.mismatch_weight > 0 else None
        real_scores, fake_scores, wrong_scores = [], [], []
        with self._autocast():
            for d, x_real, x_fake in zip(self.Ds, reals, fakes):
                # The mismatched conditions score the first `batch` rows again: the real images.
                uncond, cond = d(torch.cat([x_real, x_fake.to(x_real.dtype)]), torch.cat([c, c]), mismatched=wrong)
                real_scores.append((uncond[:batch], cond[:batch]))
                fake_scores.append((uncond[batch:], cond[batch:2 * batch]))
                wrong_scores.append(cond[2 * batch:])
        losses = multiscale_d_loss(
            real_scores, fake_scores, a=self.config.loss_a, b=self.config.loss_b,
            mismatched=wrong_scores if wrong is not None else None, mismatch_weight=self.config.mismatch_weight,
        )
        loss = total(losses)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        self.d_steps += 1
        self.images_seen += batch * self.world_size
        return _branch_metrics("d", losses)

    def _g_update(self, c: Tensor) -> dict[str, Tensor]:
        batch = c.shape[0]
        for d in self.Ds:
            d.requires_grad_(False)  # D is a fixed critic here; its reducers must not wait for grads
        fake_scores = []
        with self._autocast():
            fakes = self.G(self._z(batch), c)
            for d, x_fake in zip(self.Ds, fakes):
                with _no_sync(d):
                    fake_scores.append(d(x_fake, c))
        losses = multiscale_g_loss(fake_scores, d=self.config.loss_d)
        loss = total(losses)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        for d in self.Ds:
            d.requires_grad_(True)
        self.g_steps += 1
        self._update_ema(batch * self.world_size)
        return _branch_metrics("g", losses)

    @torch.no_grad()
    def _update_ema(self, batch_images: int) -> None:
        beta = ema_beta(batch_images, self.images_seen, self.config.ema_half_life_images, self.config.ema_rampup)
        net = unwrap(self.G)
        for p_ema, p in zip(self.G_ema.parameters(), net.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - beta)
        # BatchNorm running statistics and tau are copied, not averaged (StyleGAN does the same);
        # with ema_batchnorm="standing", prepare_ema() replaces the statistics before G_ema is used.
        for b_ema, b in zip(self.G_ema.buffers(), net.buffers()):
            b_ema.copy_(b)

    def _watch_collapse(self, values: list[float]) -> None:
        """Track each branch's D loss; warn once when one stays near zero (G gets no signal)."""
        if self.config.collapse_threshold <= 0:
            return
        m = _COLLAPSE_MOMENTUM
        self._d_loss_avg = [v if a != a else m * a + (1 - m) * v for a, v in zip(self._d_loss_avg, values)]
        if self.collapsed and not self._warned_collapse:
            self._warned_collapse = True
            warnings.warn(
                f"discriminator loss collapsed (running average per branch "
                f"{[round(a, 4) for a in self._d_loss_avg]} < {self.config.collapse_threshold}) "
                f"after {self.d_steps} D steps: the generator gets almost no gradient. "
                "Consider a higher lr or fewer D steps per G step (see docs/model_card.md, 'Calibration').",
                RuntimeWarning,
                stacklevel=4,
            )

    @property
    def collapsed(self) -> bool:
        """Whether some branch's running D loss is below ``collapse_threshold`` after warm-up."""
        return (
            self.config.collapse_threshold > 0
            and self.d_steps >= _COLLAPSE_WARMUP_STEPS
            and any(a < self.config.collapse_threshold for a in self._d_loss_avg)
        )

    def _prepare(self, real: Tensor | Sequence[Tensor] | None, c: Tensor) -> tuple[list[Tensor], Tensor]:
        """Move to the device; build the per-branch real pyramid; check shapes."""
        if c.ndim != 2 or c.shape[1] != self.num_classes:
            raise ValueError(f"c must be (B, {self.num_classes}) one-hot, got {tuple(c.shape)}")
        c = c.to(self.device, torch.float32, non_blocking=True)
        if real is None:
            return [], c
        if isinstance(real, Tensor):
            top = real.to(self.device, torch.float32, non_blocking=True)
            if top.ndim != 4 or top.shape[-1] != self.resolutions[-1] or top.shape[-2] != self.resolutions[-1]:
                raise ValueError(
                    f"real must be (B, C, {self.resolutions[-1]}, {self.resolutions[-1]}), got {tuple(real.shape)}"
                )
            # Area resampling = mean of each 2^k x 2^k block: the lower branches' real images.
            reals = [top if r == top.shape[-1] else F.interpolate(top, size=(r, r), mode="area") for r in self.resolutions]
        else:
            reals = [x.to(self.device, torch.float32, non_blocking=True) for x in real]
            got = [tuple(x.shape[-2:]) for x in reals]
            if got != [(r, r) for r in self.resolutions]:
                raise ValueError(f"real images per branch must be {self.resolutions} px, got {got}")
        if any(x.shape[0] != c.shape[0] for x in reals):
            raise ValueError(f"real batch {reals[0].shape[0]} != condition batch {c.shape[0]}")
        return reals, c

    def _finish(self, metrics: dict[str, Tensor]) -> dict[str, float]:
        keys = list(metrics)
        # One device sync per call: every loss term leaves the device in one transfer.
        values = torch.stack([metrics[k].detach().float() for k in keys]).tolist() if keys else []
        out = dict(zip(keys, values))
        if "d_loss_b0" in out:
            self._watch_collapse([out[f"d_loss_b{i}"] for i in range(len(self.resolutions))])
        out["tau"] = self.tau
        out["d_collapsed"] = float(self.collapsed)
        return out

    # -------------------------------------------------------------- sampling
    def prepare_ema(self) -> nn.Module:
        """G_ema, ready to sample from or export: with ``gan.ema_batchnorm="standing"`` its
        BatchNorm statistics are its own (:func:`standing_statistics`, remade once per G
        update); with ``"copy"`` they are the live G's."""
        # float32, as synthesis runs the exported generator; remade when weights or tau changed.
        if self.config.ema_batchnorm == "standing" and self._standing_at != (self.g_steps, self.tau):
            standing_statistics(self.G_ema, images=self.config.standing_images)
            self._standing_at = (self.g_steps, self.tau)
        return self.G_ema

    @torch.no_grad()
    def sample(self, c: Tensor, z: Tensor | None = None) -> list[Tensor]:
        """G_ema's images (eval mode) for conditions ``c``; fresh noise unless ``z`` is given."""
        self.prepare_ema()
        c = c.to(self.device, torch.float32)
        z = self._z(c.shape[0]) if z is None else z.to(self.device)
        with self._autocast():
            return [x.float() for x in self.G_ema(z, c)]

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume, as tensors and plain Python (``torch.load(weights_only=True)``)."""
        return {
            "generator": unwrap(self.G).state_dict(),
            "generator_ema": self.G_ema.state_dict(),
            "discriminators": [unwrap(d).state_dict() for d in self.Ds],
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "counters": {
                "batches": self.batches,
                "d_steps": self.d_steps,
                "g_steps": self.g_steps,
                "images_seen": self.images_seen,
                "epoch": self.epoch,
            },
            "tau": self.tau,
            "d_loss_avg": list(self._d_loss_avg),
            "noise_rng": self.noise.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (networks must already have the saved architecture)."""
        if len(state["discriminators"]) != len(self.Ds):
            raise ValueError(f"checkpoint has {len(state['discriminators'])} discriminators, trainer {len(self.Ds)}")
        unwrap(self.G).load_state_dict(state["generator"])
        self.G_ema.load_state_dict(state["generator_ema"])
        self._standing_at = None  # the loaded statistics may be G's: remake before use
        for d, sd in zip(self.Ds, state["discriminators"]):
            unwrap(d).load_state_dict(sd)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        counters = state["counters"]
        self.batches = int(counters["batches"])
        self.d_steps = int(counters["d_steps"])
        self.g_steps = int(counters["g_steps"])
        self.images_seen = int(counters["images_seen"])
        self._d_loss_avg = [float(v) for v in state["d_loss_avg"]]
        self.noise.set_state(state["noise_rng"].cpu())
        self.set_epoch(int(counters["epoch"]))
