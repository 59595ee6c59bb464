"""`skillstream sweep`: hyperparameter sweeps on Optuna, each trial a normal run directory.

    skillstream sweep quickstart --grid train.lr=1e-4,5e-4 --grid lora.r=8,16

Optuna chooses the trials (GridSampler: every combination; TPESampler: `--trials N` of them) and keeps
the study in an SQLite file in the sweep directory (DIR/optuna.db). Each trial trains the recipe with
its values as overrides into DIR/trial-NNN (skillstream.run.train, the same run directory as
`skillstream train` writes), and its objective is a number of that run's results.json measured on
validation data: by default `validation.score`, the evaluation tasks scored on training examples held
out of training (data.validation_eval, see evaluation/validation.py), never the test split, so the
test scores stay an unbiased estimate of the chosen setting. DIR/sweep.json and DIR/report.html hold
the comparison of all trials.

Killed and re-run with the same command, a sweep goes on: finished trials are kept, a trial that was
running is resumed from its run directory's newest checkpoint (train's --resume: bit-exact), then
Optuna is asked for the rest.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import RecipeConfig, load_recipe, parse_override
from .errors import TrainingDiverged, UserError
from .files import write_atomic

SWEEP_FILE = "sweep.json"
STORAGE = "optuna.db"
STUDY = "sweep"
REPORT = "report.html"
SAMPLERS = ("grid", "tpe")
DIRECTIONS = ("maximize", "minimize")
DEFAULT_METRIC = "validation.score"
# the share of each training source held out when the recipe holds none out itself
DEFAULT_VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep is: the same spec again resumes it, another is refused on its directory."""
    recipe: str
    grid: dict[str, list]        # recipe key -> the values tried (Optuna categorical choices)
    sampler: str
    trials: int
    metric: str
    direction: str
    overrides: dict[str, Any]    # --set, plus the validation settings the sweep adds
    smoke: bool
    seed: int                    # the sampler's seed: the recipe's
    recipe_config: dict          # the recipe after --set, as loaded: a changed recipe file is caught on resume


def parse_grid(texts: list[str]) -> dict[str, list]:
    """['train.lr=1e-4,5e-4'] -> {'train.lr': [0.0001, 0.0005]}; each value read as --set reads it (YAML)."""
    grid: dict[str, list] = {}
    for text in texts:
        if "=" not in text:
            raise UserError(f"--grid {text!r}: expected key.path=value1,value2")
        key, values = (part.strip() for part in text.split("=", 1))
        parsed = [_number(parse_override(f"{key}={v.strip()}")[1]) for v in values.split(",") if v.strip()]
        if not parsed:
            raise UserError(f"--grid {text!r}: no values (expected key.path=value1,value2)")
        if key in grid:
            raise UserError(f"--grid {key}: given twice (put every value in one --grid {key}=a,b)")
        bad = [v for v in parsed if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise UserError(f"--grid {key}: {bad[0]!r} is not a single value (a number, word or true/false)")
        if len(set(map(repr, parsed))) != len(parsed):
            raise UserError(f"--grid {key}: a value is repeated ({values})")
        grid[key] = parsed
    if not grid:
        raise UserError("sweep: give at least one --grid key=value1,value2")
    return grid


def _number(value: Any) -> Any:
    """'1e-4' as the float it means: YAML 1.1 (and so --set) reads exponents without a dot as text, which
    the recipe would accept, but the sweep's table, plots and Optuna's sampler should see a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def make_spec(recipe: str, grid_args: list[str], *, sampler: str = "grid", trials: int | None = None,
              metric: str = DEFAULT_METRIC, direction: str = "maximize", overrides: dict | None = None,
              smoke: bool = False) -> tuple[SweepSpec, list[str]]:
    """The checked sweep, and notes for the user (settings it added). Bad input is a UserError, before any trial."""
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if direction not in DIRECTIONS:
        raise UserError(f"--direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    grid = parse_grid(grid_args)
    overrides = dict(overrides or {})
    for key in grid:
        if key in overrides:
            raise UserError(f"--grid {key}: also given with --set; sweep it or fix it, not both")
    base = load_recipe(recipe, overrides, smoke)
    notes = []
    if not base.data.validation_eval:
        overrides["data.validation_eval"] = True
    if base.data.validation_fraction == 0 and not any(st.data.validation_fraction for st in base.resolved_stages()):
        overrides["data.validation_fraction"] = DEFAULT_VALIDATION_FRACTION
        # a stage with its own data block (dylora_moe's four skills) does not read the recipe's
        own = base.stages_with_own_data()
        overrides.update({f"stages.{i}.data.validation_fraction": DEFAULT_VALIDATION_FRACTION for i in own})
        reads_recipe = len(own) < max(1, len(base.stages))  # some stage (or the recipe's one) reads `data`
        keys = ["data.validation_fraction"] * reads_recipe + [f"stages.{i}.data.validation_fraction" for i in own]
        notes.append(f"data.validation_fraction is 0 in {base.name}: each trial holds out "
                     f"{DEFAULT_VALIDATION_FRACTION} of every training source for validation "
                     f"({' '.join(f'--set {k}=F' for k in keys)} to choose)")
    base = load_recipe(recipe, overrides, smoke)
    from .evaluation.validation import check_validation
    check_validation(base)
    for key, values in grid.items():  # every value on its own: a key that is not the recipe's, a bad value
        for value in values:
            try:
                load_recipe(recipe, {**overrides, key: value}, smoke)
            except UserError as e:
                raise UserError(f"--grid {key}={value}: {e}") from None
    _check_metric(metric, base)
    size = math.prod(len(v) for v in grid.values())
    if sampler == "grid":
        if trials is not None and trials != size:
            raise UserError(f"--trials {trials}: a grid sweep runs every combination ({size}); "
                            f"--trials is for --sampler tpe")
        trials = size
    elif trials is None or trials < 1:
        raise UserError("--sampler tpe: give --trials N (N >= 1)")
    return SweepSpec(str(recipe), grid, sampler, trials, metric, direction, overrides, smoke, base.seed,
                     base.model_dump(mode="json")), notes


def _check_metric(metric: str, cfg: RecipeConfig) -> None:
    """The objective must be measured on validation data: validation.score or validation.tasks.TASK.FIELD."""
    tasks = [t.name for t in cfg.resolved_stages()[0].data.eval]
    parts = metric.split(".")
    if parts[0] != "validation":
        raise UserError(f"--metric {metric}: a sweep selects on validation data, not on the test scores; "
                        f"expected validation.score or validation.tasks.TASK.score (tasks: {', '.join(tasks)})")
    if parts == ["validation", "score"]:
        return
    if len(parts) != 4 or parts[1] != "tasks" or parts[2] not in tasks:
        raise UserError(f"--metric {metric}: not in results.json; expected validation.score or "
                        f"validation.tasks.TASK.FIELD with TASK one of {', '.join(tasks)}")


def metric_value(results: dict, metric: str, where: Path) -> float:
    """The number at the dotted path `metric` of a trial's results.json; a path it lacks is a UserError."""
    node: Any = results
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            have = sorted(_numeric_paths(results.get("validation", {}), "validation"))
            raise UserError(f"--metric {metric}: not in {where} (it has {', '.join(have)})")
        node = node[part]
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise UserError(f"--metric {metric}: {where} holds {node!r} there, not a number")
    return float(node)


def _numeric_paths(node: Any, prefix: str) -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _numeric_paths(v, f"{prefix}.{k}")]
    return [prefix] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


