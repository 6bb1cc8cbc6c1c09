"""`make demo`'s job, run as the Makefile runs it: two processes under FSDP2 on the
standard library's sources; its loss must fall by at least 40%."""
import sys

from conftest import read_metrics, run_job


def test_demo_trains_and_says_where_its_logs_are(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_job(run_dir, ["experiment=demo"], tok_cache=str(tmp_path / "tok"), nproc=2,
                   launcher="torchrun", tiny=False, timeout=600)
    rows = read_metrics(run_dir)
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 400
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(f"demo loss {first:.3f} -> {last:.3f} ({100 * (1 - last / first):.1f}% lower)", file=sys.stderr)
    assert last <= 0.6 * first
    out = proc.stdout + proc.stderr
    assert f"metrics {run_dir / 'metrics.jsonl'}" in out
    assert f"tensorboard {run_dir / 'tb'}" in out
    assert "world 2 (torchrun)" in out and "dp_shard=2" in out
