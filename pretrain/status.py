"""A run dir's status.json: rank 0 writes running / completed / preempted / failed, each
write atomic (a temporary file renamed over it), so readers never see half a file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

STATUS_FILE = "status.json"


def write_status(run_dir, **fields) -> None:
    """Replaces <run_dir>/status.json with `fields` as one JSON object."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"  # same dir: the rename stays atomic
    try:
        with open(tmp, "w") as f:
            json.dump(fields, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / STATUS_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_status(run_dir) -> Optional[dict]:
    """The run's status, or None when it has none (older or killed runs) or it is unreadable."""
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