# -- the sweep ---------------------------------------------------------------------------------------

def resolve_sweep_dir(spec: SweepSpec, out: str | Path | None) -> Path:
    return Path(out) if out else Path("sweeps") / spec.recipe_config["name"]


def trial_dir(sweep_dir: Path, number: int) -> Path:
    return sweep_dir / f"trial-{number:03d}"


def _check_sweep_dir(sweep_dir: Path, spec: SweepSpec) -> None:
    """A new (or empty) directory, or one this same sweep was started in."""
    from .run_lock import LOCK_FILE

    saved_file = sweep_dir / SWEEP_FILE
    if saved_file.is_file():
        saved = json.loads(saved_file.read_text())["spec"]
        new = json.loads(json.dumps(asdict(spec)))  # as it would be saved (tuples to lists)
        for field, value in new.items():
            if saved.get(field) != value:
                shown = "the recipe (after --set)" if field == "recipe_config" else \
                    f"{field} {json.dumps(saved.get(field))}"
                raise UserError(f"{sweep_dir}: this sweep was started with {shown}, which this command changes; "
                                f"re-run the same command to resume it, or pick a new --out")
    elif sweep_dir.exists() and any(p.name != LOCK_FILE for p in sweep_dir.iterdir()):
        raise UserError(f"{sweep_dir}: exists and is not a sweep directory (no {SWEEP_FILE}); pick a new --out")


def _sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler(spec.grid, seed=spec.seed)
    # TPE starts from independent random trials (Optuna's default is 10); a short sweep gets half its
    # budget that way, so the rest is still chosen by the model of what scored well
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=min(10, max(1, spec.trials // 2)))


def run_sweep(spec: SweepSpec, out: str | Path | None = None, show_progress: bool = True) -> dict:
    """Run (or resume) the sweep; returns sweep.json's content. Writes DIR/sweep.json and DIR/report.html."""
    import optuna

    from .run_lock import run_lock

    sweep_dir = resolve_sweep_dir(spec, out)
    with run_lock(sweep_dir):  # one sweep at a time in a directory: a trial RUNNING in the study is a killed one
        _check_sweep_dir(sweep_dir, spec)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write_summary(sweep_dir, spec, None)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(sweep_dir / STORAGE).resolve()}")
        study = optuna.create_study(storage=storage, study_name=STUDY, sampler=_sampler(spec),
                                    direction=spec.direction, load_if_exists=True)
        _retry_interrupted(study, storage, sweep_dir)
        left = spec.trials - len([t for t in study.get_trials(deepcopy=False) if _counted(t)])
        if left > 0:
            study.optimize(_Objective(spec, sweep_dir, show_progress), n_trials=left, catch=(TrainingDiverged,),
                           callbacks=[lambda study, _trial: _write_summary(sweep_dir, spec, study)])
        return _write_summary(sweep_dir, spec, study, finished=True)


def _counted(t) -> bool:
    """A trial that used up one of the sweep's trials: done, or failed for a reason of its own (diverged)."""
    from optuna.trial import TrialState

    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)


