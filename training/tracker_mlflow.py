"""logging.backends: [mlflow]. The MLflow run goes to MLFLOW_TRACKING_URI when it is set (a tracking server), else
to a file store beside the run folders, <runs_dir>/mlruns, which needs no network (`mlflow ui --backend-store-uri
runs/mlruns` shows it; MLFLOW_EXPERIMENT_NAME names the experiment, default orch).

The run's id is kept in trackers.json: a requeued or resumed attempt logs into the same run. MLflow keeps every
value sent at a step, so the steps an earlier attempt sent are not sent again (training/tracker_state.py). A
pipeline's stages are the children of one parent run named by the pipeline id (tag orch.pipeline).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from training.tracker_state import Continuity, ResumableTracker, flat

BATCH = 100  # MLflow's log_batch takes at most 100 params and 1000 metrics a call


class MlflowTracker(ResumableTracker):
    def __init__(self, run_dir: Path, config: dict, group: Optional[str]):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve().parent / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 asks for an opt-in to its file store: the one store that needs neither a server nor a
            # database, and that many nodes can share on a network file system
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.keep = Continuity(run_dir, "mlflow")
        self.run_id = self.keep.run_id
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
                return
            except Exception:  # MlflowException: not in this store (MLFLOW_TRACKING_URI changed): a new run
                self.keep.sent_before = -1  # which gets metrics.jsonl's steps from the start
        experiment = self._experiment()
        tags = {"orch.run_dir": str(run_dir)}
        if group:
            tags |= {"orch.pipeline": group, "mlflow.parentRunId": self._parent(experiment, group)}
        self.run_id = self.client.create_run(experiment, run_name=Path(run_dir).name, tags=tags).info.run_id
        self.keep.remember(run_id=self.run_id)
        params = [Param(k, v[:6000]) for k, v in flat(config).items()]  # 6000: MLflow's longest param value
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + BATCH])

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "orch")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another run created it meanwhile (MlflowException: RESOURCE_ALREADY_EXISTS)
            return self.client.get_experiment_by_name(name).experiment_id

    def _parent(self, experiment: str, group: str) -> str:
        """The pipeline's parent run: the first stage to start creates it, the others find it by its tag."""
        query = f"tags.`orch.pipeline` = '{group}' and tags.`orch.role` = 'pipeline'"
        found = self.client.search_runs([experiment], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        parent = self.client.create_run(
            experiment, run_name=group, tags={"orch.pipeline": group, "orch.role": "pipeline"}
        )
        self.client.set_terminated(parent.info.run_id)  # a folder for the stages: it runs nothing itself
        return parent.info.run_id

    def send(self, step: int, values: dict[str, float], when: float) -> None:
        from mlflow.entities import Metric

        stamp = int(1000 * when)
        metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.keep.remember(logged_step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
