"""A run's metrics.jsonl (format in prefpipe/train/loop.py): written by the leader only, one line per record, and
mirrored to the run's trackers (`--report_to`, prefpipe/train/tracking.py) record for record."""

from __future__ import annotations

import json
from pathlib import Path

from prefpipe.fileio import append_whole, atomic_write_text, guarded_write


class MetricsLog:
    def __init__(self, path: Path, leader: bool, tracker=None):
        self.path, self.leader, self.file = Path(path), leader, None
        self.tracker = tracker  # a tracking.Tracker, or None

    def open(self, step: int):
        """Drop lines past `step` (written by a killed run after its last checkpoint), then append."""
        if self.leader:
            truncate_metrics(self.path, step)
            self.file = open(self.path, "ab", buffering=0)

    def write(self, record: dict):
        if not self.leader:
            return
        if self.tracker is not None:
            self.tracker.log(record)
        line = (json.dumps(record) + "\n").encode()
        with guarded_write(self.path, "the lines before this record are kept (the run's checkpoints too): free "
                                      "space, then rerun with --resume"):
            if self.file is None:
                with open(self.path, "ab", buffering=0) as f:
                    append_whole(f, line)
            else:
                append_whole(self.file, line)

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def close_trackers(self, failed: bool = False):
        if self.tracker is not None:
            self.tracker.close(failed=failed)

    def last_train(self) -> dict | None:
        last = None
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("split") == "train":
                    last = rec
        return last


def truncate_metrics(path: Path, step: int):
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
