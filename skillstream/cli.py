"""The `skillstream` command: a thin layer over the Python API (skillstream.train / skillstream.load)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from .allocator import fix_mmap_threshold
from .errors import TrainingDiverged, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Teach a language model skill after skill.")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings
    warnings.filterwarnings("ignore")


def print_summary(run) -> None:
    from rich.console import Console
    from rich.table import Table

    from .evaluation.intervals import shown

    r = run.results
    table = Table(title=f"{run.config.name}: before and after training")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("before", justify="right")
    for st in r["stages"]:
        table.add_column(f"after {st['name']}", justify="right")
    for j, task in enumerate(r["tasks"]):
        extra = r["initial_details"][j].get("structure")
        # each score with its 95% interval where the metric has per-example outcomes (evaluation/intervals.py)
        cells = [shown(d[j]["score"], d[j].get("score_ci95")) for d in [r["initial_details"], *r["details"]]]
        n = r["initial_details"][j].get("n")
        table.add_row(task if n is None else f"{task} (n={n})", r["metric"][task], *cells)
        if extra is not None:
            table.add_row("", "structure", f"{extra:.4f}", *[f"{d[j]['structure']:.4f}" for d in r["details"]])
    console = Console(stderr=False)
    console.print(table)
    tps = sum(s["tokens"] for s in r["stages"]) / max(r["seconds"], 1e-9)
    console.print(f"train time {r['seconds']:.1f}s  ·  {tps:.0f} tokens/s  ·  truncated examples {r['truncated']}"
                  f"{f' (not trained on, no trainable token left: {u})' if (u := r.get('untrainable')) else ''}"
                  f"  ·  run directory {run.run_dir}")
    if "routing" not in r and len(r["matrix"]) > 1 and r.get("ci95"):  # several stages: the continual-learning numbers
        console.print(f"AvgAcc {shown(r['avg_acc'], r['ci95']['avg_acc'])}  ·  BWT {shown(r['bwt'], r['ci95']['bwt'])}"
                      f"  ·  FWT {shown(r['fwt'], r['ci95']['fwt'])}  (95% intervals: paired bootstrap over examples)")
    if "routing" in r:  # a skill stream (experts:): how the learner found and routed the skills
        nov = r["novelty"]
        oracle = r["oracle"]["avg_acc"]
        ci = r.get("ci95", {})
        console.print(f"AvgAcc {shown(r['avg_acc'], ci.get('avg_acc'))} (oracle expert choice "
                      f"{shown(oracle, r['oracle'].get('avg_acc_ci95'))})  ·  "
                      f"BWT {shown(r['bwt'], ci.get('bwt'))}  ·  routing accuracy "
                      f"{shown(r['routing']['task_agnostic_accuracy'], r['routing'].get('ci95'))}  ·  experts {r['experts_created']} for "
                      f"{r['skills']} skills  ·  new experts at chunks {nov['created_at']} (true boundaries "
                      f"{nov['true_boundaries']})  ·  wall {r['wall_seconds']:.0f}s")
    if len(r.get("learned") or []) > 1:  # several stages: did each teach its own task (paired, same examples)
        console.print("learned (own stage − before, paired 95%): " + "  ·  ".join(
            f"{task} {shown(d['difference'], d['ci95'], 3)}{'' if d['excludes_zero'] else ' includes 0'}"
            for task, d in zip(r["tasks"], r["learned"])))


@app.command()
def train(recipe: str = typer.Argument(..., help="Bundled recipe name or path to a recipe YAML."),
          out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/NAME)."),
          set_: list[str] = typer.Option([], "--set", help="Override: key.path=value (repeatable)."),
          resume: bool = typer.Option(False, "--resume", help="Continue the run in the run directory."),
          resume_from: Optional[str] = typer.Option(None, "--resume-from", metavar="ckpt-N",
                                                    help="Continue the run from this checkpoint of RUN_DIR/checkpoints "
                                                         "(implies --resume; the later ones are set aside)."),
          smoke: bool = typer.Option(False, "--smoke", help="Every stage for a few steps on a few examples."),
          processes: int = typer.Option(1, "--processes",
                                        help="Data-parallel processes (through `accelerate launch`; gloo on CPU). "
                                             "train.batch_size is per process.")):
    """Train a recipe; writes a run directory."""
    from .config import load_recipe, parse_override
    from .run import check_run_dir, resolve_run_dir, train as run_train

    overrides = dict(parse_override(s) for s in set_)
    if processes < 1:
        raise UserError(f"--processes must be 1 or more, not {processes}")
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        from .run_lock import run_lock

        run_dir = resolve_run_dir(load_recipe(recipe, overrides, smoke).name, out)
        # this process outlives the ones it launches, so it holds the run directory's lock for them
        with run_lock(run_dir):
            # bad input: status 2 and one line here, before any process starts (they would each say it)
            check_run_dir(run_dir, resume or resume_from is not None, overrides, smoke)
            args = ["train", recipe, *(["--out", str(out)] if out else []), *[a for s in set_ for a in ("--set", s)],
                    *(["--resume"] if resume else []), *(["--resume-from", resume_from] if resume_from else []),
                    *(["--smoke"] if smoke else [])]
            sys.exit(launch_processes(processes, args, run_dir))
    _die_with_launcher()
    run = run_train(recipe, out=out, resume=resume, smoke=smoke, overrides=overrides, resume_from=resume_from)
    if run.results:  # the main process's; the others return none
        print_summary(run)


def launch_processes(n: int, args: list[str], run_dir: Path) -> int:
    """`accelerate launch` N copies of `skillstream ARGS` on this machine (torchrun underneath); exit status.
    The caller holds RUN_DIR's lock: the launched processes are told so, and die with the caller."""
    import signal
    import socket
    import subprocess

    from .run_lock import HELD_BY_LAUNCHER

    with socket.socket() as s:  # a free port, so runs side by side do not collide on 29500
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --multi_gpu picks torchrun; without CUDA, skillstream.run joins with gloo on the CPU (accelerate's
    # own --cpu launcher would start one process and expect mpirun to start the rest).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "skillstream.cli", *args]
    env = {**os.environ, HELD_BY_LAUNCHER: str(Path(run_dir).resolve())}
    # torchrun's agent dies with this process (and its workers with it, _die_with_launcher): the lock
    # this process holds is freed only when nothing of the run is left writing the directory
    pdeathsig = (lambda: _prctl_pdeathsig(signal.SIGKILL)) if sys.platform.startswith("linux") else None
    return subprocess.run(cmd, env=env, preexec_fn=pdeathsig).returncode


def _die_with_launcher() -> None:
    """Under torchrun each process has its own session, so a launcher killed with SIGKILL would leave
    them training and writing the run directory: ask Linux to kill this process with its parent."""
    if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux"):
        import signal

        _prctl_pdeathsig(signal.SIGKILL)


def _prctl_pdeathsig(sig: int) -> None:
    """Linux: deliver SIG to this process when its parent dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., help="A run directory."),
          checkpoint: Optional[str] = typer.Option(None, "--checkpoint", metavar="best|final|ckpt-N",
                                                   help="Which weights: final (default), best (the best_final "
                                                        "plugin's) or a resumable checkpoint ckpt-N.")):
    """Evaluate a run's model on its recipe's test data; writes RUN_DIR/eval.json (eval-CHECKPOINT.json)."""
    from .run_lock import run_lock
    from .trained import load

    with run_lock(run_dir):  # not while a train or --resume writes the run (nor another eval)
        trained = load(run_dir, checkpoint=checkpoint)
        out = trained.evaluate()
    for name, r in out["tasks"].items():
        extras = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float) and k not in ("score", r["metric"]))
        print(f"{name}: {r['metric']} {r['score']:.4f}  {extras}".rstrip())
    print(f"wrote {trained.eval_file}")


@app.command()
def generate(run_dir: Path, prompt: str,
             expert: Optional[str] = typer.Option(None, "--expert", help="Expert (adapter) to answer with "
                                                  "(default: the router's choice, or the run's only adapter)."),
             max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens")):
    """Generate with the run's model."""
    from .trained import load

    trained = load(run_dir, expert)
    text = trained.generate(prompt, max_new_tokens)
    if trained.last_routing is not None:  # which experts answered, with their weights
        print(f"[experts: {trained.last_routing.describe(0)}]", file=sys.stderr)
    print(text)


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="One run directory, or several to compare."),
           out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default RUN_DIR/report.html; "
                                              "with several runs FIRST_RUN_DIR/report-compare.html).")):
    """Write a self-contained HTML report of a run, or a comparison of several runs."""
    from .report import paired
    from .report.html import load_runs, write_runs
    from .report.seeds import seed_groups, text

    runs = load_runs(run_dirs)
    print(f"wrote {write_runs(runs, out)}")
    for line in paired.text([(str(run.path), run.results) for run in runs if run.results]):
        print(line)  # the paired differences too: they go into bench/RESULTS.md
    if len(runs) > 1:  # the headline over seeds, also in the terminal (it goes into bench/RESULTS.md)
        for group in seed_groups(runs):
            print(text(group))


