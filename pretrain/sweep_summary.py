"""``python -m pretrain.sweep_summary <sweep dir> [--sort loss|job] [--json]``: one row per
point of a Hydra multirun; exit 0 when every point completed, 1 otherwise, 2 for a bad dir."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from omegaconf import OmegaConf

from .runtime.status import read_status

EXIT_ALL_COMPLETED, EXIT_NOT_ALL_COMPLETED, EXIT_BAD_DIR = 0, 1, 2
EXPECTED = ("expected a Hydra multirun dir (e.g. multirun/<date>/<time>/) with multirun.yaml and one "
            "dir per point named by its job number (0/, 1/, ...), each with .hydra/overrides.yaml")
_LOG_SCAN_BYTES = 256 * 1024  # of a submitit log's head and tail, when looking for a job's dir


class SweepDirError(Exception):
    pass


def job_dirs(sweep: Path) -> List[Path]:
    """The sweep's numbered job dirs in job order; SweepDirError when there are none."""
    if not sweep.is_dir():
        raise SweepDirError(f"{sweep}: no such directory; {EXPECTED}")
    dirs = sorted((d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    if not dirs:
        hint = " (it looks like a single run's dir)" if (sweep / ".hydra").is_dir() else ""
        below = sorted(str(p.parent) for p in [*sweep.glob("*/multirun.yaml"), *sweep.glob("*/*/multirun.yaml")])
        if below:
            hint += f" (sweeps below it: {', '.join(below[-3:])}{', ...' if len(below) > 3 else ''})"
        raise SweepDirError(f"{sweep}: no job dirs{hint}; {EXPECTED}")
    return dirs


def read_metrics(job_dir: Path) -> List[dict]:
    """metrics.jsonl's records by step, the last record of each step: a resumed run logs its
    steps again from its checkpoint on, and supersedes the earlier run's records from there."""
    path = job_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records: List[dict] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, TypeError, KeyError):
            continue  # blank, or the torn last line of a killed run
        while records and records[-1]["step"] >= step:
            records.pop()
        records.append({**rec, "step": step})
    return records


def _yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def planned_steps(job_dir: Path) -> Optional[int]:
    """train.steps of the point's composed config, None when unreadable."""
    try:
        steps = OmegaConf.select(OmegaConf.load(job_dir / ".hydra" / "config.yaml"), "train.steps",
                                 throw_on_resolution_failure=False)
        return int(steps) if steps is not None else None
    except Exception:  # missing file, bad YAML, an interpolation that does not resolve here
        return None


def overrides(job_dir: Path) -> List[str]:
    data = _yaml(job_dir / ".hydra" / "overrides.yaml")
    return [str(o) for o in data] if isinstance(data, list) else []


class _SubmititLogs:
    """Finds a job's submitit .err logs: by the hydra.job.id recorded in the job's
    .hydra/hydra.yaml (submitit's job id names its folder), else by a log naming the job dir."""

    def __init__(self, sweep: Path):
        root = sweep / ".submitit"
        self.folders = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []

    @staticmethod
    def _mentions(path: Path, needle: str) -> bool:
        try:
            with open(path, "rb") as f:
                head = f.read(_LOG_SCAN_BYTES)
                f.seek(max(f.seek(0, 2) - _LOG_SCAN_BYTES, len(head)))
                text = (head + f.read()).decode(errors="replace")
        except OSError:
            return False
        return needle in text

    def for_job(self, job_dir: Path) -> List[Path]:
        hydra = _yaml(job_dir / ".hydra" / "hydra.yaml")
        job_id = None
        if isinstance(hydra, dict):
            job_id = ((hydra.get("hydra") or {}).get("job") or {}).get("id")
        folders = [d for d in self.folders if job_id is not None and d.name == str(job_id)]
        if not folders:
            needle = str(job_dir.resolve())
            folders = [d for d in self.folders if any(self._mentions(p, needle) for p in d.glob("*_log.*"))]
        errs = sorted((p for d in folders for p in d.glob("*_log.err")), key=_task_order)
        failing = [p for p in errs if self._mentions(p, "Traceback") or self._mentions(p, "Error")]
        return failing or [p for p in errs if p.stat().st_size]


def _task_order(path: Path):
    task = path.name.removesuffix("_log.err").rsplit("_", 1)[-1]
    return (str(path.parent), int(task) if task.isdigit() else math.inf, path.name)


def summarize(sweep, sort: str = "job") -> List[Dict]:
    """One row per job dir: job, overrides (those that differ between points), all_overrides,
    step, planned_steps, final_loss, tokens_per_s, status, exit_code, error, err_logs, dir."""
    sweep = Path(sweep)
    logs = _SubmititLogs(sweep)
    rows = []
    for d in job_dirs(sweep):
        recs = read_metrics(d)
        planned = planned_steps(d)
        last = recs[-1] if recs else None
        later = [r["tokens_per_s"] for r in recs[1:] if "tokens_per_s" in r]
        tps = later or [r["tokens_per_s"] for r in recs[:1] if "tokens_per_s" in r]
        st = read_status(d)
        if st is not None:
            status = str(st.get("status", "unknown"))
        elif last is None:
            status = "no metrics"
        else:
            status = "completed" if planned is not None and last["step"] >= planned else "incomplete"
        rows.append({
            "job": int(d.name), "overrides": [], "all_overrides": overrides(d),
            "step": last["step"] if last else None, "planned_steps": planned,
            "final_loss": last.get("loss") if last else None,
            "tokens_per_s": sum(tps) / len(tps) if tps else None,
            "status": status, "exit_code": (st or {}).get("exit_code"), "error": (st or {}).get("error"),
            "err_logs": [str(p) for p in logs.for_job(d)] if status != "completed" else [],
            "dir": str(d),
        })
    common = set.intersection(*(set(r["all_overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = [o for o in r["all_overrides"] if o not in common]
    if sort == "loss":
        rows.sort(key=lambda r: (r["final_loss"] is None, r["final_loss"] or 0.0, r["job"]))
    return rows


def exit_code(rows: List[Dict]) -> int:
    return EXIT_ALL_COMPLETED if all(r["status"] == "completed" for r in rows) else EXIT_NOT_ALL_COMPLETED


def format_table(rows: List[Dict]) -> str:
    """Aligned plain text: the table, then one note per point that did not complete."""
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    header = ["job", "overrides", "steps", "final loss", "tokens/s", "status"]
    right = {0, 2, 3, 4}
    cells = [[str(r["job"]), " ".join(r["overrides"]) or "-",
              f"{fmt(r['step'], 'd')}/{fmt(r['planned_steps'], 'd')}",
              fmt(r["final_loss"], ".4f"), fmt(r["tokens_per_s"], ".0f"),
              "FAILED" if r["status"] == "failed" else r["status"]] for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]

    def line(c):
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, cells)]
    notes = []
    for r in rows:
        if r["status"] == "completed" or (r["status"] == "running" and not r["err_logs"]):
            continue
        code = f" (exit {r['exit_code']})" if r["exit_code"] is not None else ""
        label = "FAILED" if r["status"] == "failed" else r["status"]
        notes.append(f"job {r['job']} {label}{code}: {r['error'] or r['dir']}")
        if r["err_logs"]:
            more = f" (+{len(r['err_logs']) - 1} more)" if len(r["err_logs"]) > 1 else ""
            notes.append(f"    log: {r['err_logs'][0]}{more}")
    return "\n".join(out + ([""] + notes if notes else []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.sweep_summary", description="One row per point of a Hydra sweep: overrides, steps, final loss, tokens/s, status. "
                                "Exit 0 when every point completed, 1 otherwise, 2 for a bad dir.")
    p.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir, e.g. multirun/<date>/<time>")
    p.add_argument("--sort", choices=["job", "loss"], default="job", help="row order (default: job)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    args = p.parse_args(argv)
    try:
        rows = summarize(args.sweep_dir, sort=args.sort)
    except SweepDirError as e:
        print(f"sweep_summary: {e}", file=sys.stderr)
        return EXIT_BAD_DIR
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        common = [o for o in rows[0]["all_overrides"] if o not in rows[0]["overrides"]]
        print(f"{args.sweep_dir}: {len(rows)} point{'s' * (len(rows) != 1)}"
              + (f"; common overrides: {' '.join(common)}" if common else ""))
        print(format_table(rows))
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
