"""The platform against hostile or unlucky input, one test per class of failure (the
README's "Reliability" section). Each ends in a clear error naming the key or file, or a
counted skip, with status.json telling the truth, the same exit code on every rank, and
nothing left waiting. The data-side classes (records that never yield a document,
oversized records, files deleted mid-run) are in tests/test_hostile_data.py.

Checkpoints here come from real runs; crafted files are made from them and given a
manifest that matches (sizes and CRC32s), so it is the reader that must refuse them."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.files import meta_text
from tests.conftest import BIN, REPO, TINY, _env, free_port, read_metrics, run_job

DET = ["train.deterministic=true", "optim.schedule=constant", "optim.warmup_steps=0", "logging.every=1"]


class Payload:
    """Pickles as a call of os.system: whoever unpickles it runs the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def start(run: Path, overrides, tok_cache: str, *, launcher: str = "single", nproc: int = 2,
          env=None) -> subprocess.Popen:
    args = [*TINY, f"data.tokenizer.cache_dir={tok_cache}", *overrides, f"hydra.run.dir={run}"]
    if launcher == "single":
        cmd = [sys.executable, "-m", "pretrain", *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "pretrain", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_steps(run: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if len(read_metrics(run)) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"job ended (rc={proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for steps")


def srun_tasks(run: Path, overrides, tok_cache: str, nproc: int, only=None):
    """What `srun --ntasks nproc` starts (the entry point reads SLURM_*), one Popen per
    task; ``only``: start just these ranks (a missing peer)."""
    port = free_port()
    procs = []
    for rank in (only if only is not None else range(nproc)):
        env = {"SLURM_JOB_ID": "4243", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_NODEID": "0", "SLURM_STEP_NUM_TASKS": str(nproc), "SLURM_NTASKS": str(nproc),
               "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost",
               "SLURM_STEP_TASKS_PER_NODE": str(nproc), "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pretrain", *TINY, f"data.tokenizer.cache_dir={tok_cache}", *overrides,
             f"hydra.run.dir={run}"], cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    return procs


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory, tok_cache):
    """One process, 4 deterministic steps, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    run_job(run, [*DET, "train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=0"], tok_cache=tok_cache)
    return run


def refresh_manifest(ckpt: Path) -> None:
    """Recompute meta.json's sizes and CRC32s from the files as they are now."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {}
    for f in sorted(ckpt.rglob("*")):
        rel = str(f.relative_to(ckpt))
        if f.is_file() and rel != "meta.json":
            data = f.read_bytes()
            meta["files"][rel] = [len(data), zlib.crc32(data)]
    (ckpt / "meta.json").write_text(meta_text(meta))  # a crafter recomputes meta.json's own CRC32 too


def crafted_bytes_entry(src: Path, dst: Path, marker: Path) -> None:
    """``src`` rewritten by DCP with one optimizer hyperparameter (a pickled non-tensor
    entry of the .distcp file) replaced by a payload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata  # our own file: trusted here
    flat = {k: (0 if isinstance(v, BytesStorageMetadata) else torch.empty(tuple(v.size), dtype=v.properties.dtype))
            for k, v in md.items()}
    dcp.load(flat, checkpoint_id=str(src), no_dist=True)
    victim = next(k for k in flat if k.startswith("optim.param_groups.") and k.endswith(".lr"))
    flat[victim] = Payload(marker)
    dcp.save(flat, checkpoint_id=str(dst), no_dist=True)
    for sub in ("meta.json", "loader", "rng"):
        (shutil.copytree if (src / sub).is_dir() else shutil.copy)(src / sub, dst / sub)


@pytest.mark.parametrize("victim", ["rng/rank-0.pt", ".metadata", "__0_0.distcp"])
def test_crafted_checkpoint_file_runs_nothing(ckpt_run, tmp_path, tok_cache, victim):
    """A pickle payload in the RNG file, in DCP's .metadata, or in a non-tensor entry of a
    .distcp file: the job refuses it naming the file (exit 4, status failed) and the
    payload never runs."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step-4"
    src = ckpt_run / "checkpoints" / "step-4"
    if victim == "__0_0.distcp":
        crafted_bytes_entry(src, ckpt, marker)
    else:
        shutil.copytree(src, ckpt)
        if victim == ".metadata":
            (ckpt / victim).write_bytes(pickle.dumps(Payload(marker)))
        else:
            torch.save({"python": Payload(marker)}, ckpt / victim)
    refresh_manifest(ckpt)
    run = tmp_path / "run"
    out = run_job(run, [*DET, "train.steps=6", f"checkpoint.load_path={ckpt}"], tok_cache=tok_cache, check=False)
    assert out.returncode == 4, out.stderr[-3000:]
    assert str(ckpt / victim) in out.stderr and "refused" in out.stderr, out.stderr[-3000:]
    assert not marker.exists()
    assert status(run)["status"] == "failed" and status(run)["exit_code"] == 4


