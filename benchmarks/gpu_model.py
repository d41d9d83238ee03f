"""GPU benchmark of the model (pure PyTorch, no Ray): size, FLOPs, throughput, memory.

    python benchmarks/gpu_model.py --out results.json                 # a CUDA box, paper preset
    python benchmarks/gpu_model.py --device cpu --quick --preset demo  # smoke run anywhere

Needs only torch (and the repo on PYTHONPATH: run it from the repo root). Measures, for the
preset's multi-scale GAN:

- parameters of G and of every discriminator;
- FLOPs per image (``torch.utils.flop_counter``): G forward, D forwards, one training
  iteration (``d_steps_per_g`` D updates + 1 G update, forward and backward);
- activation memory: bytes autograd saves for backward in a G step and a D step;
- generation images/s of G_ema at batch 256 in bf16 (baseline: the same in float32);
- training iterations/s at batch 16 and 64 under bf16 autocast, achieved TFLOP/s and peak
  memory (baselines: float32 at batch 16, and the cDCGAN at batch 16);
- the self-attention at 64 px, batch 16: SDPA (each fused backend PyTorch offers) against the
  naive N x N softmax map, time and peak memory.

A section that fails records its error instead of stopping the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run from elsewhere

from cxrfactory.gan.config import Config, load_config  # noqa: E402
from cxrfactory.models import build_discriminators, build_generator, count_parameters  # noqa: E402
from cxrfactory.gan.step import GANTrainer  # noqa: E402


def _preset(name: str) -> Config:
    try:
        return load_config(name)
    except ImportError:  # no PyYAML on a bare torch box: the dataclass defaults are the paper
        if name != "paper":
            raise
        return Config()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Seconds per call: ``warmup`` untimed calls, then the mean of ``repeats`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _batch(cfg: Config, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = cfg.model.resolution
    labels = torch.arange(batch, device=device) % cfg.model.num_classes
    return torch.rand(batch, 1, r, r, device=device) * 2 - 1, F.one_hot(labels, cfg.model.num_classes).float()


def _trainer(cfg: Config, device: torch.device, bf16: bool) -> GANTrainer:
    torch.manual_seed(0)
    G = build_generator(cfg).to(device)
    Ds = [d.to(device) for d in build_discriminators(cfg)]
    return GANTrainer(G, Ds, dataclasses.replace(cfg.gan, bf16=bf16), device=device)


def saved_activation_bytes(fn: Callable[[], Any], batch_sizes: tuple[int, ...]) -> int:
    """Bytes of activations autograd saves for backward while ``fn`` runs.

    Each storage counts once; only tensors whose leading dimension is a batch size count, so
    the (spectrally normalised) weights that convolutions also save are left out. Measure at
    an odd batch (3) that no weight's leading dimension equals.
    """
    seen: dict[tuple[int, torch.device], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] in batch_sizes:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def model_cost(cfg: Config, device: torch.device, batch: int = 3) -> dict[str, Any]:
    """Parameters, FLOPs per image and activation bytes per image of one training iteration."""
    trainer = _trainer(cfg, device, bf16=False)
    G, Ds = trainer.G, trainer.Ds
    real, c = _batch(cfg, batch, device)
    z = torch.randn(batch, cfg.model.z_dim, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        images = G(z, c)
    g_flops = counter.get_total_flops() / batch
    d_flops = []
    for d, x in zip(Ds, images):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            d(x, c)
        d_flops.append(counter.get_total_flops() / batch)
    k = cfg.gan.d_steps_per_g
    with FlopCounterMode(display=False) as counter:
        for _ in range(k):
            trainer.train_step(real, c)
    iteration_flops = counter.get_total_flops() / batch

    # Activation memory: what autograd keeps between forward and backward in each step.
    def g_forward():
        fakes = G(torch.randn(batch, cfg.model.z_dim, device=device), c)
        return [d(x, c) for d, x in zip(Ds, fakes)]

    def d_forward():
        with torch.no_grad():
            fakes = G(torch.randn(batch, cfg.model.z_dim, device=device), c)
        reals, _ = trainer._prepare(real, c)
        return [d(torch.cat([r, f]), torch.cat([c, c])) for d, r, f in zip(Ds, reals, fakes)]

    return {
        "params_generator": count_parameters(G),
        "params_discriminators": [count_parameters(d) for d in Ds],
        "gflops_per_image_generator_forward": g_flops / 1e9,
        "gflops_per_image_discriminator_forward": [f / 1e9 for f in d_flops],
        "gflops_per_image_iteration": iteration_flops / 1e9,
        "iteration": f"{k} D updates + 1 G update, forward and backward",
        "activation_mib_per_image_g_step": saved_activation_bytes(g_forward, (batch,)) / batch / 2**20,
        "activation_mib_per_image_d_step": saved_activation_bytes(d_forward, (batch, 2 * batch)) / batch / 2**20,
    }


def generation(cfg: Config, device: torch.device, batch: int, bf16: bool, repeats: int) -> dict[str, Any]:
    """G_ema images/s at ``batch`` (eval mode, inference_mode)."""
    G = build_generator(cfg).to(device).eval()
    G.set_tau(1.0)
    c = F.one_hot(torch.arange(batch, device=device) % cfg.model.num_classes, cfg.model.num_classes).float()
    use_bf16 = bf16 and device.type == "cuda"

    @torch.inference_mode()
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            return G(torch.randn(batch, cfg.model.z_dim, device=device), c)[-1]

    _reset_peak(device)
    seconds = _timed(run, device, warmup=2, repeats=repeats)
    return {"batch": batch, "bf16": use_bf16, "images_per_s": batch / seconds, "peak_gib": _peak_gib(device)}


def training(cfg: Config, device: torch.device, batch: int, bf16: bool, repeats: int,
             gflops_per_image_iteration: float | None) -> dict[str, Any]:
    """Iterations/s (``d_steps_per_g`` train_step calls each) and achieved TFLOP/s."""
    trainer = _trainer(cfg, device, bf16=bf16 and device.type == "cuda")
    trainer.set_epoch(50)  # tau = 1: attention fully on, as late in training
    real, c = _batch(cfg, batch, device)
    k = cfg.gan.d_steps_per_g

    def iteration():
        for _ in range(k):
            metrics = trainer.train_step(real, c)
        return metrics

    _reset_peak(device)
    seconds = _timed(iteration, device, warmup=1, repeats=repeats)
    metrics = iteration()
    out = {
        "batch": batch, "bf16": trainer.config.bf16, "iterations_per_s": 1.0 / seconds,
        "images_per_s": batch * k / seconds, "peak_gib": _peak_gib(device),
        "finite_losses": all(v == v and abs(v) != float("inf") for v in metrics.values()),
    }
    if gflops_per_image_iteration:
        out["achieved_tflops"] = gflops_per_image_iteration * batch / seconds / 1e3
    return out


def attention(device: torch.device, batch: int, repeats: int) -> dict[str, Any]:
    """Self-attention at 64 px (N = 4096, C = 64): SDPA backends vs the naive N x N map."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, c = 4096, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(batch, 1, n, c // 8, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, 1, n, c // 8, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, 1, n, c, device=device, dtype=dtype, requires_grad=True)

    def naive():
        att = torch.softmax(q @ k.transpose(-1, -2), dim=-1)  # (B, 1, N, N) materialised
        (att @ v).sum().backward()

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, scale=1.0).sum().backward()

    out: dict[str, Any] = {"batch": batch, "dtype": str(dtype), "fwd_bwd": {}}
    backends = {"default": None}
    if device.type == "cuda":
        backends.update({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                         "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH})
    for name, fn in [("naive", naive)] + [(f"sdpa_{b}", sdpa) for b in backends]:
        backend = backends.get(name.removeprefix("sdpa_")) if name != "naive" else None
        try:
            _reset_peak(device)
            if backend is None:
                ms = _timed(fn, device, warmup=1, repeats=repeats) * 1e3
            else:
                with sdpa_kernel([backend]):
                    ms = _timed(fn, device, warmup=1, repeats=repeats) * 1e3
            out["fwd_bwd"][name] = {"ms": ms, "peak_gib": _peak_gib(device)}
        except RuntimeError as err:  # a backend that does not support these shapes
            out["fwd_bwd"][name] = {"error": str(err).splitlines()[0][:200]}
    return out


def _section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # record and go on: one broken section must not hide the others
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    print(f"[{time.perf_counter() - start:6.1f}s] {name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
    return results[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_model_results.json"), help="results JSON")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--preset", default="paper", help="config preset (default: paper)")
    parser.add_argument("--quick", action="store_true", help="tiny batches and counts (a smoke run)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu (with --quick) for a smoke run")
    device = torch.device(args.device)
    try:
        cfg = _preset(args.preset)
    except ValueError as err:
        parser.error(str(err))
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels

    gen_batch, train_batches, repeats = (4, [2], 1) if args.quick else (256, [16, 64], 10)
    results: dict[str, Any] = {
        "preset": args.preset, "quick": args.quick, "torch": torch.__version__,
        "python": platform.python_version(), "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "config": cfg.to_dict(),
    }
    cost = _section(results, "cost", lambda: model_cost(cfg, device))
    flops = cost.get("gflops_per_image_iteration") if isinstance(cost, dict) else None
    _section(results, "generation_bf16", lambda: generation(cfg, device, gen_batch, True, repeats))
    _section(results, "generation_fp32_baseline", lambda: generation(cfg, device, gen_batch, False, repeats))
    for b in train_batches:
        _section(results, f"training_bf16_b{b}", lambda b=b: training(cfg, device, b, True, repeats, flops))
    b0 = train_batches[0]
    _section(results, f"training_fp32_baseline_b{b0}", lambda: training(cfg, device, b0, False, repeats, flops))
    dcgan = cfg.with_overrides({"model.arch": "cdcgan"})
    dcgan_cost = _section(results, "cdcgan_cost", lambda: model_cost(dcgan, device))
    dcgan_flops = dcgan_cost.get("gflops_per_image_iteration") if isinstance(dcgan_cost, dict) else None
    _section(results, f"cdcgan_training_bf16_b{b0}",
             lambda: training(dcgan, device, b0, True, repeats, dcgan_flops))
    _section(results, "attention_64px", lambda: attention(device, 2 if args.quick else 16, repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
