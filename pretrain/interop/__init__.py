"""Converters between this trainer's checkpoints and other formats, one module each:
``hf`` (Hugging Face folders: ``python -m pretrain.hf``) and ``titan`` (torchtitan
checkpoints: ``python -m pretrain.titan``). Each reads a family's converter from
``pretrain.model`` (``ModelFamily.hf``); none names a model's attributes itself."""
