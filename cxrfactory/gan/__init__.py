"""The GAN product: LSGAN losses, the GAN step (EMA, tau schedule), its Ray Train loop,
data, checkpoints, progress, plots and the generator artifact. Ray appears in ``loop`` and
``data`` only."""
