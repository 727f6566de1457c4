"""Training data: data sets (`get_dataset(**config.dataset)`, image folders), resumable per-step batching, the
autoencoder."""
