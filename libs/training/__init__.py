"""A training run (trainer.py) and its parts: config and launch checks (config, launch), the run's state and its
checkpoints (state, checkpoint, sharding, ema, optimizer, rng), the data stream (data), the optimiser step (step),
in-training evaluation and its history (evaluation, history), and the run's logs (run_logging)."""
