"""The built-in demo: a small synthetic data set in the MVTec AD layout (not imported by the core)."""
