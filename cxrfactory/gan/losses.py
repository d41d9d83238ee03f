"""LSGAN losses of Ann et al. 2020 (Mao et al.'s least squares GAN), summed over branches.

Paper, eq. 5 (discriminator) and eq. 6 (generator)::

    L_D = 1/2 E_x[(D(x) - b)^2] + 1/2 E_z[(D(G(z)) - a)^2]
    L_G = 1/2 E_z[(D(G(z)) - d)^2]

with a = 0 (the fake label), b = 1 (the real label), d = 1 (the value G wants D to believe for
fakes). As in StackGAN++, every branch's discriminator has an unconditional score ``D(x)`` and a
conditional score ``D(x, c)``; a branch's loss is the sum of both heads' terms, and the total is
the sum over branches.

Mismatched pairs (optional, ``GANConfig.mismatch_weight`` = w > 0): StackGAN++'s code (not its
paper's equations) also shows the conditional head real images under a condition they do not
have and asks for the fake label, ``+ w/2 E_x[(D(x, c') - a)^2]``. Without them the conditional
head only meets the condition through fakes, and early fakes look alike for every class, so
the head can score realism and ignore ``c``; with them, ignoring ``c`` costs it the term.
w = 0 is eq. 5 exactly (the ``paper`` preset).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: A discriminator's output on one batch: (unconditional scores, conditional scores), each (B,).
Scores = tuple[Tensor, Tensor]


def lsgan_d_loss(real_scores: Tensor, fake_scores: Tensor, *, a: float = 0.0, b: float = 1.0) -> Tensor:
    """Eq. 5 for one score head: ``1/2 E[(D(x) - b)^2] + 1/2 E[(D(G(z)) - a)^2]``.

    ``real_scores`` = D(x) on real images, ``fake_scores`` = D(G(z)) on generated ones (raw, no
    sigmoid). Means over the batch; computed in float32 whatever the scores' dtype.
    """
    real, fake = real_scores.float(), fake_scores.float()
    return 0.5 * ((real - b) ** 2).mean() + 0.5 * ((fake - a) ** 2).mean()


def lsgan_g_loss(fake_scores: Tensor, *, d: float = 1.0) -> Tensor:
    """Eq. 6 for one score head: ``1/2 E[(D(G(z)) - d)^2]``; ``fake_scores`` = D(G(z)), raw."""
    return 0.5 * ((fake_scores.float() - d) ** 2).mean()


@dataclass
class BranchLosses:
    """Loss terms of one branch: unconditional, conditional and their sum (``total``)."""

    uncond: Tensor
    cond: Tensor

    @property
    def total(self) -> Tensor:
        return self.uncond + self.cond


def multiscale_d_loss(
    real: Sequence[Scores],
    fake: Sequence[Scores],
    *,
    a: float = 0.0,
    b: float = 1.0,
    mismatched: Sequence[Tensor] | None = None,
    mismatch_weight: float = 0.0,
) -> list[BranchLosses]:
    """Eq. 5 for every branch and head; ``sum(t.total for t in result)`` is the D objective.

    ``mismatched``: per branch, the conditional scores of real images under a wrong condition;
    each adds ``mismatch_weight / 2 * E[(score - a)^2]`` to its branch's conditional term.
    """
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real but {len(fake)} fake score pairs")
    if mismatched is not None and len(mismatched) != len(real):
        raise ValueError(f"{len(mismatched)} mismatched score sets for {len(real)} branches")
    out = []
    for i, (r, f) in enumerate(zip(real, fake)):
        cond = lsgan_d_loss(r[1], f[1], a=a, b=b)
        if mismatched is not None:
            cond = cond + mismatch_weight * 0.5 * ((mismatched[i].float() - a) ** 2).mean()
        out.append(BranchLosses(lsgan_d_loss(r[0], f[0], a=a, b=b), cond))
    return out


def multiscale_g_loss(fake: Sequence[Scores], *, d: float = 1.0) -> list[BranchLosses]:
    """Eq. 6 for every branch and head; ``sum(t.total for t in result)`` is the G objective."""
    return [BranchLosses(lsgan_g_loss(f[0], d=d), lsgan_g_loss(f[1], d=d)) for f in fake]


def total(losses: Sequence[BranchLosses]) -> Tensor:
    """Sum of every branch's unconditional and conditional terms."""
    return torch.stack([t.total for t in losses]).sum()
