"""torch.compile per transformer block, in place (``nn.Module.compile``: parameter names
are unchanged). Applied after TP and activation checkpointing, before FSDP2, so FSDP's
hooks stay outside the compiled region and every block reuses one compiled graph."""
from __future__ import annotations


def apply_compile(blocks) -> None:
    for block in blocks:
        block.compile(fullgraph=True)


def missing_prerequisites(device_type: str) -> list:
    """What ``torch.compile`` needs on this node and lacks, each with its fix, found the way
    its builders look: on CUDA, Triton compiles a small C module per kernel launcher with
    ``$CC`` (run as given, no arguments), else gcc, else clang; on CPU, Inductor compiles
    C++ with ``$CXX``, else g++ (its own search, called here). Both need the Python headers."""
    import os
    import shutil
    import sysconfig

    missing = []
    if device_type == "cuda":
        cc = os.environ.get("CC")
        if cc is not None and not shutil.which(cc):
            missing.append(f"a C compiler for Triton: $CC={cc!r} is not an executable file (Triton runs $CC as "
                           f"given, without arguments: fix $CC or unset it)")
        elif cc is None and not (shutil.which("gcc") or shutil.which("clang")):
            missing.append("a C compiler for Triton (gcc or clang on PATH, or $CC): apt-get install gcc, or load "
                           "your cluster's gcc module")
    else:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 (Inductor's InvalidCxxCompiler, or its search failing)
            missing.append(f"a C++ compiler for Inductor ($CXX, else g++: {str(e).splitlines()[0]}): apt-get "
                           f"install g++, or set $CXX to one")
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        missing.append(f"the Python headers: no {include}/Python.h (apt-get install python3-dev, or a Python "
                       f"built with its headers, e.g. conda or uv's)")
    return missing


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
