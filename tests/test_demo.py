"""`make demo`'s job, run as the Makefile runs it: two processes under FSDP2 on the
standard library's sources; its loss must fall by at least 40%."""
import sys

from conftest import BIN, REPO, _env, free_port, read_metrics
import subprocess


def test_demo_trains_and_says_where_its_logs_are(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "pretrain", "experiment=demo",
           f"data.tokenizer.cache_dir={tmp_path / 'tok'}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 400
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"demo loss {first:.3f} -> {last:.3f} ({100 * (1 - last / first):.1f}% lower)", file=sys.stderr)
    assert last <= 0.6 * first
    out = proc.stdout + proc.stderr
    assert f"metrics {tmp_path / 'run' / 'metrics.jsonl'}" in out
    assert f"tensorboard {tmp_path / 'run' / 'tb'}" in out
    assert "world 2 (torchrun)" in out and "dp_shard=2" in out
