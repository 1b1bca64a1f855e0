"""Fast kernels for training, each with its plain reference beside it."""
