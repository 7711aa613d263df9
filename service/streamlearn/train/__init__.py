"""The trainer: Kafka records in, a model learned test-then-train, snapshots with their offsets out."""
