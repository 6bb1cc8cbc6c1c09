"""What a job writes: metrics.jsonl fields, TensorBoard events read back, console lines."""
import math

from conftest import read_metrics, run_job

REQUIRED = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "mfu", "mem_gb")


def test_metrics_jsonl_tensorboard_and_console_agree(tmp_path, tok_cache):
    proc = run_job(tmp_path, ["logging.tensorboard=true", "train.local_batch_size=2", "train.steps=6",
                              "logging.every=2"], tok_cache=tok_cache)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 4, 6]  # first step, every 2nd, last
    for r in rows:
        for k in REQUIRED:
            assert k in r and math.isfinite(r[k]), k
        assert 0 < r["mfu"] < 1 and r["mem_gb"] > 0 and r["tokens_per_s"] > 0
    assert [r["tokens_seen"] for r in rows] == [64 * s for s in (1, 2, 4, 6)]
    assert rows[1]["lr"] == 1e-3  # warmup 2: peak reached at step 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    for k in REQUIRED[1:]:
        events = ea.Scalars(k)
        assert [e.step for e in events] == [r["step"] for r in rows]
        for e, r in zip(events, rows):
            assert math.isclose(e.value, r[k], rel_tol=1e-6), k

    out = proc.stdout + proc.stderr
    assert "step 6/6 | loss" in out and "tok/s" in out and "eta" in out
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "pretrain.log").is_file()
