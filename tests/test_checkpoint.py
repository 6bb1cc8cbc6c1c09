"""Checkpoints through real jobs: SIGKILL and exact resume, a kill during a save,
SIGUSR1 preemption (also under torchrun --max-restarts), resharding to another layout,
async saves, weights-only starts and clear errors."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, REPO, TINY, _env, free_port, losses, read_metrics, run_job

DET = ["train.deterministic=true", "optim.schedule=constant", "optim.warmup_steps=0", "train.seq_len=64",
       "model.dim=128", "model.ffn_hidden_dim=256", "logging.every=1"]

# A model whose checkpoint takes a while to write (~11M parameters, ~130 MB with AdamW).
BIG = ["model.dim=512", "model.ffn_hidden_dim=2048", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4",
       "train.local_batch_size=2", "train.seq_len=32"]


def start_job(run_dir: Path, overrides, tok_cache: str, nproc: int = 2, max_restarts: int = 0) -> subprocess.Popen:
    """The job in the background: under torchrun, or ``nproc=1`` as one plain process."""
    args = [*TINY, f"data.tokenizer.cache_dir={tok_cache}", *overrides, f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "pretrain", *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--max-restarts",
               str(max_restarts), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain",
               *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(cond, proc, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc={proc.returncode}) before the condition:\n{proc.stdout.read()[-3000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.02)


def logged_steps(run_dir: Path):
    try:
        return [m["step"] for m in read_metrics(run_dir)]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def last_per_step(run_dir: Path):
    """step -> loss, the last record of each step (a resumed run logs steps again)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def worker_pids(pid: int):
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (they run in process groups of their own)."""
    workers = worker_pids(proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in workers:  # reaped by nobody once torchrun is gone: wait until they vanish
        while Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text():
            time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tok_cache):
    run = tmp_path_factory.mktemp("ref") / "run"
    run_job(run, [*DET, "train.steps=30"], tok_cache=tok_cache, nproc=2, launcher="torchrun")
    return last_per_step(run)


def test_sigkill_mid_interval_resumes_bit_identically(reference, tmp_path, tok_cache):
    run = tmp_path / "run"
    proc = start_job(run, [*DET, "train.steps=30", "checkpoint.interval=10"], tok_cache)
    wait_for(lambda: max(logged_steps(run), default=0) >= 14, proc)
    kill_all(proc)
    killed_at = max(logged_steps(run))
    assert killed_at % 10 != 0 and killed_at < 30, killed_at
    proc = run_job(run, [*DET, "train.steps=30", "checkpoint.interval=10"], tok_cache=tok_cache, nproc=2,
                   launcher="torchrun")
    assert f"resumed from step {killed_at // 10 * 10}" in proc.stdout + proc.stderr
    assert last_per_step(run) == reference  # every step, bit for bit, including those redone


def test_kill_during_a_save_falls_back_to_the_previous_checkpoint(tmp_path, tok_cache):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    big = [*BIG, "checkpoint.interval=3", "checkpoint.keep_last=0", "train.steps=12"]
    proc = start_job(run, big, tok_cache)
    wait_for(lambda: (ckpts / "step-3").is_dir() and any(ckpts.glob("step-6.partial")), proc)
    kill_all(proc)
    assert (ckpts / "step-6.partial").is_dir() and not (ckpts / "step-6").exists()
    out = run_job(run, big, tok_cache=tok_cache, nproc=2, launcher="torchrun")
    text = out.stdout + out.stderr
    assert "removing incomplete checkpoint" in text and "resumed from step 3" in text
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-12", "step-3", "step-6", "step-9"]


def test_sigusr1_checkpoints_exits_3_and_the_rerun_continues(reference, tmp_path, tok_cache):
    run = tmp_path / "run"
    proc = start_job(run, [*DET, "train.steps=30"], tok_cache)  # no periodic checkpoints
    wait_for(lambda: max(logged_steps(run), default=0) >= 5, proc)
    for pid in worker_pids(proc.pid):
        os.kill(pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    # Both workers exited 3; torchrun itself reports a worker failure with 1.
    assert proc.returncode == 1 and out.count("exitcode: 3") >= 1, out[-3000:]
    assert "stopping at step" in out and "SIGUSR1" in out
    saved = sorted((run / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("step-")
    st = json.loads((run / "status.json").read_text())
    assert (st["status"], st["exit_code"], st["signal"], st["step"]) == ("preempted", 3, "SIGUSR1",
                                                                         int(saved[0].name[5:]))
    run_job(run, [*DET, "train.steps=30"], tok_cache=tok_cache, nproc=2, launcher="torchrun")
    assert last_per_step(run) == reference


def test_sigusr1_under_torchrun_max_restarts_resumes_by_itself(reference, tmp_path, tok_cache):
    """torchrun restarts the workers after exit 3; the new attempt finds the checkpoint
    and finishes the curve of the uninterrupted run, with no second command."""
    run = tmp_path / "run"
    proc = start_job(run, [*DET, "train.steps=30"], tok_cache, max_restarts=1)
    wait_for(lambda: max(logged_steps(run), default=0) >= 5, proc)
    for pid in worker_pids(proc.pid):
        os.kill(pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert "exitcode: 3" in out and "stopping at step" in out and "resumed from step" in out
    assert last_per_step(run) == reference


def test_signals_during_the_save_change_nothing(tmp_path, tok_cache):
    """SIGUSR1 asks for a checkpoint; SIGUSR1 and SIGTERM again while that save is being
    written (its .partial dir exists, a ~130 MB save) neither abort it nor change the exit."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    p = start_job(run, [*BIG, "train.steps=400"], tok_cache, nproc=1)
    wait_for(lambda: max(logged_steps(run), default=0) >= 2, p)
    p.send_signal(signal.SIGUSR1)
    wait_for(lambda: any(ckpts.glob("*.partial")), p, timeout=60)
    p.send_signal(signal.SIGUSR1)
    p.send_signal(signal.SIGTERM)
    during = any(ckpts.glob("*.partial"))  # the signals went in while the save was still being written
    out, _ = p.communicate(timeout=120)
    assert during, "the save finished before the second signals were sent"
    assert p.returncode == 3, out[-3000:]
    (saved,) = ckpts.iterdir()
    assert (saved / "meta.json").is_file() and int(saved.name[5:]) == max(logged_steps(run))
    st = json.loads((run / "status.json").read_text())
    assert (st["status"], st["exit_code"], st["signal"]) == ("preempted", 3, "SIGUSR1")


