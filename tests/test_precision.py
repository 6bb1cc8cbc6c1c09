"""Mixed precision and FSDP2 options on real 2-process runs."""
import math

from conftest import FSDP2, losses, read_metrics, run_job, run_worker


def test_bf16_params_under_fsdp_track_fp32(tmp_path, tok_cache, shared_run):
    fp32, bf16 = shared_run(*FSDP2)[0], tmp_path / "bf16"
    base = FSDP2[0]
    proc = run_job(bf16, base + ["train.mixed_precision=bf16"], tok_cache=tok_cache, nproc=2,
                   launcher="torchrun")
    assert "cpu bfloat16" in proc.stdout + proc.stderr
    a, b = losses(fp32), losses(bf16)
    assert a != b  # the bf16 path really computed in bf16
    # Measured: losses within 6.6e-5 relative, grad norms within 1.7e-3. bf16 rounds each
    # element by up to 2^-9 (~2e-3) relative, but the loss averages 128 tokens' fp32 log-softmax
    # over logits that FSDP's fp32 reduce and fp32 masters keep from drifting: 5e-4 is 8x the
    # measured gap. One step's loss change is 1e-2 to 2e-2 here, so a step that did not
    # update (or updated from bf16 masters) lands far outside it.
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=5e-4), (x, y)
    ga = [m["grad_norm"] for m in read_metrics(fp32)]
    gb = [m["grad_norm"] for m in read_metrics(bf16)]
    assert all(math.isclose(x, y, rel_tol=5e-3) for x, y in zip(ga, gb)), (ga, gb)
    assert b[0] - b[-1] > 0.8 * (a[0] - a[-1]) > 0.2  # it learned (fp32: 6.228 -> 5.950)


def test_reshard_after_forward_off_gives_same_losses(tmp_path, tok_cache, shared_run):
    on, off = shared_run(*FSDP2)[0], tmp_path / "off"
    run_job(off, ["train.local_batch_size=2", "parallel.reshard_after_forward=false"],
            tok_cache=tok_cache, nproc=2, launcher="torchrun")
    assert losses(on) == losses(off)


def test_reshard_after_forward_frees_the_gathered_weights():
    """tests/reshard_worker.py, 2 gloo processes: at the end of the forward, the blocks'
    parameters are their sharded halves when ``reshard_after_forward`` is on (all but the
    last block, whose backward comes first and keeps them), and the full gathered tensors
    when it is off."""
    rows = {r["reshard_after_forward"]: r["blocks"] for r in run_worker("reshard_worker.py")}
    full = [[32, 64], [64], [64, 64], [64, 128], [128, 64]]  # wk/wv, norms, wq/wo, w1/w3, w2 of dim 64
    assert rows[False] == {b: {"kinds": ["full"], "local_shapes": full} for b in ("block0", "block1")}
    assert rows[True]["block0"] == {"kinds": ["sharded"], "local_shapes": [[16, 64], [32], [32, 64], [32, 128],
                                                                           [64, 64]]}
    assert rows[True]["block1"] == rows[False]["block1"]
