"""The CNN, its training loop, checkpoints, metrics, plots and a whole training run."""