def test_single_process_sigterm_exits_3_after_its_checkpoint(tmp_path, tok_cache):
    run = tmp_path / "single"
    p = start_job(run, [*DET, "train.steps=400"], tok_cache, nproc=1)
    wait_for(lambda: max(logged_steps(run), default=0) >= 3, p)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 3, out[-2000:]  # EXIT_PREEMPTED
    (saved,) = (run / "checkpoints").iterdir()
    assert int(saved.name[5:]) == max(logged_steps(run)) < 400


def test_resume_under_another_layout_matches(tmp_path, tok_cache):
    """FSDP2 over 2 ranks x 4 rows, checkpoint at step 3, resumed as one process x 8 rows
    (the same global batch): steps 4-6 equal the uninterrupted 2-rank run within 1e-5."""
    common = ["optim.schedule=constant", "optim.warmup_steps=0", "train.local_batch_size=4",
              "data.streams_per_row=2"]
    full = tmp_path / "full"
    run_job(full, [*common, "train.steps=6"], tok_cache=tok_cache, nproc=2, launcher="torchrun")
    run = tmp_path / "run"
    run_job(run, [*common, "train.steps=3", "checkpoint.interval=3"], tok_cache=tok_cache, nproc=2,
            launcher="torchrun")
    out = run_job(run, [*common, "train.steps=6", "train.local_batch_size=8"], tok_cache=tok_cache)
    assert "resumed from step 3" in out.stdout + out.stderr
    a, b = last_per_step(full), last_per_step(run)
    for s in (4, 5, 6):
        assert math.isclose(a[s], b[s], rel_tol=1e-5), (s, a[s], b[s])


def test_async_saves_commit_and_resume_exactly(reference, tmp_path, tok_cache):
    run = tmp_path / "run"
    run_job(run, [*DET, "train.steps=20", "checkpoint.interval=4", "checkpoint.async_save=true",
                  "checkpoint.keep_last=0"], tok_cache=tok_cache, nproc=2, launcher="torchrun")
    assert sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir()) == [4, 8, 12, 16, 20]
    out = run_job(run, [*DET, "train.steps=30", "checkpoint.interval=4", "checkpoint.async_save=true"],
                  tok_cache=tok_cache, nproc=2, launcher="torchrun")
    assert "resumed from step 20" in out.stdout + out.stderr
    assert last_per_step(run) == reference


