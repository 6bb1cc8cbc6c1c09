"""The training job: Hydra entry point, trainer loop, Llama model, optimizer and schedule,
checkpointing, metrics, HF conversion."""
