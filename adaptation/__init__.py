"""Everything that changes weights: losses, methods, the one training loop, datasets, metrics."""
