"""What a run sends to its experiment trackers (`report_to`: tensorboard, mlflow, wandb), through
Accelerate's tracker classes.

Accelerate logs scalars to every tracker alike; what it leaves to each tracker's own API is done
here, one function per kind of record:

* scalars (:func:`log_scalars`): every tracker, at a step;
* tables (:func:`log_table`): rows of text and numbers (sample generations, alerts, novelty
  decisions, the accuracy matrix). W&B logs a ``wandb.Table``; MLflow appends the rows to the run's
  ``tables/<key>.json`` (``mlflow.log_table``); TensorBoard, which has no table, gets each row as a
  markdown text under ``<key>/<i>``;
* the run directory's files as artifacts (:func:`log_run_files`): MLflow's run artifacts, a W&B
  artifact of type ``run``; TensorBoard writes inside the run directory already.

The trackers are built here rather than by name (``Accelerator(log_with=["mlflow"])``) because
Accelerate names every tracker's project after one `project_name`: here the MLflow experiment and
the W&B project are the recipe's name, TensorBoard keeps RUN_DIR/tb, and a resumed run goes on in
the same MLflow and W&B run (their ids are kept in RUN_DIR/trackers.json).
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # report_to name -> package
TRACKER_IDS = "trackers.json"  # the MLflow run id and W&B run id a resumed run logs on to
# what a tracker gets of the run directory: the run's records and model files, not the resumable
# checkpoints (many times the model's size) nor the trackers' own folders
SKIPPED = {"checkpoints", "tb", "wandb", "mlruns", "mlflow.db", ".lock"}


def check_trackers(report_to: list[str]) -> None:
    """One line naming a chosen tracker whose package is not installed (Accelerate would drop it silently)."""
    for name in report_to:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError as e:
            raise UserError(f"report_to: {name} needs the {TRACKERS[name]} package, which does not import ({e}); "
                            f"pip install 'skillstream[trackers]' or drop {name} from report_to") from None


def build_trackers(report_to: list[str], run_dir: Path, project: str) -> list:
    """Accelerate's tracker objects for `report_to`, ready for `Accelerator(log_with=...)`."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    ids = json.loads((run_dir / TRACKER_IDS).read_text()) if (run_dir / TRACKER_IDS).is_file() else {}
    out = []
    for name in report_to:
        if name == "tensorboard":
            out.append(TensorBoardTracker("tb", run_dir))
        elif name == "mlflow":  # the server is MLFLOW_TRACKING_URI's (MLflow's own default without it)
            out.append(MLflowTracker(experiment_name=project, run_name=run_dir.name, run_id=ids.get("mlflow")))
        elif name == "wandb":  # WANDB_MODE, WANDB_DIR and the rest of wandb's environment apply
            out.append(WandBTracker(project, name=run_dir.name, **({"id": ids["wandb"], "resume": "allow"}
                                                                    if "wandb" in ids else {})))
    return out


def start_trackers(accelerator, run_dir: Path, config: dict) -> None:
    """Start the trackers with the recipe as their hyperparameters; keep the MLflow and W&B run ids."""
    accelerator.init_trackers("tb", config=config)
    ids = {}
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            ids["mlflow"] = tracker.tracker.info.run_id
        elif tracker.name == "wandb":
            ids["wandb"] = tracker.tracker.id
    if ids:
        write_atomic(run_dir / TRACKER_IDS, json.dumps(ids, indent=1))


def numeric(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record, nested dicts flattened into slash-separated names (booleans as 0/1)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(numeric(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
    return out


def log_scalars(accelerator, values: dict[str, float], step: int) -> None:
    if accelerator is not None and accelerator.trackers and values:
        accelerator.log(values, step=step)


def log_table(accelerator, key: str, columns: list[str], rows: list[list], step: int) -> None:
    """Rows of a table at `step`, in each tracker's own form (see the module doc)."""
    if accelerator is None or not rows:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log_table(key, columns=columns, data=rows, step=step)
        elif tracker.name == "mlflow":
            import mlflow
            data = {c: [_cell(r[i]) for r in rows] for i, c in enumerate(columns)}
            mlflow.log_table({"global_step": [step] * len(rows), **data}, artifact_file=f"tables/{key}.json",
                             run_id=tracker.tracker.info.run_id)
        elif tracker.name == "tensorboard":  # add_text renders markdown
            tracker.log({f"{key}/{i}": _markdown(columns, row) for i, row in enumerate(rows)}, step=step)


def log_run_files(accelerator, run_dir: Path) -> None:
    """The run directory's files (not SKIPPED) as the trackers' artifacts."""
    if accelerator is None:
        return
    files = [p for p in sorted(run_dir.iterdir()) if p.name not in SKIPPED and not p.name.startswith(".")]
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            for p in files:
                if p.is_dir():
                    tracker.log_artifacts(str(p), artifact_path=p.name)
                else:
                    tracker.log_artifact(str(p))
        elif tracker.name == "wandb":
            import wandb
            artifact = wandb.Artifact(f"run-{tracker.tracker.id}", type="run")
            for p in files:
                if p.is_dir():
                    artifact.add_dir(str(p), name=p.name)
                else:
                    artifact.add_file(str(p))
            tracker.tracker.log_artifact(artifact)


def _cell(v):
    """A table cell MLflow can store: JSON values as they are, a non-finite float as its text."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)


def _markdown(columns: list[str], row: list) -> str:
    """One row as markdown: numbers and single words on one line, text (prompts, outputs, messages) as
    indented code blocks, shown verbatim."""
    short, long = [], []
    for c, v in zip(columns, row):
        text = v if isinstance(v, str) else json.dumps(v)
        (long if isinstance(v, str) and (not v or any(ch.isspace() for ch in v)) else short).append((c, text))
    head = "  ·  ".join(f"{c} {t}" for c, t in short)
    blocks = ["{}:\n\n{}".format(c, "\n".join("    " + line for line in (t or " ").split("\n"))) for c, t in long]
    return "\n\n".join([head, *blocks]) if head else "\n\n".join(blocks)
