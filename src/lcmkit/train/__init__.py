"""The training loop, knowing no method: updates of one or more models and optimizers, accumulation, checkpoints
and resume, optimizers, the run lock."""
