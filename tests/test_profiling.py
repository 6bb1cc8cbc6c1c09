"""profiling.*: a real two-process run writes one Chrome trace per rank holding exactly
the profiled steps; a run without it writes nothing; resumed runs past the window skip it."""
import json
import re

import torch

from pretrain.config import ProfilingConfig
from pretrain.observe.profiling import StepProfiler
from tests.conftest import run_job


def test_two_ranks_write_a_trace_of_the_window(tmp_path, tok_cache):
    run = tmp_path / "run"
    proc = run_job(run, ["train.steps=6", "profiling.enable=true", "profiling.start_step=2", "profiling.steps=3"],
                   tok_cache=tok_cache, nproc=2, launcher="torchrun")
    traces = sorted((run / "profile").iterdir())
    assert [p.name for p in traces] == ["trace-rank0.pt.trace.json", "trace-rank1.pt.trace.json"]
    for path in traces:
        events = json.loads(path.read_text())["traceEvents"]
        steps = {int(m.group(1)) for e in events if (m := re.fullmatch(r"ProfilerStep#(\d+)", e.get("name", "")))}
        # torch numbers this process's steps from 0: global steps 2, 3, 4 of a fresh run.
        assert steps == {1, 2, 3}, steps
        assert any(e.get("name") == "aten::mm" or e.get("name") == "aten::addmm" for e in events)
    assert "profiling: traces of steps 2-4 written to" in proc.stdout + proc.stderr


def test_off_writes_nothing(tmp_path, tok_cache):
    run = tmp_path / "run"
    run_job(run, ["train.steps=2"], tok_cache=tok_cache)
    assert (run / "metrics.jsonl").exists() and not (run / "profile").exists()


def test_window_against_resume_and_run_end(tmp_path):
    cpu = torch.device("cpu")
    on = ProfilingConfig(enable=True, start_step=5, steps=3)
    assert StepProfiler(on, tmp_path, 0, cpu, steps_done=5, last_step=10).prof is None  # resumed past it
    assert StepProfiler(on, tmp_path, 0, cpu, steps_done=0, last_step=4).prof is None  # after the last step
    p = StepProfiler(on, tmp_path, 0, cpu, steps_done=2, last_step=6)  # resumed before it, cut at the end
    assert (p.first, p.last, p.first_index) == (5, 6, 2)
    p.stop()
    assert StepProfiler(ProfilingConfig(), tmp_path, 0, cpu, steps_done=0, last_step=10).prof is None
    assert not (tmp_path / "profile").exists()


def test_memory_writes_the_per_op_table_and_counters(tmp_path):
    """profiling.memory=true adds memory-rank<r>.txt (the window's per-op allocations) and [memory] trace events."""
    cpu = torch.device("cpu")
    for memory in (True, False):
        run = tmp_path / str(memory)
        p = StepProfiler(ProfilingConfig(enable=True, start_step=2, steps=2, memory=memory), run, 1, cpu,
                         steps_done=0, last_step=4)
        p.start()
        for _ in range(4):
            torch.ones(256, 256) @ torch.ones(256, 256)
            p.step()
        p.stop()
        events = json.loads((run / "profile" / "trace-rank1.pt.trace.json").read_text())["traceEvents"]
        assert any(e.get("name") == "[memory]" for e in events) is memory
        assert sorted(f.name for f in (run / "profile").iterdir()) == (
            ["memory-rank1.txt", "trace-rank1.pt.trace.json"] if memory else ["trace-rank1.pt.trace.json"])
    table = (tmp_path / "True" / "profile" / "memory-rank1.txt").read_text()
    assert "Self CPU Mem" in table
    # The window's two matmuls, each allocating a 256 x 256 fp32 result (256 KB).
    mm = next(line.split() for line in table.splitlines() if line.split()[:1] == ["aten::mm"])
    assert mm[-1] == "2" and "512.00 KB" in " ".join(mm)
