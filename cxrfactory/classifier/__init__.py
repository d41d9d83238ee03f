"""The DenseNet classifier product: config, training mix and Ray Data input, the Ray Train
worker and driver, the classifier artifact, and the downstream-utility experiment."""
