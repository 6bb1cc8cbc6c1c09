"""Distributed checkpoints: ``manager`` saves and resumes a run's DCP checkpoints (async
saves, retention, fallback past a damaged one, resharding across layouts); ``files``
reads checkpoint files as data, never code (allow-listed metadata unpickler,
``weights_only`` loads, the manifest of sizes and CRC32s)."""
from .files import CheckpointError, CheckpointMismatch
from .manager import (Checkpointer, complete_checkpoints, get_model_states, get_states, read_meta, set_model_states,
                      set_states)

__all__ = ["CheckpointError", "CheckpointMismatch", "Checkpointer", "complete_checkpoints", "get_model_states",
           "get_states", "read_meta", "set_model_states", "set_states"]