def _interrupted(t) -> bool:
    """Killed (left RUNNING) or stopped by Ctrl-C (Optuna marks that FAIL): not a result of its setting."""
    from optuna.trial import TrialState

    return t.state == TrialState.RUNNING or (t.state == TrialState.FAIL and "error" not in t.user_attrs)


def _retry_interrupted(study, storage, sweep_dir: Path) -> None:
    """Each trial a killed sweep left unfinished is failed and queued again with its setting and run
    directory (Optuna's RetryFailedTrialCallback does the same for trials whose heartbeat stopped); the
    retry resumes that run directory from its newest checkpoint."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("resumes") for t in trials}
    study_id = storage.get_study_id_from_name(STUDY)
    for t in trials:
        if not _interrupted(t) or t.number in retried:
            continue
        if t.state == TrialState.RUNNING:
            storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                           TrialState.FAIL)
        where = t.user_attrs.get("run_dir")
        print(f"trial {t.number} was interrupted: it goes on first"
              + (f", resuming {sweep_dir / where}" if where else ""), flush=True)
        study.enqueue_trial(t.params, user_attrs={"resumes": t.number, **({"run_dir": where} if where else {})})


class _Objective:
    """One trial: train its setting into its run directory (or resume that), return the metric."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, show_progress: bool):
        self.spec, self.sweep_dir, self.show_progress = spec, sweep_dir, show_progress

    def __call__(self, trial) -> float:
        from .run import train

        spec = self.spec
        params = {key: trial.suggest_categorical(key, values) for key, values in spec.grid.items()}
        same = _same_setting(trial.study, trial.number, params)
        if same is not None:  # TPE can draw a setting again; a seeded run would repeat the earlier one exactly
            print(f"trial {trial.number}: {_shown(params)} is trial {same.number}'s setting; its value is reused",
                  flush=True)
            trial.set_user_attr("same_as", same.number)
            return same.value
        if "run_dir" not in trial.user_attrs:  # trial-000, trial-001, ... in the order settings are first tried
            used = {t.user_attrs["run_dir"] for t in trial.study.get_trials(deepcopy=False) if "run_dir" in t.user_attrs}
            trial.set_user_attr("run_dir", trial_dir(self.sweep_dir, len(used)).name)
        run_dir = self.sweep_dir / trial.user_attrs["run_dir"]
        print(f"trial {trial.number} ({_shown(params)}) -> {run_dir}", flush=True)
        results_file = run_dir / "results.json"
        try:
            if results_file.is_file():  # finished, but the sweep was killed before the study was told
                results = json.loads(results_file.read_text())
            else:
                resume = (run_dir / "config.yaml").is_file()
                if run_dir.exists() and not resume:  # killed before train wrote anything of the run
                    shutil.rmtree(run_dir)
                results = train(spec.recipe, out=run_dir, resume=resume, smoke=spec.smoke,
                                overrides={**spec.overrides, **params}, show_progress=self.show_progress).results
        except TrainingDiverged as e:  # a setting that diverges is a result of the sweep, not the end of it
            print(f"trial {trial.number} failed: {e}", flush=True)
            trial.set_user_attr("error", str(e))
            raise
        value = metric_value(results, spec.metric, results_file)
        if not math.isfinite(value):  # Optuna records a trial with a non-finite value as failed
            trial.set_user_attr("error", f"{spec.metric} is {value}")
        print(f"trial {trial.number}: {spec.metric} {value:.4f}", flush=True)
        return value


def _same_setting(study, number: int, params: dict):
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != number and t.params == params and "same_as" not in t.user_attrs:
            return t
    return None


def _shown(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _write_summary(sweep_dir: Path, spec: SweepSpec, study, finished: bool = False) -> dict:
    """sweep.json (the spec, every trial, the best) and, once there are trials, report.html."""
    from optuna.trial import TrialState

    trials, best = [], None
    for t in study.get_trials(deepcopy=False) if study is not None else []:
        state = "interrupted" if _interrupted(t) else t.state.name.lower()
        trials.append({"number": t.number, "run_dir": t.user_attrs.get("run_dir"), "params": t.params,
                       "state": state, "value": t.value,
                       **{k: t.user_attrs[k] for k in ("same_as", "resumes", "error") if k in t.user_attrs}})
    done = [t for t in trials if t["state"] == TrialState.COMPLETE.name.lower()]
    if done:
        pick = max if spec.direction == "maximize" else min
        best = pick(done, key=lambda t: t["value"])
    summary = {"spec": asdict(spec), "storage": STORAGE, "study": STUDY, "finished": finished,
               "trials": trials, "best": best}
    write_atomic(sweep_dir / SWEEP_FILE, json.dumps(summary, indent=1))
    if trials:
        from .report.sweep import write_sweep_report
        write_sweep_report(sweep_dir, summary)
    return summary
