"""Experiment trackers: Weights & Biases and MLflow, beside TensorBoard.

``logging.wandb`` and ``logging.mlflow`` in a recipe turn them on. The logging rank
(global rank 0) opens each tracker once, gives it the resolved recipe as the run's
configuration / parameters, and sends it every step's scalars: the same ones
``metrics.jsonl`` and TensorBoard get (``train/loss``, ``train/lr``, ..., ``valid/loss``).
The run's identity is written to ``<output_dir>/trackers.json`` so that ``hcx eval
--log-to RUN_DIR`` can add its scores to the same runs.

Both packages are optional extras (``pip install hcx[wandb]``, ``hcx[mlflow]``); both
work without a network (W&B ``mode: offline``, MLflow's local file or SQLite store).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hcx.errors import HcxError

TRACKERS_FILE = "trackers.json"


class TrackerError(HcxError, RuntimeError):
    """A tracker that cannot start (its package missing, a bad store)."""


def _import(package: str, extra: str):
    try:
        return __import__(package)
    except ImportError as e:
        raise TrackerError(
            f"logging.{extra} is set but the {package!r} package does not import ({e}); "
            f"install it with `pip install hcx[{extra}]` (or remove logging.{extra})") from None


def scalar_items(record: dict[str, Any]) -> dict[str, float]:
    """A step record's scalars under the names TensorBoard uses (``train/loss``,
    ``valid/loss``): finite numbers only, the step itself left out."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k if k.startswith("valid") else f"train/{k}"] = float(v)
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested recipe as dotted ``key: value`` strings (MLflow parameters are flat
    strings of at most 6,000 characters)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v, ensure_ascii=False)[:6000] if not isinstance(v, str) else v[:6000]
    return out


class WandbTracker:
    def __init__(self, settings, recipe: dict[str, Any], out_dir: Path,
                 resume_id: str | None = None):
        wandb = _import("wandb", "wandb")
        folder = Path(settings.dir) if settings.dir else out_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=settings.group,
            name=settings.name or recipe.get("name"), tags=list(settings.tags) or None,
            mode=settings.mode, dir=str(folder), config=recipe,
            id=resume_id, resume="allow" if resume_id else None, reinit="create_new")
        self.identity = {"id": self.run.id, "project": settings.project,
                         "entity": settings.entity, "mode": settings.mode, "dir": str(folder)}

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, settings, recipe: dict[str, Any], out_dir: Path,
                 resume_id: str | None = None):
        mlflow = _import("mlflow", "mlflow")
        # MLflow 3 refuses its folder store unless told otherwise: a SQLite file is the
        # local default that needs nothing else.
        uri = settings.tracking_uri or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        if resume_id is None:
            exp = self.client.get_experiment_by_name(settings.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(settings.experiment)
            run = self.client.create_run(exp_id, run_name=settings.run_name or recipe.get("name"),
                                         tags=dict(settings.tags))
            self.run_id = run.info.run_id
            params = flat_params(recipe)
            keys = sorted(params)
            for i in range(0, len(keys), 100):  # the server's batch limit
                self.client.log_batch(self.run_id, params=[
                    mlflow.entities.Param(k, params[k]) for k in keys[i:i + 100]])
        else:
            self.run_id = resume_id
        self._metric = mlflow.entities.Metric
        self.identity = {"run_id": self.run_id, "tracking_uri": uri,
                         "experiment": settings.experiment}

    def log(self, scalars: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self._metric(k.replace("@", "_"), v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """Every tracker the recipe turns on (none: a no-op). Rank 0 only."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def from_recipe(cls, recipe, out_dir: Path) -> "Trackers":
        """Open the recipe's trackers; a resumed run continues its runs (the ids in
        ``trackers.json``) instead of starting new ones."""
        cfg = recipe.logging
        saved = read_identities(out_dir)
        trackers: list = []
        config = recipe.to_dict()
        if cfg.wandb is not None and cfg.wandb.mode != "disabled":
            trackers.append(WandbTracker(cfg.wandb, config, out_dir,
                                         (saved.get("wandb") or {}).get("id")))
        if cfg.mlflow is not None:
            trackers.append(MlflowTracker(cfg.mlflow, config, out_dir,
                                          (saved.get("mlflow") or {}).get("run_id")))
        out = cls(trackers)
        if trackers:
            (out_dir / TRACKERS_FILE).write_text(json.dumps(out.identities(), indent=1))
        return out

    def identities(self) -> dict[str, dict]:
        return {("wandb" if isinstance(t, WandbTracker) else "mlflow"): t.identity
                for t in self.trackers}

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        scalars = scalar_items(record)
        if scalars:
            for t in self.trackers:
                t.log(scalars, record.get("step", 0) if step is None else step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def read_identities(run_dir: Path) -> dict[str, dict]:
    path = Path(run_dir) / TRACKERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def log_scores(run_dir: Path, scores: dict[str, float], step: int | None = None,
               prefix: str = "eval/") -> list[str]:
    """Add evaluation scores to the tracker runs of the training run in ``run_dir``
    (its ``trackers.json``): W&B as summary values and a logged step, MLflow as metrics.
    Returns the trackers written to. Raises TrackerError when the run has none."""
    saved = read_identities(run_dir)
    if not saved:
        raise TrackerError(f"{run_dir} has no {TRACKERS_FILE}: its training run logged to no "
                           "tracker (set logging.wandb or logging.mlflow in its recipe)")
    scalars = {f"{prefix}{k}": float(v) for k, v in scores.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    done = []
    if "wandb" in saved:
        wandb = _import("wandb", "wandb")
        w = saved["wandb"]
        run = wandb.init(project=w["project"], entity=w.get("entity"), id=w["id"],
                         resume="allow", mode=w.get("mode", "offline"), dir=w.get("dir"),
                         reinit="create_new")
        if step is not None:
            run.log(scalars, step=step)
        run.summary.update(scalars)
        run.finish()
        done.append("wandb")
    if "mlflow" in saved:
        mlflow = _import("mlflow", "mlflow")
        m = saved["mlflow"]
        client = mlflow.tracking.MlflowClient(tracking_uri=m["tracking_uri"])
        import time

        now = int(time.time() * 1000)
        client.log_batch(m["run_id"], metrics=[
            mlflow.entities.Metric(k.replace("@", "_"), v, now, step or 0)
            for k, v in scalars.items()])
        done.append("mlflow")
    return done
