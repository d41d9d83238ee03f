"""cxrfactory: class-balanced synthetic chest X-rays from a multi-scale conditional GAN.

Layering (see DESIGN): ``labels``, ``models``, ``training.losses``, ``training.gan``,
``metrics.stats``, ``metrics.frechet`` and ``data.phantom`` import no Ray; Ray appears only in
the pipeline modules and in ``jobs/``.
"""

__version__ = "0.1.0"
