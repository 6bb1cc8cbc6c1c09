"""Everything that turns one model into many ranks: launch env, mesh, FSDP2/HSDP,
layout-invariant init. The only package that imports torch.distributed.{fsdp,tensor}."""
