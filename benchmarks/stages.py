"""Resumable benchmark stages, cached by content hash.

A long benchmark is a list of stages. Each stage has a name and the inputs it depends on (data
digests, settings, the keys of the stages it reads); its key is sha256 of those inputs. A finished
stage leaves `<root>/<name>-<key[:12]>/stage.json` with its result, measured wall time and CPU
model, and is skipped when asked again with the same inputs. A stage that was interrupted has no
stage.json and runs again in the same folder, where long stages keep their own checkpoints
(fine-tuning per epoch, unlearning runs per epoch), so they resume instead of starting over.

Changed inputs give a new key and so a new folder: a stale result is never reused.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import _cpu_model
from train.files import write_json

STAGE_FILE = "stage.json"


def stage_key(inputs: Any) -> str:
    """sha256 of the inputs' canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StageRecord:
    name: str
    key: str
    folder: Path
    result: dict[str, Any]
    wall_s: float
    cpu: str
    cached: bool


class StageCache:
    """Runs stages under `root`, skipping those already finished with the same inputs."""

    def __init__(self, root: str | Path, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.log = log
        self.records: dict[str, StageRecord] = {}

    def folder(self, name: str, inputs: Any) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        return self.root / f"{slug}-{stage_key(inputs)[:12]}"

    def done(self, name: str, inputs: Any) -> bool:
        return (self.folder(name, inputs) / STAGE_FILE).is_file()

    def run(self, name: str, inputs: Any, work: Callable[[Path], dict[str, Any]]) -> StageRecord:
        """The stage's record: read from its folder when finished, else `work(folder)` is run and
        its result stored (atomically, so a stage killed while writing counts as not finished)."""
        folder = self.folder(name, inputs)
        saved = folder / STAGE_FILE
        if saved.is_file():
            data = json.loads(saved.read_text())
            record = StageRecord(name, data["key"], folder, data["result"], data["wall_s"], data["cpu"], True)
            self.log(f"[stage] {name}: cached ({data['wall_s']:.0f} s on {data['cpu']})")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.log(f"[stage] {name}: running in {folder}")
            started = time.perf_counter()
            result = work(folder)
            wall = time.perf_counter() - started
            record = StageRecord(name, stage_key(inputs), folder, result, round(wall, 1), _cpu_model(), False)
            write_json(saved, {"name": name, "key": record.key, "inputs": inputs, "result": result,
                                "wall_s": record.wall_s, "cpu": record.cpu,
                                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            self.log(f"[stage] {name}: done in {wall:.0f} s")
        self.records[name] = record
        return record

    def timings(self) -> list[dict[str, Any]]:
        """Each stage of this run: measured wall time, CPU kind, and whether it came from the cache."""
        return [{"stage": r.name, "wall_s": r.wall_s, "cpu": r.cpu, "cached": r.cached, "folder": str(r.folder)}
                for r in self.records.values()]

