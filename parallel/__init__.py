"""Everything that turns one model into many ranks (README, "Architecture"): launch env,
mesh, the parallel config and degrees, TP/SP, activation checkpointing, compile,
FSDP2/HSDP, pipeline stages and schedules, layout-invariant init and clipping. It reads
a model family's ``ModelLayout`` (``layout.py``) and never names a model's attributes.
The only package that imports ``torch.distributed.{tensor,fsdp,pipelining}``."""
