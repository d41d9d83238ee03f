"""cxrfactory: class-balanced synthetic chest X-rays from a multi-scale conditional GAN.

Layers, contracts and which modules import no Ray: docs/architecture.md. One room per
product: ``gan/``, ``classifier/``, ``synthesis/``, ``metrics/`` (FDD), ``report/``, beside the
shared ``models/``, ``data/`` and the foundation modules; Ray appears only in the pipelines and
in ``jobs/``.
"""

__version__ = "0.1.0"
