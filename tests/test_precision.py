"""Mixed precision and FSDP2 options on real 2-process runs."""
import math

from conftest import FSDP2, losses, run_job


def test_bf16_params_under_fsdp_track_fp32(tmp_path, tok_cache, shared_run):
    fp32, bf16 = shared_run(*FSDP2)[0], tmp_path / "bf16"
    base = FSDP2[0]
    proc = run_job(bf16, base + ["train.mixed_precision=bf16"], tok_cache=tok_cache, nproc=2,
                   launcher="torchrun")
    assert "cpu bfloat16" in proc.stdout + proc.stderr
    a, b = losses(fp32), losses(bf16)
    assert a != b  # the bf16 path really computed in bf16
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=2e-2), (x, y)  # bf16 has 8 mantissa bits


def test_reshard_after_forward_off_gives_same_losses(tmp_path, tok_cache, shared_run):
    on, off = shared_run(*FSDP2)[0], tmp_path / "off"
    run_job(off, ["train.local_batch_size=2", "parallel.reshard_after_forward=false"],
            tok_cache=tok_cache, nproc=2, launcher="torchrun")
    assert losses(on) == losses(off)
