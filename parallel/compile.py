"""torch.compile per transformer block, in place (``nn.Module.compile``: parameter names
are unchanged). Applied after TP and activation checkpointing, before FSDP2, so FSDP's
hooks stay outside the compiled region and every block reuses one compiled graph."""
from __future__ import annotations


def apply_compile(blocks) -> None:
    for block in blocks:
        block.compile(fullgraph=True)


def missing_prerequisites(device_type: str) -> list:
    """What ``torch.compile`` needs on this node and lacks, each with its fix: on CUDA,
    Triton builds a small C module per kernel launcher (a C compiler: ``$CC``, clang, gcc
    or cc; and the Python headers); on CPU, Inductor builds C++ (``$CXX``, g++, clang++ or
    c++; the same headers)."""
    import os
    import shutil
    import sysconfig

    missing = []
    env, names, what = (("CC", ("clang", "gcc", "cc"), "a C compiler") if device_type == "cuda"
                        else ("CXX", ("g++", "clang++", "c++"), "a C++ compiler"))
    chosen = os.environ.get(env, "").strip()
    if chosen and not shutil.which(chosen.split()[0]):  # "ccache gcc": its first word runs
        missing.append(f"{what}: ${env}={chosen!r} is not an executable on PATH (fix ${env} or unset it)")
    elif not chosen and not any(shutil.which(n) for n in names):
        missing.append(f"{what} ({', '.join(names)} or ${env}): none on PATH (apt-get install build-essential, "
                       f"or load your cluster's gcc module)")
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        missing.append(f"the Python headers: no {include}/Python.h (apt-get install python3-dev, or a Python "
                       f"built with its headers, e.g. conda or uv's)")
    return missing


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
