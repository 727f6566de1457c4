"""Training data: data sets (`get_dataset(**config.dataset)`), resumable per-step batching, the autoencoder."""
