"""What ``ffn train`` / ``ffn eval`` run on: the training loop, evaluation, checkpoints, logs,
optimiser and schedule, model building from a config, and the DDP set-up."""
