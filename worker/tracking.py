"""Experiment trackers a job can also report to, each off by default and switched on in ``spec.tracking``:

- TensorBoard: event files written with tensorboardX (no TensorFlow needed) into a scratch folder, uploaded to
  the artifact store (``jobs/<id>/tensorboard``) when training ends; ``GET /api/v1/jobs/{id}/tensorboard``
  downloads them as a zip.
- MLflow: the ``mlflow-skinny`` client logs the flattened spec as parameters and every logged value as a
  metric. Without a tracking URI it writes a local store, ``data_dir/mlflow.db`` (MLflow 3 refuses the old
  ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``). A server must be at an allowed address
  and local stores (``file://``, ``sqlite://``, paths) are for the admin's jobs only (app/core/netguard.py).
- Weights & Biases: ``wandb`` when it is installed and logged in (``wandb login`` or ``WANDB_API_KEY``).

A tracker that cannot start (package missing, server unreachable) adds a warning to the job's event log and
training goes on without it: a long run is not lost to a dashboard. Our own callback rather than the
Trainer's ``report_to`` integrations: those read global environment variables, and one worker runs many jobs
with different settings.
"""

import logging
import shutil
import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from app.core.db import session_scope
from app.core.settings import get_settings
from app.core.spec import JobSpec
from app.core.storage import get_store
from app.services.compare import flatten
from app.services.jobs import add_event

log = logging.getLogger(__name__)

TENSORBOARD_KEY = "tensorboard"
MLFLOW_PARAM_LIMIT = 6000  # characters MLflow accepts in a parameter value


def split_logs(logs: dict[str, Any]) -> tuple[str, dict[str, float]] | None:
    """("train" | "eval", numeric values without the ``eval_`` prefix); None for the end-of-training summary."""
    if "train_runtime" in logs:
        return None
    split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
    values = {
        key.removeprefix("eval_"): float(value)
        for key, value in logs.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key != "epoch"
    }
    return split, values


def _mlflow_uri_problem(job_id: int, uri: str | None) -> str | None:
    """Why this job may not use its MLflow URI (app/core/netguard.py), or None; local stores need an admin's job."""
    from app.core.models import Job, User
    from app.core.netguard import mlflow_uri_problem

    if not uri:
        return None
    with session_scope() as session:
        job = session.get(Job, job_id)
        owner = session.get(User, job.owner_id) if job is not None and job.owner_id is not None else None
        local_allowed = job is not None and (job.owner_id is None or (owner is not None and owner.is_admin))
    return mlflow_uri_problem(uri.strip(), local_allowed)


def _warn(job_id: int, message: str) -> None:
    log.warning("job %s: %s", job_id, message)
    with session_scope() as session:
        add_event(session, job_id, "warning", message)
        session.commit()


