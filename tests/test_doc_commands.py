"""Every training command the docs show is a job this trainer accepts: each `python -m
pretrain` / `torchrun ... -m pretrain` line of a fenced shell block in README.md and
docs/*.md is composed with Hydra and validated (``validate_job``) for the world size it
launches, in-process (``--cfg job`` alone skips validation). The first training command
of a block preceded by ``<!-- docs-test: run <overrides> -->`` really runs, with the tiny
model and those overrides appended."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from tests.conftest import REPO, TINY, _env, compose_job

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!--\s*docs-test:\s*run\s*(?P<extra>[^>]*?)\s*-->\s*\n)?```(?:bash|sh|shell)\n(?P<body>.*?)```",
                    re.S)
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


def _lines(body: str) -> List[str]:
    """Shell lines of a block: continuations joined, comments and blank lines dropped,
    ``a && b`` / ``a; b`` split."""
    out: List[str] = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return out


def _first_of_sweep(value: str) -> str:
    """A sweep's ``key=a,b,c`` as its first point (commas outside brackets and quotes)."""
    depth = 0
    for i, ch in enumerate(value):
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            return value[:i]
    return value


def parse_command(line: str) -> Optional[Tuple[int, List[str]]]:
    """(world size, job overrides) of a training command; None for any other command."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    while tokens and _ENV.fullmatch(tokens[0]):  # OMP_NUM_THREADS=1 torchrun ...
        tokens = tokens[1:]
    if not tokens:
        return None
    world, rest = 1, None
    prog = Path(tokens[0]).name
    if prog == "torchrun":
        nproc = nnodes = 1
        i = 1
        while i < len(tokens) and tokens[i] != "-m":
            flag, _, val = tokens[i].partition("=")
            if flag in ("--nproc_per_node", "--nproc-per-node", "--nnodes") and not val:
                i += 1
                val = tokens[i]
            if flag in ("--nproc_per_node", "--nproc-per-node"):
                nproc = int(val) if val.isdigit() else nproc
            elif flag == "--nnodes":
                nnodes = int(val.split(":")[-1]) if val.split(":")[-1].isdigit() else nnodes
            i += 1
        if tokens[i + 1: i + 2] == ["pretrain"]:
            world, rest = nproc * nnodes, tokens[i + 2:]
    elif prog == "srun":  # SLURM tasks, one process each: srun --ntasks N python -m pretrain ...
        ntasks, i = 1, 1
        while i < len(tokens) and not Path(tokens[i]).name.startswith("python"):
            flag, _, val = tokens[i].partition("=")
            if flag in ("--ntasks", "-n") and not val:
                i += 1
                val = tokens[i]
            if flag in ("--ntasks", "-n") and val.isdigit():
                ntasks = int(val)
            i += 1
        if tokens[i + 1: i + 3] == ["-m", "pretrain"]:
            world, rest = ntasks, tokens[i + 3:]
    elif prog.startswith("python") and tokens[1:3] == ["-m", "pretrain"]:
        rest = tokens[3:]
    if rest is None:
        return None
    sweep = any(t in ("-m", "--multirun") for t in rest)
    overrides = [(_first_of_sweep(t) if sweep else t) for t in rest
                 if "=" in t and not t.startswith("-") and not t.startswith("hydra")]
    return world, overrides


def doc_commands():
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in _BLOCK.finditer(text):
            lineno = text[: m.start("body")].count("\n") + 1
            extra = m.group("extra")
            for line in _lines(m.group("body")):
                parsed = parse_command(line)
                if parsed is not None:
                    found.append(pytest.param(*parsed, extra, id=f"{doc.name}:{lineno}:{line[:60]}"))
                    extra = None  # the marker runs the block's first training command only
    return found


COMMANDS = doc_commands()


def test_the_docs_show_training_commands():
    assert len(COMMANDS) >= 10, [p.id for p in COMMANDS]
    assert any(p.values[2] is not None for p in COMMANDS), "no block is marked to run"


@pytest.mark.parametrize("world,overrides,run", COMMANDS)
def test_each_command_composes_and_validates(world, overrides, run):
    from pretrain.validate import validate_job

    validate_job(compose_job(*overrides), world)


@pytest.mark.parametrize("world,overrides,run", [p for p in COMMANDS if p.values[2] is not None])
def test_marked_commands_run(world, overrides, run, tmp_path, tok_cache):
    extra = shlex.split(run or "")
    args = [*overrides, *TINY, *extra, f"data.tokenizer.cache_dir={tok_cache}", f"hydra.run.dir={tmp_path / 'run'}"]
    if world == 1:
        cmd = [sys.executable, "-m", "pretrain", *args]
    else:
        from tests.conftest import BIN, free_port

        cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "pretrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done:" in proc.stderr + proc.stdout
