"""A tracker run that outlives its process: <run folder>/trackers.json keeps, for each backend, the tracker's run id
and the last step the tracker holds, so a requeued or resumed job continues the same W&B or MLflow run.

Neither W&B nor MLflow can take back what they were sent (W&B rewinds only on its server, MLflow keeps every value
logged at a step), so a resumed attempt does not send again the steps an earlier attempt already sent: the
tracker keeps the first values of a step recomputed after the last checkpoint (TensorBoard, which can purge,
shows the recomputed ones; a resumed run recomputes the same numbers up to nondeterministic kernels). The steps
an attempt logged to metrics.jsonl but whose record never reached the tracker (killed between the two, or a W&B
row still open) are sent from metrics.jsonl when the next attempt opens the tracker, so no step goes missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from jobspec import atomic
from jobspec.contract import TRACKERS, RunFolder


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers, as a tracker plots them (time and step are the axes, flags are not curves)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Continuity:
    """One backend's entry in trackers.json."""

    def __init__(self, run_dir: Path, backend: str):
        self.run_dir, self.backend = Path(run_dir), backend
        self.path = Path(run_dir) / TRACKERS
        self.state: dict = self._read().get(backend, {})
        self.sent_before: int = self.state.get("logged_step", -1)  # by earlier attempts

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def run_id(self) -> Optional[str]:
        return self.state.get("run_id")

    def remember(self, **fields) -> None:
        """Update this backend's entry (atomically; the other backends' entries are kept)."""
        self.state.update(fields)
        everything = {**self._read(), self.backend: self.state}
        atomic.write_json(self.path, everything)

    def fresh(self, step: int) -> bool:
        """Whether an earlier attempt has not yet sent this step to the tracker."""
        return step > self.sent_before

    def catch_up(self, first_step: int) -> list[tuple[int, dict, float]]:
        """(step, numbers, time) of what metrics.jsonl holds after the tracker's last step and before this attempt's
        first: the steps an earlier attempt logged but never got to the tracker. The last value of a key wins."""
        rows: dict[int, tuple[dict, float]] = {}
        try:
            lines = RunFolder(self.run_dir).metrics.read_text().splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and self.sent_before < step < first_step:
                values, _ = rows.get(step, ({}, 0.0))
                rows[step] = ({**values, **scalars(record)}, record.get("time", 0.0))
        return [(step, values, when) for step, (values, when) in sorted(rows.items())]


class ResumableTracker:
    """What W&B's and MLflow's trackers share: the catch-up at the first record and the skip of sent steps.
    Subclasses set self.keep (a Continuity) and send (step, numbers, time) to their tool."""

    keep: Continuity
    _first: Optional[int] = None

    def log(self, record: dict) -> None:
        step = record["step"]
        if self._first is None:
            self._first = step
            for row in self.keep.catch_up(step):
                self.send(*row)
        if self.keep.fresh(step):
            self.send(step, scalars(record), record.get("time", 0.0))

    def send(self, step: int, values: dict[str, float], when: float) -> None:
        raise NotImplementedError


def flat(config: dict, prefix: str = "") -> dict[str, str]:
    """{"model.n_layer": "4", ...}: the resolved config as hyperparameters of tools that take flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return out
