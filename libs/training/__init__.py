"""The training script's parts (train_ldm_discrete.py): config and launch checks (config, launch), run state and
checkpoints (state, sharding, ema, optimizer_state, rng), data (data), the optimiser step (step), evaluation
(evaluation)."""
