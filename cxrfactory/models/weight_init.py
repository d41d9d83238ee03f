"""Weight initialisations the networks can be built with (``model.init``).

``pytorch`` leaves PyTorch's defaults (Kaiming-uniform convolutions and linears). ``stackgan``
is StackGAN++'s ``weights_init``, which the paper's code base applies to G and every D:
orthogonal convolution and linear weights (gain 1), linear biases 0, BatchNorm gains drawn
from N(1, 0.02) and biases 0. Conditional BatchNorm's per-class tables take the same spread
around the same centre (gain offsets N(0, 0.02), biases 0), so every class starts near
StackGAN++'s gain.

A spectrally normalised layer keeps its weight in a parametrisation whose power-iteration
vectors belong to the weight they were started on; the layer is re-parametrised after its
weight is replaced, so ``u`` and ``v`` start converged for the new weight (15 iterations, as
``spectral_norm`` does when it is first applied).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from cxrfactory.models.layers import ConditionalBatchNorm


def _is_spectral(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight")


def _orthogonal(module: nn.Conv2d | nn.ConvTranspose2d | nn.Linear) -> None:
    if _is_spectral(module):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        nn.init.orthogonal_(module.weight, 1.0)
        spectral_norm(module)
    else:
        nn.init.orthogonal_(module.weight, 1.0)


def stackgan_init(network: nn.Module) -> None:
    """StackGAN++'s ``weights_init`` over every layer of ``network``, in place."""
    modules = list(network.modules())  # listed first: re-parametrising changes the tree
    tables = {id(t) for m in modules if isinstance(m, ConditionalBatchNorm) for t in (m.gain, m.bias)}
    for module in modules:
        if isinstance(module, ConditionalBatchNorm):
            nn.init.normal_(module.gain.weight, 0.0, 0.02)
            nn.init.zeros_(module.bias.weight)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            _orthogonal(module)
        elif isinstance(module, nn.Linear):
            if id(module) in tables:
                continue  # a conditional BatchNorm's table, initialised with it above
            _orthogonal(module)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)


def initialise(network: nn.Module, scheme: str) -> None:
    """Apply ``scheme`` (one of ``models.config.INITS``) to ``network`` in place."""
    if scheme == "stackgan":
        stackgan_init(network)
    elif scheme != "pytorch":
        raise ValueError(f"unknown initialisation {scheme!r} (expected 'pytorch' or 'stackgan')")
