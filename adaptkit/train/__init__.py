"""Training: the loop on Accelerate, its state, optimizer and scheduler, checkpoints and resume,
memory planning before and during the run, the feature cache and forgetting."""
