"""The prediction server: the newest snapshot of each model, served over KServe V1."""
