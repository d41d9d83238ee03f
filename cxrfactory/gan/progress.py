"""Training progress: rank 0's ``metrics.jsonl`` and the interval meter behind the progress lines.

Imports no Ray: the meter averages over workers with ``torch.distributed`` when it is
initialised (as Ray Train does), so a plain loop can use it too.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol

import torch

from cxrfactory.storage import Location


class Position(Protocol):
    """Where training stands (the loop's position: step, epoch in progress)."""

    step: int
    epoch: int


#: Rank 0 prints a progress line at least this often (seconds), between metric lines too.
HEARTBEAT_S = 30.0


class MetricsLog:
    """Rank 0's ``metrics.jsonl``: kept in memory and rewritten whole (S3 has no append)."""

    def __init__(self, loc: Location, enabled: bool, resume_step: int) -> None:
        self.loc, self.enabled, self.records = loc, enabled, []
        if enabled and loc.exists():
            # Lines after the checkpoint belong to steps that will run again.
            old = [json.loads(line) for line in loc.read_text().splitlines() if line.strip()]
            self.records = [r for r in old if r.get("step", 0) <= resume_step]
            self.loc.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.records.append(record)
            self.loc.write_text("".join(json.dumps(r) + "\n" for r in self.records))


class Progress:
    """Step metrics averaged over a log interval and all workers, throughput, progress lines."""

    def __init__(self, total_steps: int, batch_size: int, world: int, is_chief: bool) -> None:
        self.total_steps, self.batch_size, self.world, self.is_chief = total_steps, batch_size, world, is_chief
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.started = time.perf_counter()
        self.tick_time: float | None = None  # throughput counts from the first batch, not the data's start-up
        self.tick_step = 0
        self.step_seconds = 0.0  # inside GANTrainer.train_step during this interval
        self.last_line = self.started
        self.warned_collapse = False

    def begin(self, step: int) -> None:
        """Called before each step; the first call starts the throughput clock."""
        if self.tick_time is None:
            self.tick_time, self.tick_step = time.perf_counter(), step

    def add(self, values: dict[str, float], seconds: float) -> None:
        """One step's metrics and the seconds it took inside the GAN step."""
        self.step_seconds += seconds
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def _rate(self, step: int, now: float) -> float:
        return (step - self.tick_step) * self.batch_size / max(now - self.tick_time, 1e-9)

    def _line(self, pos: Position, epochs: int, tau: float, rate: float, losses: str) -> None:
        eta = (self.total_steps - pos.step) * self.batch_size / max(rate, 1e-9)
        say(f"[train] step {pos.step}/{self.total_steps} epoch {pos.epoch + 1}/{epochs} images "
            f"{pos.step * self.batch_size} |{losses} tau {tau:g} | {rate:.1f} img/s | ETA {fmt_eta(eta)}")
        self.last_line = time.perf_counter()

    def record(self, pos: Position, epochs: int, tau: float, resolutions: list[int]) -> dict[str, Any]:
        """All ranks (a collective): the interval's means as a metrics record; rank 0 prints it."""
        keys = sorted(self.sums)  # the same keys on every worker: the phases are data, not chance
        vec = torch.tensor([self.sums[k] / self.counts[k] for k in keys], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(vec)
            vec /= self.world
        means = dict(zip(keys, vec.tolist()))
        now = time.perf_counter()
        rate = self._rate(pos.step, now)
        # Share of the interval spent inside the GAN step; the rest is waiting for data, logging
        # and checkpoints (rank 0's view).
        share = self.step_seconds / max(now - self.tick_time, 1e-9)
        self.sums, self.counts, self.step_seconds = {}, {}, 0.0
        self.tick_time, self.tick_step = now, pos.step
        if self.is_chief:
            g = f" G {means['g_loss']:.4f}" if "g_loss" in means else ""
            self._line(pos, epochs, tau, rate, f" D {means['d_loss']:.4f}{g} |")
            if means.get("d_collapsed", 0.0) > 0 and not self.warned_collapse:
                self.warned_collapse = True
                say("[train] WARNING: the discriminator's loss collapsed (D wins, G gets almost no "
                    "gradient); see docs/model_card.md 'Calibration': raise the learning rate or lower gan.d_steps_per_g")
        return {"step": pos.step, "epoch": pos.epoch, "images": pos.step * self.batch_size,
                "images_per_s": rate, "step_share": share, "elapsed_s": now - self.started,
                "resolutions": resolutions, **means}

    def heartbeat(self, pos: Position, epochs: int, tau: float) -> None:
        """Rank 0 alone (no collective): a line when the last one is HEARTBEAT_S old."""
        if self.is_chief and time.perf_counter() - self.last_line >= HEARTBEAT_S:
            self._line(pos, epochs, tau, self._rate(pos.step, time.perf_counter()), "")


def say(line: str) -> None:
    """A progress line on the worker's stdout, which Ray forwards to the driver. Not print():
    Ray Train patches it to log *and* echo, which shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fmt_eta(seconds: float) -> str:
    """``3m07s`` or ``2h05m``."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


