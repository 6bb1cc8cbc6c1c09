"""Mixed precision and FSDP2 options on real 2-process runs."""
import math

from conftest import losses, run_job


def test_bf16_params_under_fsdp_track_fp32(tmp_path, tok_cache):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    base = ["train.local_batch_size=2"]
    run_job(fp32, base, tok_cache=tok_cache, nproc=2, launcher="torchrun")
    proc = run_job(bf16, base + ["train.mixed_precision=bf16"], tok_cache=tok_cache, nproc=2,
                   launcher="torchrun")
    assert "cpu bfloat16" in proc.stdout + proc.stderr
    a, b = losses(fp32), losses(bf16)
    assert a != b  # the bf16 path really computed in bf16
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=2e-2), (x, y)  # bf16 has 8 mantissa bits


def test_reshard_after_forward_off_gives_same_losses(tmp_path, tok_cache):
    on, off = tmp_path / "on", tmp_path / "off"
    run_job(on, ["train.local_batch_size=2"], tok_cache=tok_cache, nproc=2, launcher="torchrun")
    run_job(off, ["train.local_batch_size=2", "parallel.reshard_after_forward=false"],
            tok_cache=tok_cache, nproc=2, launcher="torchrun")
    assert losses(on) == losses(off)
