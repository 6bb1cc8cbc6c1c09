"""`python -m pretrain.sweep_summary` on Hydra multirun dirs built on disk, and the run
dir's status.json (atomic writes; a config error records failed with exit code 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, run_job
from pretrain.runtime.status import read_status, write_status
from pretrain.sweep_summary import format_table, main, read_metrics, summarize


def make_point(sweep: Path, num: int, overrides, *, planned=4, records=(), status=None, job_id=None) -> Path:
    """A job dir as Hydra and the trainer leave it."""
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": planned, "seq_len": 32}}))
    if job_id is not None:
        (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"id": job_id, "num": num}}}))
    if records:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status is not None:
        write_status(d, **status)
    return d


def recs(steps, loss0, tps=(100.0, 200.0, 300.0, 400.0)):
    return [{"step": s, "loss": loss0 - 0.5 * i, "lr": 1e-3, "tokens_per_s": tps[i % len(tps)]}
            for i, s in enumerate(steps)]


def two_lr_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "2026-11-27" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    done = {"status": "completed", "exit_code": 0, "step": 4, "started": 1.0, "ended": 2.0, "world_size": 2}
    make_point(sweep, 0, ["train.steps=4", "optim.lr=1e-4", "model=debug"], records=recs([1, 2, 3, 4], 6.0),
               status=done)
    make_point(sweep, 1, ["train.steps=4", "optim.lr=3e-4", "model=debug"], records=recs([1, 2, 3, 4], 5.5),
               status=done)
    return sweep


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.sweep_summary", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_two_completed_points_cli(tmp_path):
    sweep = two_lr_sweep(tmp_path)
    proc = cli(sweep)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "2 points" in lines[0] and "common overrides: train.steps=4 model=debug" in lines[0]
    assert lines[1].split() == ["job", "overrides", "steps", "final", "loss", "tokens/s", "status"]
    rows = {ln.split()[0]: ln.split() for ln in lines[3:5]}
    # Only the differing override is in the column; losses are the last records'; tokens/s
    # averages the records after the first (start-up): (200 + 300 + 400) / 3.
    assert rows["0"] == ["0", "optim.lr=1e-4", "4/4", "4.5000", "300", "completed"]
    assert rows["1"] == ["1", "optim.lr=3e-4", "4/4", "4.0000", "300", "completed"]
    assert len(lines) == 5  # no notes: everything completed
    assert lines[1].index("status") == lines[3].index("completed") == lines[4].index("completed")


def test_sort_by_loss_and_json_round_trip(tmp_path):
    sweep = two_lr_sweep(tmp_path)
    assert [r["job"] for r in summarize(sweep, sort="loss")] == [1, 0]
    proc = cli(sweep, "--json", "--sort", "loss")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows == summarize(sweep, sort="loss")
    assert rows[0]["overrides"] == ["optim.lr=3e-4"]
    assert rows[0]["all_overrides"] == ["train.steps=4", "optim.lr=3e-4", "model=debug"]
    assert (rows[0]["step"], rows[0]["planned_steps"], rows[0]["final_loss"]) == (4, 4, 4.0)


def test_failed_point_exit_1_with_error_and_submitit_log(tmp_path, capsys):
    sweep = two_lr_sweep(tmp_path)
    make_point(sweep, 2, ["train.steps=4", "optim.lr=1e-2", "model=debug"], records=recs([1], 6.0),
               status={"status": "failed", "exit_code": 1, "step": None,
                       "error": "RuntimeError: CUDA out of memory", "ended": 3.0}, job_id="777_2")
    logs = sweep / ".submitit" / "777_2"
    logs.mkdir(parents=True)
    (logs / "777_2_0_log.err").write_text("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    (logs / "777_2_1_log.err").write_text("")
    (sweep / ".submitit" / "777_0").mkdir()
    (sweep / ".submitit" / "777_0" / "777_0_0_log.err").write_text("Traceback: not this job\n")

    assert main([str(sweep)]) == 1
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.split()[:1] == ["2"])
    assert row.split()[1:] == ["optim.lr=1e-2", "1/4", "6.0000", "100", "FAILED"]
    assert "job 2 FAILED (exit 1): RuntimeError: CUDA out of memory" in out
    assert f"log: {logs / '777_2_0_log.err'}" in out
    assert "777_0" not in out


def test_incomplete_point_without_status_finds_its_log_by_run_dir(tmp_path, capsys):
    sweep = two_lr_sweep(tmp_path)
    d = make_point(sweep, 2, ["train.steps=4", "optim.lr=1e-2", "model=debug"], records=recs([1, 2], 6.0))
    logs = sweep / ".submitit" / "900"
    logs.mkdir(parents=True)
    (logs / "900_0_log.out").write_text(f"[pretrain][INFO] - run dir {d.resolve()} | 1 params\n")
    (logs / "900_0_log.err").write_text("slurmstepd: error: *** JOB 900 CANCELLED DUE TO TIME LIMIT ***\n")
    rows = summarize(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed", "incomplete"]
    assert rows[2]["err_logs"] == [str(logs / "900_0_log.err")]
    assert main([str(sweep)]) == 1
    assert "job 2 incomplete" in capsys.readouterr().out


def test_no_status_file_reads_steps_against_plan(tmp_path):
    sweep = tmp_path / "sweep"
    make_point(sweep, 0, ["optim.lr=1e-4"], records=recs([1, 2, 3, 4], 6.0))  # an old, finished run
    make_point(sweep, 1, ["optim.lr=3e-4"])  # started, never logged
    rows = summarize(sweep)
    assert [r["status"] for r in rows] == ["completed", "no metrics"]
    table = format_table(rows)
    assert "-/4" in table and "no metrics" in table


def test_resumed_point_uses_last_record_per_step(tmp_path):
    sweep = tmp_path / "sweep"
    first = recs([1, 2, 3, 4], 6.0)  # killed after step 4, checkpoint at step 2
    again = [{**r, "loss": r["loss"] - 0.01} for r in recs([3, 4, 5, 6], 5.0)]
    d = make_point(sweep, 0, ["optim.lr=1e-4"], planned=6, records=first + again,
                   status={"status": "completed", "exit_code": 0, "step": 6})
    metrics = read_metrics(d)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[2] == again[0] and metrics[3] == again[1]
    (row,) = summarize(sweep)
    assert (row["step"], row["final_loss"]) == (6, again[-1]["loss"])
    # A resume that has not yet caught up drops the first run's later records too.
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first + again[:1]) + '{"step": 4, "lo')
    assert [m["step"] for m in read_metrics(d)] == [1, 2, 3]


def test_bad_dirs_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli(empty)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no job dirs" in proc.stderr and "multirun.yaml" in proc.stderr and "(0/, 1/, ...)" in proc.stderr
    assert main([str(tmp_path / "missing")]) == 2


def test_write_status_is_atomic_and_leaves_no_tmp(tmp_path):
    assert read_status(tmp_path) is None
    write_status(tmp_path, status="running", started=1.5, world_size=2)
    write_status(tmp_path, status="completed", exit_code=0, step=5, ended=2.5)
    assert read_status(tmp_path) == {"status": "completed", "exit_code": 0, "step": 5, "ended": 2.5}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
    # A write that fails half-way leaves the previous file whole and no temporary file.
    try:
        write_status(tmp_path, status="failed", error=object())
    except TypeError:
        pass
    else:
        raise AssertionError("unserializable field was written")
    assert read_status(tmp_path)["status"] == "completed"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]
    (tmp_path / "status.json").write_text('{"status": "runn')
    assert read_status(tmp_path) is None


def test_config_error_records_failed_status(tmp_path, tok_cache):
    proc = run_job(tmp_path, ["model.n_kv_heads=3"], tok_cache=tok_cache, check=False)
    assert proc.returncode == 2
    st = read_status(tmp_path)
    assert st["status"] == "failed" and st["exit_code"] == 2 and st["step"] is None
    assert st["error"].startswith("ConfigError: model.n_kv_heads=3")
    assert st["world_size"] == 1 and st["ended"] >= st["started"]


def test_local_launcher_sweep_end_to_end(tmp_path, tok_cache):
    """README's `hydra/launcher=local` sweep, for real: two lr points, each 2 processes from
    submitit's local executor (the entry point reads SUBMITIT_LOCAL_*), then the summary."""
    from tests.conftest import TINY, _env

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "pretrain", "-m", *TINY, f"data.tokenizer.cache_dir={tok_cache}",
           "train.local_batch_size=2", "train.steps=3", "optim.warmup_steps=0", "optim.lr=0.001,0.003",
           "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for point in ("0", "1"):
        log = (sweep / point / "pretrain.log").read_text()
        assert "world 2 (submitit_local)" in log, log[-2000:]
        assert read_status(sweep / point)["status"] == "completed"
    rows = summarize(sweep)
    assert [(r["status"], r["step"], r["overrides"]) for r in rows] == [
        ("completed", 3, ["optim.lr=0.001"]), ("completed", 3, ["optim.lr=0.003"])], rows
    la, lb = ([m["loss"] for m in read_metrics(sweep / p)] for p in ("0", "1"))
    assert len(la) == len(lb) == 3 and la[0] == lb[0] and la[-1] != lb[-1]  # same start, its own lr
    out = cli(sweep)
    assert out.returncode == 0 and "optim.lr=0.001" in out.stdout and "optim.lr=0.003" in out.stdout, out.stdout