def test_corrupt_checkpoint_falls_back_to_the_previous_one(ckpt_run, tmp_path, tok_cache):
    """A truncated .distcp in the newest checkpoint of the run dir: moved aside to
    step-4.corrupt with a warning, the run resumes from step 2 and redoes steps 3-4 bit
    for bit. With no earlier checkpoint, exit 4 naming the file and what to do."""
    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run, ignore=shutil.ignore_patterns(".lock", "status.json"))
    data = run / "checkpoints" / "step-4" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    out = run_job(run, [*DET, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=0"],
                  tok_cache=tok_cache)
    text = out.stdout + out.stderr
    assert "is unusable" in text and str(data) in text and "resumed from step 2" in text, text[-3000:]
    assert (run / "checkpoints" / "step-4.corrupt").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-4.corrupt",
                                                                        "step-6"]
    redone = {m["step"]: m["loss"] for m in read_metrics(run)}
    first = {m["step"]: m["loss"] for m in read_metrics(ckpt_run)}
    assert redone[3] == first[3] and redone[4] == first[4]

    only = tmp_path / "only"
    shutil.copytree(ckpt_run, only, ignore=shutil.ignore_patterns(".lock", "status.json", "step-2"))
    (only / "checkpoints" / "step-4" / ".metadata").write_bytes(b"\x80\x04garbage")
    bad = run_job(only, [*DET, "train.steps=6"], tok_cache=tok_cache, check=False)
    assert bad.returncode == 4, bad.stderr[-3000:]
    assert str(only / "checkpoints" / "step-4" / ".metadata") in bad.stderr
    assert "No earlier complete checkpoint" in bad.stderr and "to fall back to" in bad.stderr
    assert (only / "checkpoints" / "step-4").is_dir()  # left where it is for the user to decide
    assert status(only)["exit_code"] == 4