def test_weights_only_start_and_clear_errors(tmp_path, tok_cache):
    src = tmp_path / "src"
    run_job(src, ["train.steps=40", "checkpoint.interval=40", "optim.lr=3e-3"], tok_cache=tok_cache)
    ckpt = src / "checkpoints" / "step-40"
    warm = tmp_path / "warm"
    out = run_job(warm, ["train.steps=2", f"checkpoint.load_path={ckpt}", "checkpoint.load_weights_only=true"],
                  tok_cache=tok_cache, nproc=2, launcher="torchrun")
    assert "initialized weights from" in out.stdout + out.stderr
    assert [m["step"] for m in read_metrics(warm)] == [1, 2]
    # trained weights, not a fresh init (src's first loss: the same init and batch, before an update)
    assert losses(warm)[0] < losses(src)[0] - 0.3

    bad = run_job(tmp_path / "shape", ["train.steps=2", "model.dim=96", "model.ffn_hidden_dim=192",
                                       f"checkpoint.load_path={ckpt}", "checkpoint.load_weights_only=true"],
                  tok_cache=tok_cache, check=False)
    assert bad.returncode == 4
    assert "model.tok_embeddings.weight has shape [512, 64] in the checkpoint but [512, 96]" in bad.stderr

    (ckpt / ".metadata").unlink()
    bad = run_job(tmp_path / "corrupt", ["train.steps=2", f"checkpoint.load_path={ckpt}"], tok_cache=tok_cache,
                  check=False)
    assert bad.returncode == 4 and str(ckpt / ".metadata") in bad.stderr
    bad = run_job(tmp_path / "missing", ["train.steps=2", f"checkpoint.load_path={tmp_path / 'nope'}"],
                  tok_cache=tok_cache, check=False)
    assert bad.returncode == 4 and "no such checkpoint directory" in bad.stderr


def test_a_failed_job_leaves_its_async_save_uncommitted(tmp_path, monkeypatch, caplog):
    """Training fails while an async save is being written: Checkpointer.abandon (the
    trainer's failure path) leaves it as .partial, never step-N, even once its writes end;
    the newest complete checkpoint stays the one to resume from."""
    import pretrain.checkpoint.manager as man
    from pretrain.checkpoint import Checkpointer, complete_checkpoints
    from pretrain.config import CheckpointConfig

    release = threading.Event()
    real = man.CrcWriter.write_data

    def slow(self, plan, planner):
        release.wait(30)  # the background write is still going when training fails
        return real(self, plan, planner)

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path, CheckpointConfig(interval=1, async_save=True), rank=0, world_size=1)
    ckpt.save(1, 10, model, opt, blocking=True)
    monkeypatch.setattr(man.CrcWriter, "write_data", slow)
    ckpt.save(2, 20, model, opt)
    with caplog.at_level("WARNING", logger="pretrain"):
        partial = ckpt.abandon()
    assert partial == tmp_path / "step-2.partial" and partial.is_dir()
    assert "async save of step 2 in flight: not committed" in caplog.text
    release.set()
    ckpt.wait()  # nothing pending any more: no commit happens later either
    # What the next start resumes from (its removal of .partial dirs: test_distributed's resume test).
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1] and not (tmp_path / "step-2").exists()


def test_cuda_rng_is_this_process_device_only(tmp_path, monkeypatch):
    """The RNG file holds this process's CUDA device's state only, and restores it onto the
    current device whatever its index (torchrun with 8 visible GPUs, then srun
    --gpus-per-task=1: device 5 became device 0). An older file with one state per visible
    GPU loads on a process that sees fewer (it raised IndexError) with a warning."""
    from pretrain.checkpoint import files

    mine = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [mine.clone()] * 8)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    (tmp_path / "rng").mkdir()
    files.save_rng(tmp_path / "rng" / "rank-5.pt")
    saved = torch.load(tmp_path / "rng" / "rank-5.pt", weights_only=True)
    assert torch.equal(saved["cuda"], mine)  # one device's state, not every visible GPU's
    files.load_rng(tmp_path / "rng" / "rank-5.pt")
    assert len(restored) == 1 and torch.equal(restored[0][0], mine) and restored[0][1] == "cuda"  # current device

    old = {**saved, "cuda": [mine.clone(), mine.clone()]}  # an older version's per-GPU list
    torch.save(old, tmp_path / "rng" / "rank-6.pt")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    files.load_rng(tmp_path / "rng" / "rank-6.pt")
    assert len(restored) == 2
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    files.load_rng(tmp_path / "rng" / "rank-6.pt")  # device 3 of a 2-GPU list: kept, said, no IndexError
    assert len(restored) == 2
    for bad in ("x", [], [1, 2], [mine.float()], mine.reshape(4, 4), {0: mine}):  # crafted entries
        torch.save({**saved, "cuda": bad}, tmp_path / "rng" / "rank-7.pt")
        with pytest.raises(files.CheckpointError, match=r"rank-7.pt: its 'cuda' entry is not a CUDA RNG state"):
            files.load_rng(tmp_path / "rng" / "rank-7.pt")
    assert len(restored) == 2


