"""metrics.jsonl: one JSON object per line, written by rank 0 through accelerate's tracker interface.

The first line of each start is {"config": {...}}; every other line is {"step": N, ...}. A resumed run first drops
the lines of steps after the checkpoint it resumed from (the killed run logged them, the resumed run logs them
again), so each step appears once and its numbers are those of the run that reached the end.
"""

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker

from .files import write_text_atomically


class JsonlTracker(GeneralTracker):
    """An accelerate tracker appending one JSON object per `log` call to a file (rank 0 only)."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        self._append({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._append({"step": step, **values})

    def _append(self, record: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl (atomically) without the records of steps after `step`; returns how many were dropped.
    A torn last line (the run was killed while appending) is dropped too."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text_atomically(path, "".join(line + "\n" for line in kept))
    return dropped