class TrackingCallback(TrainerCallback):
    """Fans every logged step out to the trackers the job's spec turned on."""

    def __init__(self, job_id: int, spec: JobSpec, job_name: str | None = None) -> None:
        self.job_id = job_id
        self.spec = spec
        self.settings = spec.tracking
        self.job_name = job_name or spec.name or f"job {job_id}"
        self.tb_writer: Any = None
        self.tb_dir: Any = None
        self.mlflow: Any = None
        self.mlflow_run_id: str | None = None
        self.wandb_run: Any = None

    # ---- start ----------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.settings.tensorboard:
            self._start_tensorboard()
        if self.settings.mlflow:
            self._start_mlflow()
        if self.settings.wandb:
            self._start_wandb()

    def _start_tensorboard(self) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            _warn(self.job_id, "tracking.tensorboard is on but tensorboardX is not installed on this worker")
            return
        self.tb_dir = get_store().scratch_dir(f"tensorboard-{self.job_id}")
        self.tb_writer = SummaryWriter(logdir=str(self.tb_dir), flush_secs=10)
        self.tb_writer.add_text("spec", f"```\n{self.spec.model_dump_json(indent=2)}\n```", 0)

    def _start_mlflow(self) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param
        except ImportError:
            _warn(
                self.job_id,
                "tracking.mlflow is on but MLflow is not installed on this worker (pip install mlflow-skinny)",
            )
            return
        problem = _mlflow_uri_problem(self.job_id, self.settings.mlflow_tracking_uri)
        if problem:
            # Checked at submit too; again here because DNS answers change and the spec may predate the rule.
            _warn(self.job_id, f"MLflow tracking is off for this job: {problem}")
            return
        uri = (
            self.settings.mlflow_tracking_uri or f"sqlite:///{get_settings().resolved_data_dir / 'mlflow.db'}"
        )
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(self.settings.mlflow_experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(self.settings.mlflow_experiment)
            )
            run = client.create_run(
                experiment_id,
                run_name=self.job_name,
                tags={"peft_studio.job_id": str(self.job_id), "peft_studio.method": self.spec.method},
            )
            params = [
                Param(key, str(value)[:MLFLOW_PARAM_LIMIT])
                for key, value in flatten(self.spec.model_dump(mode="json")).items()
            ]
            client.log_batch(run.info.run_id, params=params)
        except Exception as exc:  # a tracker must never stop training
            _warn(self.job_id, f"MLflow tracking ({uri}) could not start: {type(exc).__name__}: {exc}")
            return
        self.mlflow, self.mlflow_run_id = client, run.info.run_id

    def _start_wandb(self) -> None:
        try:
            import wandb  # type: ignore[import-not-found]
        except ImportError:
            _warn(
                self.job_id,
                "tracking.wandb is on but wandb is not installed on this worker (pip install wandb)",
            )
            return
        try:
            self.wandb_run = wandb.init(
                project=self.settings.wandb_project,
                name=self.job_name,
                config=self.spec.model_dump(mode="json"),
                tags=[self.spec.method],
                reinit="finish_previous",
            )
        except Exception as exc:
            _warn(self.job_id, f"Weights & Biases tracking could not start: {type(exc).__name__}: {exc}")

    # ---- each log -------------------------------------------------------------------------------

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        parsed = split_logs(logs or {})
        if parsed is None:
            return
        split, values = parsed
        step = state.global_step
        if self.tb_writer is not None:
            for name, value in values.items():
                self.tb_writer.add_scalar(f"{split}/{name}", value, step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(f"{split}/{name}", value, now, step) for name, value in values.items()]
            try:
                self.mlflow.log_batch(self.mlflow_run_id, metrics=metrics)
            except Exception as exc:
                _warn(self.job_id, f"MLflow stopped taking metrics: {type(exc).__name__}: {exc}")
                self.mlflow = None
        if self.wandb_run is not None:
            self.wandb_run.log({f"{split}/{name}": value for name, value in values.items()}, step=step)

    # ---- end ------------------------------------------------------------------------------------

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self) -> None:
        """Flush and close every tracker; upload the TensorBoard folder to the artifact store."""
        if self.tb_writer is not None:
            self.tb_writer.close()
            self.tb_writer = None
            store = get_store()
            try:
                store.put_dir(self.tb_dir, store.job_key(self.job_id, TENSORBOARD_KEY))
            finally:
                shutil.rmtree(self.tb_dir, ignore_errors=True)
        if self.mlflow is not None:
            try:
                self.mlflow.set_terminated(self.mlflow_run_id, "FINISHED")
            except Exception as exc:
                _warn(self.job_id, f"MLflow run could not be closed: {type(exc).__name__}: {exc}")
            self.mlflow = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def tracking_callbacks(job_id: int, spec: JobSpec) -> list[TrainerCallback]:
    """The tracking callback when the spec turns any tracker on, else nothing."""
    settings = spec.tracking
    if settings.tensorboard or settings.mlflow or settings.wandb:
        return [TrackingCallback(job_id, spec)]
    return []
