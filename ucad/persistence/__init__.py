"""What outlives a process: the run folder, checkpoints and model files."""
