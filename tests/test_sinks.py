"""Metrics sinks, each checked on a real tiny single-process training run: TensorBoard
read back with tensorboard's own reader, and Weights & Biases in offline mode read back
from its transaction log (<run dir>/wandb/offline-run-*/run-<id>.wandb) with wandb's own
protobuf records; a resumed job continues the same W&B run."""
import json
import math
import struct
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from conftest import REPO, TINY, _env, read_metrics, run_job

WANDB_ENV = {
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
}


def test_tensorboard_has_every_jsonl_scalar(tmp_path, tok_cache):
    run_job(tmp_path, ["logging.tensorboard=true", "train.local_batch_size=2", "train.steps=4"],
            tok_cache=tok_cache)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    keys = sorted({k for r in rows for k in r if k != "step"})
    # CPU: peak RSS as mem_gb plus the RSS now; no CUDA-only key.
    assert {"loss", "mfu", "mem_gb", "mem_rss_gb", "data_wait_share", "data/skipped"} <= set(keys)
    assert "mem_reserved_gb" not in keys
    assert any(k.startswith("data/tokens/") for k in keys)
    for r in rows:
        assert 0 < r["mem_rss_gb"] <= r["mem_gb"] * 1.01

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == set(keys)
    for k in keys:
        events = ea.Scalars(k)
        assert [e.step for e in events] == [r["step"] for r in rows], k
        for e, r in zip(events, rows):
            assert math.isclose(e.value, r[k], rel_tol=1e-6, abs_tol=1e-30), (k, e.value, r[k])
    print(f"tensorboard: {len(keys)} scalars x {len(rows)} steps equal metrics.jsonl")


# -- W&B offline -------------------------------------------------------------------------

def wandb_records(path: Path) -> Iterator:
    """The protobuf Records of a .wandb transaction log: a 7-byte file header, then
    LevelDB-log-style records (crc32 u32, length u16, type u8) in 32 KiB blocks, a record
    split across blocks as FIRST/MIDDLE/LAST pieces. (wandb 0.31 ships no Python reader.)"""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # zero padding: end of what was written
            break
        piece, pos = data[pos:pos + length], pos + length
        buf = piece if kind in (1, 2) else buf + piece  # FULL, FIRST start a record
        if kind in (1, 4):  # FULL, LAST end it
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def read_offline_run(run_dir: Path) -> List[dict]:
    """One dict per offline-run dir (oldest first): id, run record fields, config, history."""
    runs = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log_file,) = d.glob("run-*.wandb")
        info: dict = {"dir": d, "config": {}, "history": []}
        for rec in wandb_records(log_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                r = rec.run
                info.update(id=r.run_id, project=r.project, name=r.display_name, group=r.run_group,
                            tags=list(r.tags))
                for item in r.config.update:
                    info["config"][item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in rec.config.update:
                    info["config"][item.key] = json.loads(item.value_json)
            elif kind == "history":
                row: Dict[str, object] = {}
                for item in rec.history.item:
                    row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
                info["history"].append(row)
        runs.append(info)
    return runs


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, tok_cache):
    """A 3-step offline W&B job with a checkpoint at its end (test_wandb_resume continues it)."""
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    env = {**WANDB_ENV, "WANDB_CONFIG_DIR": str(run_dir.parent / "wandb_config"),
           "WANDB_CACHE_DIR": str(run_dir.parent / "wandb_cache"),
           "WANDB_DATA_DIR": str(run_dir.parent / "wandb_data")}
    overrides = ["train.local_batch_size=2", "train.steps=3", "checkpoint.interval=3",
                 "logging.wandb=true", "logging.wandb_run_name=tiny-sinks",
                 "logging.wandb_tags=[tiny,ci]", "logging.wandb_project=sinks-test"]
    run_job(run_dir, overrides, tok_cache=tok_cache, env=env)
    return run_dir, overrides, env


def test_wandb_offline_has_config_and_every_logged_step(wandb_run):
    run_dir, _, _ = wandb_run
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    run_id = (run_dir / "wandb_id").read_text().strip()
    (run,) = read_offline_run(run_dir)
    assert run["dir"].name.endswith("-" + run_id) and run["id"] == run_id
    assert (run["project"], run["name"], run["tags"]) == ("sinks-test", "tiny-sinks", ["tiny", "ci"])
    assert run["group"] == ""  # a single run, not a multirun job: no group
    cfg = {k: v for k, v in run["config"].items() if not k.startswith("_")}  # _wandb: W&B's own
    assert cfg["model"]["dim"] == 64 and cfg["model"]["n_layers"] == 2
    assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["steps"] == 3
    assert cfg["logging"]["wandb_tags"] == ["tiny", "ci"]
    # The whole composed job config, every group and key, as the run dir's .hydra has it.
    from dataclasses import asdict

    from pretrain.config import load_job_config

    composed = json.loads(json.dumps(asdict(load_job_config(run_dir / ".hydra" / "config.yaml"))))
    assert cfg == composed

    hist = [h for h in run["history"] if "loss" in h]
    assert [h["_step"] for h in hist] == [r["step"] for r in rows]
    keys = [k for k in rows[0] if k != "step"]
    for h, r in zip(hist, rows):
        for k in keys:
            assert math.isclose(h[k], r[k], rel_tol=1e-12), (k, h[k], r[k])
    print(f"wandb offline: {len(keys)} metrics x {len(rows)} steps equal metrics.jsonl")


def test_wandb_resume_continues_the_same_run(wandb_run, tok_cache):
    run_dir, overrides, env = wandb_run
    run_id = (run_dir / "wandb_id").read_text().strip()
    proc = run_job(run_dir, [o.replace("train.steps=3", "train.steps=5") for o in overrides],
                   tok_cache=tok_cache, env=env)
    assert "resumed from step 3" in proc.stdout + proc.stderr
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    first, second = read_offline_run(run_dir)
    assert first["id"] == second["id"] == run_id
    assert [h["_step"] for h in second["history"] if "loss" in h] == [4, 5]


def test_wandb_groups_a_multirun_sweep_by_its_dir_name(tmp_path, tok_cache):
    """A Hydra multirun job (-m) with logging.wandb_group unset: group = the sweep dir's name."""
    import subprocess
    import sys

    sweep = tmp_path / "lr-sweep"
    cmd = [sys.executable, "-m", "pretrain", "-m", *TINY, f"data.tokenizer.cache_dir={tok_cache}",
           "train.local_batch_size=2", "train.steps=2", "logging.wandb=true", f"hydra.sweep.dir={sweep}"]
    env = _env({**WANDB_ENV, "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = read_offline_run(sweep / "0")
    assert (run["group"], run["name"]) == ("lr-sweep", "0")
    assert [h["_step"] for h in run["history"] if "loss" in h] == [1, 2]


def test_wandb_init_failure_names_the_knob(tmp_path, monkeypatch):
    """Online mode without credentials: wandb.init refuses (before any network call) and
    the error says which knob turned W&B on and how to log without a network."""
    import wandb

    from pretrain.config import LoggingConfig
    from pretrain.observe.metrics import MetricsSink

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        with pytest.raises(RuntimeError) as e:
            MetricsSink(tmp_path, enabled=True, total_steps=1, tensorboard=False, console=False,
                        wandb_cfg=LoggingConfig(wandb=True, wandb_mode="online"), job_config=None)
    finally:
        wandb.teardown()
    msg = str(e.value)
    assert "logging.wandb" in msg and "WANDB_MODE=offline" in msg and "wandb login" in msg
    assert not (tmp_path / "metrics.jsonl").exists()