def test_async_saves_reuse_one_stager_and_save_the_current_values(tmp_path):
    """Async saves stage through one stager made once (its host copies are reused by every
    later save): each checkpoint still holds the values at its own step."""
    import torch.distributed.checkpoint as dcp

    from pretrain.checkpoint import Checkpointer
    from pretrain.config import CheckpointConfig

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(tmp_path, CheckpointConfig(interval=1, async_save=True, keep_last=0), rank=0, world_size=1)
    stagers, weights = [], {}
    for step in (1, 2, 3):
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        weights[step] = model.weight.detach().clone()
        ckpt.save(step, step, model, opt)
        stagers.append(ckpt._stager)
        ckpt.wait()
    assert stagers[0] is not None and stagers[0] is stagers[1] is stagers[2]
    for step, want in weights.items():
        state = {"model": {"weight": torch.empty(4, 4), "bias": torch.empty(4)}}
        dcp.load(state, checkpoint_id=str(tmp_path / f"step-{step}"), no_dist=True)
        assert torch.equal(state["model"]["weight"], want), step
    assert not torch.equal(weights[1], weights[3])
    ckpt.close()


def test_rng_streams_round_trip_through_the_checkpoint_file(tmp_path):
    """Python's, numpy's and torch's CPU generators saved by a checkpoint (``rng/rank-<r>.pt``)
    and restored after other draws continue exactly where they were saved (the CUDA stream:
    ``test_cuda_rng_is_this_process_device_only``)."""
    import random

    import numpy as np

    from pretrain.checkpoint import files

    def draw():
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), \
            torch.rand(3).tolist(), torch.randn(()).item()

    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    draw()  # one numpy gaussian drawn: the second of its pair is cached, saved and restored too
    (tmp_path / "rng").mkdir()
    files.save_rng(tmp_path / "rng" / "rank-0.pt")
    want = draw()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    assert draw() != want
    files.load_rng(tmp_path / "rng" / "rank-0.pt")
    assert draw() == want


@pytest.mark.parametrize("model_file", ["debug", "mllama_debug"])
def test_resume_compares_every_field_that_changes_the_trained_function(model_file):
    """``fit.check_fits``, field by field over the family's args: a changed field that
    changes the trained function (shapes, RoPE, norm eps, tie, the vision tower's) is a
    mismatch naming it; the fields declared ``resume=False`` (name, init_std, init_from,
    max_position_embeddings, max_images) are not."""
    import copy
    import dataclasses

    from pretrain.checkpoint import CheckpointMismatch
    from pretrain.checkpoint.fit import check_fits
    from tests.conftest import compose_job

    args = compose_job(f"model={model_file}").model
    meta = {"model": dataclasses.asdict(args), "freeze": []}
    check_fits("ck", meta, args, None, [])
    free = {f.name for f in dataclasses.fields(args) if not f.metadata.get("resume", True)}
    assert {"name", "init_std", "init_from", "max_position_embeddings"} <= free
    for f in dataclasses.fields(args):
        now = copy.deepcopy(args)
        v = getattr(now, f.name)
        if f.name == "family":
            continue  # its own case below
        if f.name == "rope_scaling":
            setattr(now, f.name, None)
        elif isinstance(v, bool):
            setattr(now, f.name, not v)
        elif isinstance(v, (int, float)) or v is None:
            setattr(now, f.name, (v or 2) * 2 if f.name != "init_from" else "/models/x")
        elif isinstance(v, str):
            setattr(now, f.name, v + "x")
        elif isinstance(v, list):
            setattr(now, f.name, v[:-1])
        else:
            raise AssertionError(f"no change made for {f.name}")
        if f.name in free:
            check_fits("ck", meta, now, None, [])
        else:
            with pytest.raises(CheckpointMismatch, match=rf"model\.{f.name}="):
                check_fits("ck", meta, now, None, [])
    # head_dim spelled out as what null resolves to (dim // n_heads) is the same model.
    same = copy.deepcopy(args)
    same.head_dim = args.resolved_head_dim
    check_fits("ck", meta, same, None, [])
    # The family by the name the tree knows: an import path naming it, recorded by an earlier
    # version, is the same family (read as text: meta.json never makes a module import).
    check_fits("ck", {**meta, "model": {**meta["model"], "family": f"pretrain.model.{args.family}:FAMILY"}}, args,
               None, [])
    with pytest.raises(CheckpointMismatch, match="model.family"):
        check_fits("ck", {**meta, "model": {**meta["model"], "family": "tests.toy_family:FAMILY"}}, args, None, [])
    import sys

    before = set(sys.modules)
    with pytest.raises(CheckpointMismatch, match="model.family"):
        check_fits("ck", {**meta, "model": {**meta["model"], "family": "evil_module_xyz:FAMILY"}}, args, None, [])
    assert "evil_module_xyz" not in set(sys.modules) - before


