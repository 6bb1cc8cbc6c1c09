"""Data: sources -> tokenizer -> packing -> per-DP-rank batches. Knows nothing of models
or parallelism beyond (dp_rank, dp_world_size)."""
