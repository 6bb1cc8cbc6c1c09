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
    include = sysconfig.get_paths()["include"]
    headers = os.path.isfile(os.path.join(include, "Python.h"))
    compiler = None
    if device_type == "cuda":
        cc = os.environ.get("CC")
        if cc is not None and not shutil.which(cc):
            missing.append(f"a C compiler for Triton: $CC={cc!r} is not an executable file (Triton runs $CC as "
                           f"given, without arguments: fix $CC or unset it)")
        elif cc is None and not (shutil.which("gcc") or shutil.which("clang")):
            missing.append("a C compiler for Triton (gcc or clang on PATH, or $CC): apt-get install gcc, or load "
                           "your cluster's gcc module")
        else:
            compiler = ("$CC", cc or shutil.which("gcc") or shutil.which("clang"), "c")
    else:
        from torch._inductor import config as inductor_config

        # Inductor's own search runs each candidate's --version without a time limit: a
        # wrapper that hangs would hang validation. Each is asked here first, with one.
        hung = [c for c in inductor_config.cpp.cxx if c and shutil.which(c) and _run([c, "--version"], 30)[0] is None]
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            if hung:
                raise RuntimeError(f"{hung[0]} --version did not finish within 30 s")
            compiler = ("$CXX", get_cpp_compiler(), "c++")
        except Exception as e:  # noqa: BLE001 (Inductor's InvalidCxxCompiler, or its search failing)
            missing.append(f"a C++ compiler for Inductor ($CXX, else g++: {str(e).splitlines()[0]}): apt-get "
                           f"install g++, or set $CXX to one")
    if not headers:
        missing.append(f"the Python headers: no {include}/Python.h (apt-get install python3-dev, or a Python "
                       f"built with its headers, e.g. conda or uv's)")
    elif compiler is not None:
        why = _cannot_build(compiler[1], compiler[2], include)
        if why:
            missing.append(f"a {compiler[2].upper()} compiler that builds what torch.compile builds: {compiler[1]} "
                           f"({compiler[0]} or the default) {why}: set {compiler[0]} to a working "
                           f"{'g++' if compiler[2] == 'c++' else 'gcc'}, or unset it")
    return missing


_PROBE = {"c": '#include <Python.h>\nint probe(void) { return (int)sizeof(PyObject) > 0 ? 3 : 0; }\n',
          "c++": '#include <Python.h>\n#include <vector>\nextern "C" int probe() { std::vector<int> v(3); '
                 'return (int)v.size(); }\n'}


def _run(cmd: list, timeout: float):
    """(exit code, stderr) of ``cmd``, or (None, "") when it did not finish within ``timeout``
    seconds: then it and whatever it started (its own session) are killed, so that no
    grandchild holding the pipes keeps the caller waiting."""
    import os
    import signal
    import subprocess

    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    except OSError as e:
        return -1, str(e)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, ""
    return proc.returncode, err


def _cannot_build(compiler: str, lang: str, include: str) -> str:
    """Why ``compiler`` cannot build and link a one-function shared library of ``lang``
    (C++ with the standard library, C) against the Python headers, loaded and called here;
    "" when it can. What the compile builders do at the first step, in a second: ``gcc``
    as $CXX compiles C++ but does not link its standard library, ``/bin/true`` builds nothing."""
    import ctypes
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="pretrain-cc-") as d:
        src, lib = Path(d) / f"probe.{'cpp' if lang == 'c++' else 'c'}", Path(d) / "probe.so"
        src.write_text(_PROBE[lang])
        code, err = _run([compiler, "-shared", "-fPIC", "-O0", f"-I{include}", str(src), "-o", str(lib)], 120)
        if code is None:
            return "did not finish a one-line build within 120 s"
        if code != 0 or not lib.is_file():
            first = (err.strip().splitlines() or [f"exit {code}, no output"])[0]
            return f"failed a one-line build ({first[:200]})"
        try:
            value = ctypes.CDLL(str(lib)).probe()
        except OSError as e:
            return f"built a library that does not load ({str(e)[:200]})"
        return "" if value == 3 else f"built a library that returns {value}, not 3"


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
