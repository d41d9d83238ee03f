"""Training: LSGAN losses, the GAN step object (EMA, tau schedule); Ray appears only in ``loop``."""
