"""Learning one task: keys, a prompt trained with the structure-based contrastive loss, knowledge, thresholds."""
