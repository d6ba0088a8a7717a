"""logging.backends: [wandb]. Weights & Biases, offline by default: cluster nodes rarely reach the internet, so the
run is written to <run folder>/wandb and uploaded afterwards (`orch sync RUN`, which calls `wandb sync`);
WANDB_MODE=online sends as it goes. WANDB_PROJECT names the project (default orch).

The run's id is kept in trackers.json: a requeued or resumed attempt opens the same run (`id=`, `resume="allow"`),
and `wandb sync` uploads each attempt's folder into it. A pipeline's stages share a group, its id.

W&B's service process writes the run's file (<run folder>/wandb/offline-run-*/run-ID.wandb) through a buffer, and a
SIGKILLed trainer takes the unwritten rows with it. So a resumed attempt asks W&B's own files which steps they hold
(`last_step_written`) and sends the rest from metrics.jsonl (training/tracker_state.py), rather than trusting what
an earlier attempt believed it had sent.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path
from typing import Optional

from training.tracker_state import Continuity, ResumableTracker


class WandbTracker(ResumableTracker):
    def __init__(self, run_dir: Path, config: dict, group: Optional[str]):
        import wandb

        self.keep = Continuity(run_dir, "wandb")
        run_id = self.keep.run_id or secrets.token_hex(4)  # W&B's ids: lower-case letters and digits
        self.keep.remember(run_id=run_id)  # before anything is sent: a kill from here on resumes this run
        self.keep.sent_before = last_step_written(Path(run_dir), run_id)
        self.run = wandb.init(
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            project=os.environ.get("WANDB_PROJECT", "orch"),
            group=group,
            name=Path(run_dir).name,
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(console="off"),  # the trainer's output is in its log already
        )
        # W&B keeps a step's row open until a later step comes (the validation record joins the training one at
        # its step); a row is sent when the next step starts, and at close
        self.open_step: Optional[int] = None
        self.row: dict[str, float] = {}

    def send(self, step: int, values: dict[str, float], when: float) -> None:
        if self.open_step is not None and step != self.open_step:
            self._commit()
        self.open_step = step
        self.row.update(values)

    def _commit(self) -> None:
        self.run.log(self.row, step=self.open_step, commit=True)
        self.open_step, self.row = None, {}

    def close(self) -> None:
        if self.open_step is not None:
            self._commit()
        self.run.finish()


BLOCK = 32768  # the .wandb file is LevelDB's log format: a 7-byte file header, then blocks of 7-byte-headed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The protobuf records (wandb.proto's Record) of one .wandb file, up to a chunk a kill cut short."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pieces = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # the rest of the block is padding
            continue
        if pos + 7 + length > len(data):
            return  # cut short
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pieces = chunk if kind in (FULL, FIRST) else pieces + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def run_files(run_dir: Path, run_id: str) -> list[Path]:
    """Every attempt's file of this W&B run, oldest first (the folders are named by their start time)."""
    return sorted(p for p in (run_dir / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb") if not p.parent.is_symlink())


def last_step_written(run_dir: Path, run_id: str) -> int:
    """The last history step W&B's files of this run hold; -1 for none, or for a file this reader can't parse
    (every step of metrics.jsonl is sent again then: some may show twice)."""
    last = -1
    try:
        for path in run_files(run_dir, run_id):
            for record in records(path):
                if record.WhichOneof("record_type") == "history":
                    last = max(last, record.history.step.num)
    except Exception:  # a format this version of the reader does not know
        return -1
    return last
