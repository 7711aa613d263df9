"""The prediction server: the newest snapshot of each model, served over KServe V1 and V2 (Open Inference)."""