@app.command()
def sweep(recipe: str = typer.Argument(..., help="Bundled recipe name or path to a recipe YAML."),
          grid: list[str] = typer.Option([], "--grid", help="key.path=value1,value2: the values a recipe key takes "
                                         "(repeatable; grid: every combination, tpe: the choices)."),
          trials: Optional[int] = typer.Option(None, "--trials", help="Trials for --sampler tpe (grid: all combinations)."),
          sampler: str = typer.Option("grid", "--sampler", help="grid or tpe (Optuna's GridSampler / TPESampler)."),
          metric: str = typer.Option("validation.score", "--metric", help="The objective: a number of each trial's "
                                     "results.json on validation data (validation.score or validation.tasks.TASK.FIELD)."),
          direction: str = typer.Option("maximize", "--direction", help="maximize or minimize the metric."),
          out: Optional[Path] = typer.Option(None, "--out", help="Sweep directory (default sweeps/NAME)."),
          set_: list[str] = typer.Option([], "--set", help="Override for every trial: key.path=value (repeatable)."),
          smoke: bool = typer.Option(False, "--smoke", help="Every trial a smoke run (a few steps on a few examples).")):
    """Sweep hyperparameters on Optuna: each trial a run directory, compared in DIR/report.html; re-run to resume."""
    from .config import parse_override
    from .sweep import SWEEP_FILE, make_spec, resolve_sweep_dir, run_sweep

    spec, notes = make_spec(recipe, grid, sampler=sampler, trials=trials, metric=metric, direction=direction,
                            overrides=dict(parse_override(s) for s in set_), smoke=smoke)
    for note in notes:
        print(f"note: {note}", flush=True)
    result = run_sweep(spec, out)
    sweep_dir = resolve_sweep_dir(spec, out)
    best = result["best"]
    if best is not None:
        print(f"best: trial {best['number']} ({' '.join(f'{k}={v}' for k, v in best['params'].items())}) "
              f"{spec.metric} {best['value']:.4f}  ·  {sweep_dir / best['run_dir']}")
    print(f"wrote {sweep_dir / SWEEP_FILE} and {sweep_dir / 'report.html'}")


