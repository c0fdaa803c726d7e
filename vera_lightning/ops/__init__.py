"""What you do to a model: inject/merge/unload, target matching, named adapters, mixed batches, quantized bases,
gradient checkpointing."""
