"""What a run reports: anomaly-detection and continual metrics, result tables and files, pictures of anomaly maps."""