def test_damaged_data_file_without_manifest_exits_4(ckpt_run, tmp_path, tok_cache):
    """A checkpoint of an older version (no manifest): a .distcp cut short is named from
    the metadata's offsets; one overwritten in the middle (same size) fails inside DCP,
    whose CheckpointException (a BaseException) ends as exit 4 naming the file, not
    exit 1."""
    ckpt = tmp_path / "step-4"
    shutil.copytree(ckpt_run / "checkpoints" / "step-4", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"], meta["meta_crc"]  # as an older version wrote it
    (ckpt / "meta.json").write_text(json.dumps(meta))
    data = ckpt / "__0_0.distcp"
    whole = data.read_bytes()
    data.write_bytes(whole[:1000])
    out = run_job(tmp_path / "run", [*DET, f"checkpoint.load_path={ckpt}"], tok_cache=tok_cache, check=False)
    assert out.returncode == 4 and f"{data}: 1000 bytes, but .metadata places" in out.stderr, out.stderr[-3000:]
    data.write_bytes(whole[:2000] + b"\xff" * 4096 + whole[6096:])
    out = run_job(tmp_path / "run2", [*DET, f"checkpoint.load_path={ckpt}"], tok_cache=tok_cache, check=False)
    assert out.returncode == 4 and f"{data}: entry" in out.stderr and "the file is damaged" in out.stderr, \
        out.stderr[-3000:]


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts small tmpfs file systems (this test runs as root, like CI); unmounted after."""
    mounted = []

    def mount(path: Path, size: str, ro: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tok_cache, tmpfs):
    """A 3 MB file system holds one checkpoint of the tiny model (1.8 MB) but not two: the
    second save fails naming its path and "disk full", its .partial is removed, step-2
    stays, status.json says failed with exit 4."""
    run = tmpfs(tmp_path / "small", "3m")
    out = run_job(run, [*DET, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=0"],
                  tok_cache=tok_cache, check=False)
    assert out.returncode == 4, out.stderr[-3000:]
    assert "step-4.partial failed" in out.stderr and "[Errno 28]" in out.stderr and "disk full" in out.stderr
    assert "step-2" in out.stderr  # the checkpoint that is kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert status(run)["status"] == "failed" and status(run)["exit_code"] == 4


def test_unwritable_run_dir_or_checkpoints_dir_exits_2_at_start(tmp_path, tok_cache, tmpfs):
    run = tmpfs(tmp_path / "ro", "1m", ro=True)
    out = run_job(run, ["train.steps=2"], tok_cache=tok_cache, check=False)
    assert out.returncode == 2 and f"hydra.run.dir='{run}': not writable" in out.stderr, out.stderr[-2000:]
    run2 = tmp_path / "rw"
    tmpfs(run2 / "checkpoints", "1m", ro=True)
    out = run_job(run2, ["train.steps=2"], tok_cache=tok_cache, check=False)
    assert out.returncode == 2 and f"the checkpoints dir {run2 / 'checkpoints'}" in out.stderr
    assert not (run2 / "metrics.jsonl").exists()  # stopped before the first step


def test_second_job_on_a_busy_run_dir_exits_2_on_every_rank_and_writes_nothing(tmp_path, tok_cache):
    run = tmp_path / "run"
    holder = start(run, [*DET, "train.steps=1000000"], tok_cache)  # runs until killed
    try:
        wait_steps(run, holder, 2)
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        procs = srun_tasks(run, [*DET, "train.steps=7"], tok_cache, nproc=2)
        outs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [2, 2], outs
        for out in outs:
            assert f"run dir {run} is in use by another job" in out and f"pid {holder.pid}" in out, out[-2000:]
        after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        assert set(after) == set(before)  # no new file
        for p in (".hydra/config.yaml", ".hydra/overrides.yaml", "status.json", ".lock"):
            assert after[run / p] == before[run / p], p
        assert b"train.steps=7" not in after[run / "pretrain.log"]
        assert status(run)["status"] == "running"
    finally:
        os.killpg(holder.pid, signal.SIGTERM)
        holder.communicate(timeout=120)
    assert holder.returncode == 3 and status(run)["status"] == "preempted"


def test_workers_die_with_a_killed_agent_and_a_restart_takes_the_lock(tmp_path, tok_cache):
    """SIGKILL to the torchrun agent (kill -9, the OOM killer): its workers, which run in
    sessions of their own, are gone within seconds (PR_SET_PDEATHSIG), and the next job on
    the run dir gets the lock and resumes."""
    run = tmp_path / "run"
    agent = start(run, [*DET, "train.steps=400", "checkpoint.interval=2"], tok_cache, launcher="torchrun")
    wait_steps(run, agent, 3)
    workers = [int(x) for t in Path(f"/proc/{agent.pid}/task").iterdir()
               for x in (t / "children").read_text().split()]
    assert len(workers) == 2
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    end = time.monotonic() + 10
    try:
        while any(map(alive, workers)) and time.monotonic() < end:
            time.sleep(0.05)
        assert not any(map(alive, workers)), "workers outlived their agent"
    finally:
        for w in filter(alive, workers):  # the orphans of a failed check: not left running
            os.kill(w, signal.SIGKILL)
    # Killed outright, no code ran: status.json still says running, with no end (README).
    st = status(run)
    assert st["status"] == "running" and not {"ended", "exit_code"} & st.keys(), st
    out = run_job(run, [*DET, "train.steps=6", "checkpoint.interval=2"], tok_cache=tok_cache, nproc=2,
                  launcher="torchrun")
    assert "resumed from step" in out.stdout + out.stderr
    assert status(run)["status"] == "completed"


def test_sigint_saves_and_exits_3_and_a_quick_second_one_changes_nothing(tmp_path, tok_cache):
    """Ctrl-C is a preemption: checkpoint at the step boundary, exit 3, status preempted;
    the rerun continues the same curve."""
    run = tmp_path / "run"
    proc = start(run, [*DET, "train.steps=400"], tok_cache)
    wait_steps(run, proc, 3)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGINT)  # within seconds of the first: ignored
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]
    (saved,) = (run / "checkpoints").iterdir()
    step = int(saved.name[5:])
    assert status(run)["status"] == "preempted" and status(run)["signal"] == "SIGINT" and status(run)["step"] == step
    ref = tmp_path / "ref"
    run_job(ref, [*DET, f"train.steps={step + 2}"], tok_cache=tok_cache)
    run_job(run, [*DET, f"train.steps={step + 2}"], tok_cache=tok_cache)
    assert {m["step"]: m["loss"] for m in read_metrics(run)} == {m["step"]: m["loss"] for m in read_metrics(ref)}


def test_second_sigint_after_a_pause_aborts(monkeypatch):
    """In the step loop a second SIGINT more than ABORT_AFTER_S after the first raises
    KeyboardInterrupt (a save that takes too long can be abandoned); in start-up any
    signal raises Interrupted at once."""
    from pretrain.runtime import signals as sg

    h = sg.SignalHandler()
    try:
        h.phase = "loop"
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert h.received and h.name == "SIGINT"
        monkeypatch.setattr(sg, "ABORT_AFTER_S", 0.0)
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
        h.phase = "setup"
        with pytest.raises(sg.Interrupted, match="SIGTERM during start-up"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        h.restore()  # before the watchdog's grace ends: it then exits nothing


def test_a_stop_signal_the_steps_cannot_reach_ends_the_job_after_its_deadline(tmp_path):
    """A stop signal in the step loop waits for the next step boundary; a step that never
    gets there (a data read of hundreds of MiB of blank lines, a peer that left) held the job
    for ever ("running" after 13 minutes). After checkpoint.stop_timeout_s seconds of
    "loop" phase (steps running) the watchdog ends it: exit 128 + signal, status failed
    naming the key. Time in "busy" (between steps: evaluation, logging, a periodic save)
    does not count, and once the loop acts on the signal ("stopping": its own save) the
    deadline is off."""
    # What the child says goes to a file in one write: twice in CI, under load, a child's
    # captured stdout came back empty although it had printed (exit codes as expected).
    out = tmp_path / "said"
    code = ("import os, signal, sys, time\n"
            "from pretrain.runtime.signals import SignalHandler\n"
            "def say(*a):\n"
            "    fd = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_APPEND); os.write(fd, (' '.join(map(str, a)) + '\\n').encode()); os.close(fd)\n"
            "h = SignalHandler(report=lambda state, code, **f: say('REPORT', state, code, f['error']))\n"
            "h.stop_timeout_s = 0.5\n"
            "h.phase = sys.argv[1]\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "t0 = time.monotonic()\n"
            "while time.monotonic() - t0 < float(sys.argv[2]): time.sleep(0.05)\n"
            "h.phase = 'loop' if sys.argv[1] == 'busy' else h.phase\n"
            "time.sleep(1.5); say('alive'); h.restore()\n")

    def run(phase, hold):
        out.unlink(missing_ok=True)
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-c", code, phase, str(hold), str(out)], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=60)
        took = time.monotonic() - t0
        return p, took, out.read_text() if out.exists() else "", (p.returncode, took, p.stdout, p.stderr[-2000:])

    p, took, said, everything = run("loop", 30)
    assert p.returncode == 128 + signal.SIGTERM and took < 10, everything
    assert "REPORT failed 143 Interrupted: SIGTERM: no step boundary within checkpoint.stop_timeout_s=0.5 s" in said, \
        (said, everything)
    p, took, said, everything = run("busy", 1.5)  # 1.5 s between steps, then 0.5 s of a step: the step only counts
    assert p.returncode == 143 and 2 < took < 10 and "REPORT failed 143" in said, (said, everything)
    p, took, said, everything = run("stopping", 0)
    assert p.returncode == 0 and said == "alive\n", (said, everything)


def test_sigterm_while_waiting_for_a_missing_peer_ends_within_seconds(tmp_path, tok_cache):
    """Rank 0 of 2 srun tasks whose peer never starts blocks in the process-group
    rendezvous (C++; Python's handlers cannot run): SIGTERM still ends it within seconds
    with exit 143 and a failed status, instead of waiting out the rendezvous timeout."""
    run = tmp_path / "run"
    (proc,) = srun_tasks(run, ["train.steps=3"], tok_cache, nproc=2, only=[0])
    end = time.monotonic() + 60
    while not (run / "status.json").exists() and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(1.0)  # inside the rendezvous
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # the check failed: do not leave it waiting for its peer
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143 and time.monotonic() - t0 < 10, out[-2000:]
    st = status(run)
    assert st["status"] == "failed" and st["exit_code"] == 143 and "SIGTERM" in st["error"]


def test_hf_index_naming_files_outside_the_folder_is_refused(tmp_path):
    from pretrain.checkpoint import CheckpointError
    from pretrain.interop.hf import HFWeights

    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    for i, entry in enumerate(["../secret.safetensors", str(outside), "a/../../secret.safetensors"]):
        d = tmp_path / f"model{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": entry}}))
        with pytest.raises(CheckpointError, match=r"weight_map entry 'lm_head.weight' .* outside the model folder"):
            HFWeights(d)


def test_parallel_degree_that_does_not_fit_names_its_key_and_the_world_size():
    from tests.conftest import compose_job
    from pretrain.validate import ConfigError, validate_job

    for override, key in (("parallel.tp=4", "parallel.tp=4"), ("parallel.pp=3", "parallel.pp=3")):
        with pytest.raises(ConfigError, match=f"{key}: must divide the world size 2"):
            validate_job(compose_job(override), 2)


# -- found by a hostile review: each of these broke the first version of the fixes ---------
def crafted_metadata(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` whose .metadata is DCP's own, edited by ``edit(md)``
    (a crafted file needs no payload to mislead the loader)."""
    shutil.copytree(src, dst)
    md = pickle.loads((src / ".metadata").read_bytes())
    edit(md)
    (dst / ".metadata").write_bytes(pickle.dumps(md))
    refresh_manifest(dst)
    return dst


def test_metadata_that_would_mislead_the_loader_is_refused(ckpt_run, tmp_path):
    """Allowed classes only is not enough: stream transforms (a zstd bomb), chunks that do
    not cover their tensor (DCP then leaves it unloaded, silently), entries past the end
    of their file, storage that is not a map, data files that are FIFOs or links outside
    the folder: each refused naming the file and what is wrong."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.checkpoint.files import read_dcp_metadata

    src = ckpt_run / "checkpoints" / "step-4"
    first = lambda md: next(k for k in md.storage_data if k.offset is not None)  # noqa: E731

    def transform(md):
        md.storage_data[first(md)].transform_descriptors = ["stream.zstd/1"]

    def gap(md):
        md.state_dict_metadata["model.tok_embeddings.weight"].chunks[0].offsets = torch.Size([10 ** 9, 0])

    def past_end(md):
        md.storage_data[first(md)].offset = 10 ** 12

    def storage_list(md):
        md.storage_data = list(md.storage_data.values())

    cases = {"transform": (transform, ".metadata: refused, .*stream transforms"),
             "gap": (gap, ".metadata: refused, .*outside its size"),
             "past_end": (past_end, r"__0_0.distcp: \d+ bytes, but .metadata places .* at 1000000000000 "),
             "list": (storage_list, ".metadata: refused, .*storage_data is a list")}
    for name, (edit, why) in cases.items():
        ck = crafted_metadata(src, tmp_path / name, edit)
        with pytest.raises(CheckpointError, match=f"{ck}/{why}"):
            read_dcp_metadata(ck)
    ck = tmp_path / "overlap"
    shutil.copytree(src, ck)
    md = pickle.loads((src / ".metadata").read_bytes())
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    tm = md.state_dict_metadata["model.tok_embeddings.weight"]
    n, d = tm.size
    tm.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([n // 2 + 1, d])),
                 ChunkStorageMetadata(torch.Size([n // 2, 0]), torch.Size([n - n // 2 - 1, d]))]
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="do not cover its size .* exactly once"):
        read_dcp_metadata(ck)

    fifo = tmp_path / "fifo"
    shutil.copytree(src, fifo)
    (fifo / "__0_0.distcp").unlink()
    os.mkfifo(fifo / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="__0_0.distcp: not a regular file"):
        read_dcp_metadata(fifo)
    link = tmp_path / "link"
    shutil.copytree(src, link)
    outside = tmp_path / "elsewhere.distcp"
    (link / "__0_0.distcp").rename(outside)
    (link / "__0_0.distcp").symlink_to(outside)
    with pytest.raises(CheckpointError, match="a symbolic link to .*elsewhere.distcp, outside"):
        read_dcp_metadata(link)


def test_manifest_and_meta_values_are_checked(ckpt_run, tmp_path):
    from pretrain.checkpoint import CheckpointError, CheckpointMismatch, read_meta
    from pretrain.checkpoint.files import verify_files

    ck = tmp_path / "ck"
    shutil.copytree(ckpt_run / "checkpoints" / "step-4", ck)
    for files, why in (({"/dev/zero": [0, 0]}, "not a file of a checkpoint"),
                       ({"../../etc/hostname": [3, 0]}, "not a file of a checkpoint")):
        with pytest.raises(CheckpointError, match=why):
            verify_files(ck, files, sorted(files))
    meta = json.loads((ck / "meta.json").read_text())
    for value in (-7, True, "3"):
        (ck / "meta.json").write_text(meta_text({**meta, "step": value}))
        with pytest.raises(CheckpointError, match=r"step=.*expected an integer >= 0"):
            read_meta(ck)
    # A damaged byte in meta.json itself (a dimension 64 -> 65) is corruption, to fall back
    # from, not a changed config: meta.json carries its own CRC32.
    (ck / "meta.json").write_text(meta_text(meta).replace('"dim": 64', '"dim": 65'))
    with pytest.raises(CheckpointError, match=r"meta.json: CRC32 differs .*\(corrupt\)") as e:
        read_meta(ck)
    assert not isinstance(e.value, CheckpointMismatch)


def test_a_checkpoint_of_another_model_is_not_moved_aside(ckpt_run, tmp_path, tok_cache):
    """A changed model config is the config's fault, not the files': exit 4 naming every
    changed field that changes the trained function, and step-4 stays where it is (the
    corrupt-fallback would lose it). One layer fewer used to resume silently (the
    checkpoint's extra tensors dropped), so did another RoPE base or norm eps; a changed
    name or init std (which resume ignores) does not count."""
    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run, ignore=shutil.ignore_patterns(".lock", "status.json"))
    out = run_job(run, [*DET, "train.steps=6", "model.n_layers=1", "model.rope_theta=10000", "model.norm_eps=1e-6",
                        "model.name=renamed", "model.init_std=0.01"], tok_cache=tok_cache, check=False)
    assert out.returncode == 4, out.stderr[-2000:]
    for change in ("model.n_layers=1 (the checkpoint: 2)", "model.rope_theta=10000.0 (the checkpoint: 500000.0)",
                   "model.norm_eps=1e-06 (the checkpoint: 1e-05)"):
        assert change in out.stderr, out.stderr[-2000:]
    assert "model.name" not in out.stderr and "model.init_std" not in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert status(run)["exit_code"] == 4


def test_a_run_that_diverges_stops_before_it_costs_checkpoints(ckpt_run, tmp_path, tok_cache):
    """optim.lr=3e4 (legal, warned) resumed in a run dir holding good step-2 and step-4: the
    gradient norm and then the weights go non-finite a few steps later. The run used to
    exit 0 "completed", writing non-finite checkpoints that pruned the good ones. Now the
    check before a save (steps between the first and the last are not logged here:
    logging.every=100) stops it: exit 5, status diverged with the step, nothing non-finite
    written, and every checkpoint kept holds finite weights."""
    import torch
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run, ignore=shutil.ignore_patterns(".lock", "status.json"))
    out = run_job(run, [*DET, "train.steps=13", "optim.lr=3e4", "checkpoint.interval=2", "checkpoint.keep_last=2",
                        "logging.every=100"], tok_cache=tok_cache, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 5, text[-2000:]
    assert "config warning: optim.lr=30000.0 is above 1" in text
    st = status(run)
    assert (st["status"], st["exit_code"]) == ("diverged", 5) and st["step"] in (6, 8, 10, 12), st
    assert re.search(rf"diverged: training diverged at step {st['step']}: .*weights not finite; stopped before "
                     r"saving it \(kept in .*checkpoints: step-\d+ \(loss [\d.e+]+\), step-\d+ \(loss [\d.e+]+\), each "
                     r"of finite values", out.stderr), text[-2000:]
    kept = sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir())
    assert kept and max(kept) < st["step"], kept
    for step in kept:
        ck = run / "checkpoints" / f"step-{step}"
        md = dcp.FileSystemReader(str(ck)).read_metadata().state_dict_metadata
        state = {"model": {k[6:]: torch.empty(v.size) for k, v in md.items() if k.startswith("model.")}}
        dcp.load(state, checkpoint_id=str(ck), no_dist=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), step


def test_a_changed_data_mixture_is_a_mismatch_not_a_corruption(ckpt_run, tmp_path, tok_cache):
    """The loader state of one source resumed by a job reading a mixture of two: it was
    "stream 0: malformed" and step-4 was moved aside; now exit 4 naming the setting, and
    nothing is moved."""
    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run, ignore=shutil.ignore_patterns(".lock", "status.json"))
    mixture = ("data.mixture=[{source: text_folder, path: '${stdlib_dir:}', glob: 'json/*.py'}, "
               "{source: text_folder, path: '${stdlib_dir:}', glob: 'email/*.py'}]")
    out = run_job(run, [*DET, "train.steps=6", "data.source=mixture", mixture, "data.tokenizer.path="
                        + str(next(Path(tok_cache).glob("bpe512-*.json")))], tok_cache=tok_cache, check=False)
    assert out.returncode == 4, out.stderr[-2000:]
    assert "read 1 source(s), this job reads 2: data.source or data.mixture changed" in out.stderr
    assert "is unusable" not in out.stderr + out.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_a_malformed_loader_state_falls_back_like_a_corrupt_file(ckpt_run, tmp_path, tok_cache):
    """loader/dp-0.json that is a loader state in form but holds a token id past the
    vocabulary (it would fail the first step, or assert on a GPU), with a matching
    manifest: named, moved aside with its checkpoint, and the run resumes from step 2.
    JSON that is not a loader state at all is refused the same way."""
    from data_pipeline.loader import _check_saved, _check_tokens

    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run, ignore=shutil.ignore_patterns(".lock", "status.json"))
    ck = run / "checkpoints" / "step-4"
    state = json.loads((ck / "loader" / "dp-0.json").read_text())
    _check_saved([state])
    _check_tokens([state], 512)
    state["rows"][0]["slots"][0]["packer"].insert(0, {"key": 0, "tokens": [1, 2, 512]})
    (ck / "loader" / "dp-0.json").write_text(json.dumps(state))
    refresh_manifest(ck)
    out = run_job(run, [*DET, "train.steps=5"], tok_cache=tok_cache)
    text = out.stdout + out.stderr
    assert "is unusable" in text and "token ids are not in [0, 512)" in text and "resumed from step 2" in text, \
        text[-2000:]
    with pytest.raises(ValueError, match="lacks num_slots"):
        _check_saved([{"n_sources": 1}])


def test_disk_full_while_logging_ends_the_job_with_a_true_status(tmp_path, tok_cache, tmpfs):
    """The disk fills after step 1 (metrics, log): the job exits 1 within seconds (its
    loader's threads are stopped, not waited for forever) and status.json says failed,
    rewritten in place when no temporary file fits."""
    run = tmpfs(tmp_path / "small", "1m")
    proc = start(run / "run", [*DET, "train.steps=100000"], tok_cache)
    try:
        wait_steps(run / "run", proc, 1)
        with open(run / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, out[-2000:]
    st = status(run / "run")
    assert st["status"] == "failed" and "No space left on device" in st["error"]


def test_symlinks_among_the_run_dirs_files_are_refused(tmp_path, tok_cache):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run / "pretrain.log").symlink_to(victim)
    out = run_job(run, ["train.steps=2"], tok_cache=tok_cache, check=False)
    assert out.returncode == 2 and "pretrain.log is a symbolic link" in out.stderr, out.stderr[-2000:]
    assert victim.read_text() == "precious\n"


def test_signal_exceptions_survive_dcp_and_the_zip_writer():
    """A KeyboardInterrupt raised inside torch's C++ zip writer comes back as the context
    of a RuntimeError, and DCP wraps it again: it still ends the job as itself (exit 130),
    not as a failed save (exit 4)."""
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from pretrain.checkpoint.files import reraise_interrupt

    try:
        try:
            raise KeyboardInterrupt("second SIGINT")
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as inner:
        wrapped = CheckpointException("save", {0: _wrap_exception(inner)})
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        reraise_interrupt(wrapped)
    reraise_interrupt(CheckpointException("save", {0: _wrap_exception(OSError(28, "No space left on device"))}))


def test_hf_export_never_replaces_its_own_input(ckpt_run, tmp_path):
    from pretrain.checkpoint import CheckpointError
    from pretrain.interop.hf import export_hf

    run = tmp_path / "run"
    shutil.copytree(ckpt_run, run, ignore=shutil.ignore_patterns(".lock"))
    with pytest.raises(CheckpointError, match="holds the input"):
        export_hf(run, run, force=True, progress=False)
    assert (run / "checkpoints" / "step-4" / "meta.json").is_file()


def test_the_watchdog_acts_only_on_stop_signals():
    """The wakeup fd also hears signals other code handles in Python (the DataLoader's
    SIGCHLD handler): one of those during start-up must not end the job."""
    code = ("import os, signal, sys, time; from pretrain.runtime.signals import SignalHandler\n"
            "h = SignalHandler(); signal.signal(signal.SIGCHLD, lambda *a: None)\n"
            "os.kill(os.getpid(), signal.SIGCHLD); time.sleep(SignalHandler.GRACE_S + 1.5)\n"
            "print('alive'); h.restore()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "alive" in proc.stdout, proc.stderr[-2000:]


def test_a_mismatch_on_one_pipeline_stage_moves_nothing_on_any_rank(tmp_path, tok_cache):
    """Untying the embeddings adds output.weight to the last stage only: that rank finds the
    mismatch, the other finds nothing. Every rank must treat the agreed error as the
    mismatch it is (exit 4 naming the tensor), not as a corruption to move aside."""
    run = tmp_path / "run"
    pp = ["parallel.pp=2", "train.local_batch_size=2", "train.steps=4", "checkpoint.interval=2",
          "checkpoint.keep_last=0"]
    run_job(run, pp, tok_cache=tok_cache, nproc=2, launcher="torchrun")
    out = run_job(run, [*pp, "model.tie_embeddings=false"], tok_cache=tok_cache, nproc=2, launcher="torchrun",
                  check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "model.tie_embeddings=False (the checkpoint: True)" in text, text[-3000:]
    assert "is unusable" not in text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert status(run)["exit_code"] == 4


@pytest.mark.parametrize("family", ["evil_family:FAMILY", "tests.toy_family:FAMILY", 5])
def test_a_checkpoints_model_family_is_data_never_an_import(family, ckpt_run, tmp_path):
    """meta.json names the model family; export reads it as a name of this tree's families
    and never imports what it names (a module beside the checkpoint, on the path of a
    `python -m` run from there). Exit 4 naming meta.json; no output written."""
    ckpt = tmp_path / "step-4"
    shutil.copytree(ckpt_run / "checkpoints" / "step-4", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["model"]["family"] = family
    (ckpt / "meta.json").write_text(meta_text(meta))
    (tmp_path / "evil_family.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').close()\n")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "pretrain.hf", "export", str(ckpt), str(out)], cwd=tmp_path,
                          env={**_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "meta.json" in proc.stderr and "is not a model family of this tree" in proc.stderr
    assert not (tmp_path / "RAN").exists()
    assert not out.exists() and not list(tmp_path.glob("hf*.partial"))


# -- tracebacks where a clear error belongs ----------------------------------------------

def test_a_folder_of_another_family_is_named_not_a_traceback():
    """`hf export <Llama 3.2 Vision LoRA run> --base <a Llama folder>` (and `model.init_from`
    of a Llama folder for a vision model) compared the folder's config field by field with
    the vision model's: AttributeError. Now a CheckpointError naming both families."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.interop.hf import check_args_match
    from tests.conftest import compose_job

    vision, text = compose_job("model=mllama_debug").model, compose_job("model=debug").model
    for ours, theirs, fam in ((vision, text, "llama"), (text, vision, "mllama")):
        with pytest.raises(CheckpointError, match=rf"/hf/config.json: a model of family '{fam}', the model here is "
                                                  rf"family '{ours.family}'"):
            check_args_match(ours, theirs, Path("/hf"))


def test_a_safetensors_header_that_relabels_a_weight_is_refused(tmp_path):
    """A header that calls F32 bytes I32 (same size, so the file stays consistent) imported
    as integers cast to float, without a word; a weight of a dtype the family does not store
    is refused naming the file, the weight and the dtype."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.interop.hf import HFWeights, import_hf
    from tests.test_hf_io import save_hf

    save_hf(tmp_path / "hf", tied=True, seed=0)
    f = next((tmp_path / "hf").glob("*.safetensors"))
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[key]["dtype"] = "I32"
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    f.write_bytes(bytes(raw[:8]) + new + bytes(raw[8 + n:]))
    with pytest.raises(CheckpointError, match=rf"{f}: {re.escape(key)} is stored as int32; a model weight is one of "
                                              r"float32, bfloat16, float16, float64"):
        HFWeights(tmp_path / "hf").get(key)
    with pytest.raises(CheckpointError, match="is stored as int32"):
        import_hf(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rc,status,requeued", [(3, "preempted", True), (5, "diverged", False),
                                                (1, "diverged", False), (2, "failed", False)])
def test_the_batch_scripts_never_requeue_a_diverged_run(tmp_path, rc, status, requeued):
    """slurm/common.sh's requeue decision, run by bash with stand-ins for scontrol and
    scancel: after a forwarded preemption warning with a complete checkpoint on disk, a
    preempted step requeues; exit 5, a status of "diverged" (ranks killed before they
    exited 5) or exit 2 never does, and the job ends with the step's code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("scontrol", "scancel"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path / 'calls'}\necho localhost\n")
        (bin_dir / tool).chmod(0o755)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "step-4" / "meta.json").write_text("{}")
    (run / "status.json").write_text(json.dumps({"status": status, "exit_code": rc, "slurm_attempt": "7.0"}))
    env = {**_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "PRETRAIN_HOME": str(REPO), "RUN_DIR": str(run),
           "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "t", "SLURM_JOB_NODELIST": "localhost", "SLURM_RESTART_COUNT": "0",
           "PRETRAIN_ENV_SETUP": "/dev/null"}
    script = f"source slurm/common.sh; PREEMPT_REQUESTED=1; run_and_requeue sh -c 'exit {rc}'"
    p = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls").read_text()
    assert ("requeue 7" in calls) == requeued, (calls, p.stdout, p.stderr)
    assert p.returncode == (0 if requeued else rc), (p.returncode, p.stderr)


def test_torchruns_restart_of_a_diverged_attempt_ends_at_once(tmp_path, monkeypatch):
    """torchrun --max-restarts restarts the workers after any exit: a restart of an attempt
    that diverged (status.json says so; every first attempt writes running) is refused
    before anything is loaded, so exit 5 stays final; a first attempt, or a status of
    another kind, starts as usual."""
    from pretrain.runtime.status import diverged_before, write_status

    write_status(tmp_path, status="diverged", exit_code=5, step=12, error="Diverged: ...")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert diverged_before(tmp_path) is None  # started again by hand: the user may have changed the config
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert "previous attempt of this torchrun run diverged (at step 12)" in diverged_before(tmp_path)
    write_status(tmp_path, status="preempted", exit_code=3, step=12)
    assert diverged_before(tmp_path) is None
