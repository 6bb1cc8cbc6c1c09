"""What a job writes: metrics.jsonl fields, TensorBoard events read back, console lines."""
import math
import re

from conftest import TINY, compose_job, read_metrics, run_job
from pretrain.model.llama import FAMILY

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
    # MFU from its formula: the family's FLOPs per token x tokens/s / (peak x devices), the
    # peak from the CPU probe (about 0.1-2 TFLOP/s on a CPU core or two, fp32).
    fpt, peak = (float(x) for x in re.search(
        r"MFU = (\S+) FLOPs/token x tokens/s / \((\S+) FLOP/s peak per device, from a CPU fp32 matmul probe "
        r"x 1 devices\)", out).groups())
    cfg = compose_job(*TINY, "train.local_batch_size=2")
    assert fpt == FAMILY.flops_per_token(cfg.model, cfg.train.seq_len) and 1e9 < peak < 1e13
    for r in rows:
        assert math.isclose(r["mfu"], fpt * r["tokens_per_s"] / peak, rel_tol=1e-9), r
    # logging.every=2: each row's loss is the mean of the per-step losses since the last
    # row (the same run logging every step gives them).
    each = tmp_path / "every1"
    run_job(each, ["train.local_batch_size=2", "train.steps=6"], tok_cache=tok_cache)
    per_step = {r["step"]: r["loss"] for r in read_metrics(each)}
    assert len(per_step) == 6
    windows = {1: [1], 2: [2], 4: [3, 4], 6: [5, 6]}
    for r in rows:
        mean = sum(per_step[s] for s in windows[r["step"]]) / len(windows[r["step"]])
        assert math.isclose(r["loss"], mean, rel_tol=1e-6), (r["step"], r["loss"], mean)
    assert rows[2]["loss"] not in (per_step[3], per_step[4])  # a real average, not one step's
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "pretrain.log").is_file()


def test_logging_every_null_is_every_step_on_cpu_and_every_10th_on_cuda():
    """The default: CPU runs (the demo, the tests) log every step; CUDA runs every 10th, so
    the host reads nothing back from the device on 9 steps of 10 (tests/test_train_step.py)."""
    import torch

    from pretrain.observe.metrics import LogWindow, log_every

    assert compose_job().logging.every is None
    assert log_every(None, torch.device("cpu")) == 1 and log_every(None, torch.device("cuda", 0)) == 10
    assert log_every(3, torch.device("cuda", 0)) == 3
    w = LogWindow(torch.device("cpu"), every=log_every(None, torch.device("cuda", 0)), start_step=0, total_steps=25)
    assert [s for s in range(1, 26) if w.due(s, evaluated=False)] == [1, 10, 20, 25]
