"""Converters between this trainer's checkpoints and other formats, one module each:
``hf`` (Hugging Face folders: ``python -m pretrain.hf``). Each reads a family's converter from
``pretrain.model`` (``ModelFamily.hf``); none names a model's attributes itself."""
