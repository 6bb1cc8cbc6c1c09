"""Llama 3.2 Vision (Mllama) family: work in progress on branch wip/mllama (issue 19).

Done: ``model.py`` (vision encoder, projector, decoder with gated cross-attention layers
reusing Llama's blocks), ``args.py``, ``hf.py`` (transformers-5 names to ours);
tests/test_mllama.py: 11B/90B meta parameter counts exact, logits and image states
within 1e-4 of transformers at odd tiny shapes, a text-only sample equal to transformers'
skip (padded image slots give zero image states).

Next: FAMILY (layout: vision layers, self- and cross-attention blocks as FSDP/AC/compile
units; TP plans for the vision blocks and cross-attention, whose K/V project the image
states once per forward; pipeline cut with the image states travelling in the
stage-boundary tuple; ``inputs`` that build zero pixels and masks for text-only
batches), configs/model/llama3_2_{11b,90b}_vision.yaml, README knobs (test_readme checks
every MllamaArgs field), HF import/export and init_from, freezing (finetune.freeze),
LoRA on both towers, FLOPs per token with the vision encoder per tile, the parity suite
entries, bench/activation_memory.py --family mllama.
No FAMILY is defined yet, so ``model.family=mllama`` is not selectable."""