@app.command()
def monitor(run_dir: Path = typer.Argument(..., help="A run directory, finished or in progress."),
            once: bool = typer.Option(False, "--once", help="Render one frame and exit."),
            interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes."),
            csv: Optional[Path] = typer.Option(None, "--csv", metavar="FILE",
                                               help="Write the run's metrics.jsonl to FILE as CSV and exit.")):
    """Follow a run live in the terminal: stage, loss, tokens/s, ETA, experts, alerts."""
    if csv is not None:
        from .monitor.export import export_csv

        rows, columns = export_csv(run_dir, csv)
        print(f"wrote {csv}: {rows} rows, {columns} columns")
        return
    from .monitor.live import monitor as run_monitor

    run_monitor(run_dir, once=once, interval=interval)


@app.command()
def toolformer(inp: Path = typer.Argument(..., metavar="IN.jsonl", help="Rows with 'text' (or 'original_text') or 'messages'."),
               out: Path = typer.Argument(..., metavar="OUT.jsonl", help="Augmented rows: original_text, augmented_text, tool_calls."),
               model: str = typer.Option("smollm2-135m", "--model", help="Model that proposes and scores the calls."),
               tau: float = typer.Option(0.1, "--tau", help="Keep a call when it lowers the loss of the next tokens by at least this."),
               tools: str = typer.Option("calculator,python,search", "--tools", help="Comma-separated tools."),
               positions: int = typer.Option(3, "--positions", help="Candidate positions per text and tool."),
               samples: int = typer.Option(2, "--samples", help="Calls sampled per position."),
               threshold: float = typer.Option(0.0, "--threshold", help="Minimum probability of opening a call at a position."),
               max_calls: int = typer.Option(3, "--max-calls", help="Most calls kept per text."),
               seed: int = typer.Option(0, "--seed")):
    """Annotate text with tool calls the Toolformer way: propose, execute, keep what lowers the loss."""
    from .tools.toolformer import run_file

    totals = run_file(inp, out, model, tau, [t.strip() for t in tools.split(",") if t.strip()], seed=seed,
                      positions=positions, samples=samples, threshold=threshold, max_calls=max_calls)
    print(f"wrote {out}: " + "  ".join(f"{k} {v}" for k, v in totals.items()))


@app.command()
def recipes():
    """List the bundled recipes."""
    from .config import list_recipes

    for name, desc in list_recipes():
        print(f"{name:20s} {desc}")


@app.command()
def export(run_dir: Path, out: Path,
           merge: Optional[str] = typer.Option(None, "--merge", help="Also write a merged full model for this expert.")):
    """Copy the run's experts (PEFT adapter folders) to OUT; optionally a merged model for one expert."""
    from .run_lock import run_lock
    from .run_files import EXPERTS

    with run_lock(run_dir):  # not a copy of experts/ that a --resume is rewriting
        src = Path(run_dir) / EXPERTS
        if not src.is_dir():
            raise UserError(f"{run_dir}: no experts/ folder (is it a finished run directory?)")
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out}: already exists and is not empty")
        shutil.copytree(src, out / EXPERTS, dirs_exist_ok=True)
        from .experts.stream_run import ROUTER_DIR
        if (Path(run_dir) / ROUTER_DIR).is_dir():  # skill-stream runs: router.safetensors + router.json (+ profiles)
            shutil.copytree(Path(run_dir) / ROUTER_DIR, out / ROUTER_DIR, dirs_exist_ok=True)
        if merge:
            from .trained import load

            m = load(run_dir, merge)
            merged = m.model.merge_and_unload()
            merged.save_pretrained(str(out / f"merged-{merge}"))
            m.tokenizer.save_pretrained(str(out / f"merged-{merge}"))
    print(f"exported to {out}")


def main() -> None:
    _quiet_libraries()
    fix_mmap_threshold()  # before the model's first allocation: freed activations leave the resident set
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown option, missing argument) come from the click that typer vendors
        # (typer._click); recognise them by their interface rather than a private import path.
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