def test_resume_compares_lora_and_the_frozen_towers():
    from pretrain.checkpoint import CheckpointMismatch
    from pretrain.checkpoint.fit import check_fits
    from tests.conftest import compose_job

    args = compose_job("model=mllama_debug").model
    lora = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["wq", "wk", "w1"], "base": "/hf/a", "seed": 0}
    meta = {"model": None, "lora": lora, "freeze": ["vision"]}
    check_fits("ck", meta, args, {**lora, "dropout": 0.3}, ["vision"])  # dropout does not change the function
    check_fits("ck", meta, args, lora, ["vision", "text"])  # freezing more: fine
    for change, key in [({"rank": 8}, "finetune.lora.rank"), ({"alpha": 16.0}, "finetune.lora.alpha"),
                        ({"targets": ["wq", "wk"]}, "finetune.lora.target_modules"),
                        ({"base": None}, r"model.init_from=None \(the checkpoint's adapters were trained on "
                                         r"'/hf/a'")]:
        with pytest.raises(CheckpointMismatch, match=key):
            check_fits("ck", meta, args, {**lora, **change}, ["vision"])
    # The base copied elsewhere (a node's local disk): the same content, another path; other
    # weights under the same path are another base.
    fp = {"base_fingerprint": "abc"}
    check_fits("ck", {**meta, "lora": {**lora, **fp}}, args, {**lora, **fp, "base": "/local/a"}, ["vision"])
    with pytest.raises(CheckpointMismatch, match="model.init_from='/local/a'"):
        check_fits("ck", {**meta, "lora": {**lora, **fp}}, args, {**lora, "base": "/local/a",
                                                                  "base_fingerprint": "abd"}, ["vision"])
    with pytest.raises(CheckpointMismatch, match="model.init_from='/hf/a'.*config.json and weight headers were"):
        check_fits("ck", {**meta, "lora": {**lora, **fp}}, args, {**lora, "base_fingerprint": "abd"}, ["vision"])
    with pytest.raises(CheckpointMismatch, match="train.seed=1"):
        check_fits("ck", {**meta, "lora": {**lora, "base": None}}, args, {**lora, "base": None, "seed": 1},
                   ["vision"])
    with pytest.raises(CheckpointMismatch, match=r"finetune.lora.rank=0 \(the checkpoint: 4"):
        check_fits("ck", meta, args, None, ["vision"])
    with pytest.raises(CheckpointMismatch, match=r"finetune.freeze=\[\] \(the checkpoint: \['vision'\]; vision"):
        check_fits("ck", meta, args, lora, [])


def test_resume_false_keeps_a_load_path_it_sets_aside_and_a_restart_resumes(tmp_path, monkeypatch):
    """checkpoint.resume=false with a checkpoint.load_path inside the run dir: the set-aside
    moved it, then "no such checkpoint directory"; the path follows its checkpoint now. A
    restart of the same job (torchrun --max-restarts, a SLURM requeue) with resume=false
    set aside its own first attempt's checkpoints and started over; it resumes them now."""
    from pretrain.checkpoint import CheckpointError, Checkpointer
    from pretrain.config import CheckpointConfig

    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    first = Checkpointer(tmp_path, CheckpointConfig(interval=1, keep_last=0), rank=0, world_size=1)
    for step in (1, 2):
        first.save(step, step, model, opt, blocking=True)
    want = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    cfg = CheckpointConfig(resume=False, load_path=str(tmp_path / "step-2"), load_weights_only=True)
    assert Checkpointer(tmp_path, cfg, rank=0, world_size=1).maybe_resume(model, opt)[0] == 0
    (earlier,) = tmp_path.glob("earlier-*")
    assert sorted(p.name for p in earlier.iterdir()) == ["step-1", "step-2"] and torch.equal(model.weight, want)
    first.save(3, 3, model, opt, blocking=True)  # the new run's own
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(CheckpointError, match=r"step-3 has no loader/ state"):  # it resumes step-3 (a bare test save)
        Checkpointer(tmp_path, CheckpointConfig(resume=False), rank=0, world_size=1).maybe_resume(model, opt)
    assert len(list(tmp_path.glob("earlier-*"))) == 1 and (tmp_path / "step-3").is_dir()
