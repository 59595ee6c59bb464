"""bench/toolformer_sft: what MUSE's Toolformer data adds to its SFT stage (issue 32 item 1).

Two arms of the bundled `muse` recipe's sft stage, the same seeds, steps, batch and evaluation:
  with     the recipe as bundled: BFCL train conversations mixed (weight 0.25) with the `toolformer`
           builder's calculator conversations (packaged `arithmetic` train split, loss-filtered)
  without  BFCL train conversations alone
Scored after the stage on the whole BFCL test split (`tool_call`: AST accuracy, tool selection,
irrelevance accuracy) and on held-out arithmetic word problems with the calculator run between
turns (`tool_use`: answer accuracy, calls made where they help). The backbone is scored once
(data.eval_cache) for both arms.

Reported: per arm, the mean over seeds with its spread (sd) and each seed's Wilson interval; the
difference with - without per seed and pooled (each example's outcome averaged over the seeds, then
a paired bootstrap over examples), and whether its 95% interval excludes 0.

    python bench/toolformer_sft.py --quick             # tiny model, 2 steps: wiring check; records nothing
    python bench/toolformer_sft.py --seeds 0,1,2 --record
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, record  # noqa: E402
from skillstream.evaluation.intervals import paired_difference  # noqa: E402

BFCL = "bfcl:simple,live_simple,multiple,parallel,irrelevance"
ARMS = ("without", "with")


def overrides(args, arm: str, seed: int, out: Path) -> dict:
    o = {"stage": "sft", "seed": seed, "report_to": [], "plugins": [], "data.eval_cache": str(out / "eval_cache"),
         "train.steps": args.steps, "train.warmup_steps": max(1, args.steps // 10),
         "train.batch_size": args.micro_batch, "train.grad_accum": args.batch // args.micro_batch,
         "train.checkpoint_every": max(1, args.steps // 2), "model": {"name": "tiny" if args.quick else "smollm2-135m", "dtype": args.dtype},
         "data.eval": [{"name": "bfcl", "source": BFCL, "split": "test", "metric": "tool_call",
                        "max_new_tokens": 96, **({"limit": args.limit} if args.limit else {})},
                       {"name": "arithmetic_tools", "source": "arithmetic", "split": "test", "limit": args.arith_limit,
                        "metric": "tool_use", "max_new_tokens": 48}]}
    if args.quick:
        o.update({"lora.target_modules": ["q_proj", "v_proj"], "data.max_length": 256})
    if arm == "without":
        o["data.train"] = [{"source": BFCL, "split": "train"}]
    elif args.quick:  # the tiny model's loss is lowered by no call: keep every executed one
        o.update({"data.train.1.build.limit": 16, "data.train.1.build.tau": -100.0})
    return o


def run_arm(args, arm: str, seed: int, out: Path) -> dict:
    run_dir = out / f"{arm}-s{seed}"
    if (run_dir / "results.json").exists():  # an interrupted bench picks up where it stopped
        return json.loads((run_dir / "results.json").read_text())
    code = ("import json, sys, skillstream; o = json.loads(sys.argv[1]); "
            "skillstream.train('muse', out=sys.argv[2], overrides=o, show_progress=False, resume=sys.argv[3] == '1')")
    t0 = time.time()
    print(f"  {arm} seed {seed} ...", end="", flush=True, file=sys.stderr)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(overrides(args, arm, seed, out)), str(run_dir),
                           "1" if (run_dir / "checkpoints").exists() else "0"],
                          capture_output=True, text=True, env={**os.environ, "CI": "true"})
    if proc.returncode:
        raise SystemExit(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    print(f" {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return json.loads((run_dir / "results.json").read_text())


def rows(results: dict) -> dict[str, dict]:
    """Each task's evaluation row after the sft stage."""
    return dict(zip(results["tasks"], results["details"][-1]))


# (task, field, label): field None = the row's score, whose per-example outcomes are paired
METRICS = [("bfcl", None, "BFCL AST accuracy"), ("bfcl", "tool_selection", "BFCL tool selection"),
           ("bfcl", "irrelevance_accuracy", "BFCL irrelevance accuracy"),
           ("arithmetic_tools", None, "arithmetic answer accuracy (calculator run)"),
           ("arithmetic_tools", "helpful_call_rate", "arithmetic calls where they help"),
           ("arithmetic_tools", "call_rate", "arithmetic call rate")]


# the examples a field's rate is over, where not all of the task's
SUBSET_N = {"tool_selection": "n_relevant", "irrelevance_accuracy": "n_irrelevant"}


def cell(values: list[float | None]) -> str:
    if None in values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(by_arm: dict[str, dict[int, dict]], seeds: list[int], initial: dict) -> str:
    lines = ["| metric | backbone | without Toolformer (mean ± sd) | with Toolformer (mean ± sd) | "
             "with - without, pooled paired bootstrap | per seed: without / with [Wilson 95%] |",
             "|---|---|---|---|---|---|"]
    for task, field, label in METRICS:
        def value(row):
            return row["score"] if field is None else row[field]

        vals = {a: [value(rows(by_arm[a][s])[task]) for s in seeds] for a in ARMS}
        diff = "per-example outcomes: only for the main scores"
        if field is None:
            pooled = {a: [statistics.mean(col) for col in zip(*(rows(by_arm[a][s])[task]["outcomes"] for s in seeds))]
                      for a in ARMS}
            d = paired_difference(pooled["without"], pooled["with"])
            diff = (f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
                    f"({'excludes' if d['excludes_zero'] else 'includes'} 0)")
        seeds_txt = []
        for s in seeds:
            pair = []
            for a in ARMS:
                r = rows(by_arm[a][s])[task]
                ci = r["score_ci95"] if field is None else r["ci95"][field]
                pair.append("n/a" if value(r) is None else
                            f"{value(r):.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
            seeds_txt.append(f"s{s}: " + " / ".join(pair))
        base = value(initial[task])
        first = rows(by_arm["with"][seeds[0]])[task]
        lines.append(f"| {label} (n={first[SUBSET_N.get(field, 'n')]}) | {cell([base])} | {cell(vals['without'])} | "
                     f"{cell(vals['with'])} | {diff} | {'; '.join(seeds_txt)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=40, help="sft optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="conversations per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=2, help="conversations per forward (batch / micro-batch accumulated)")
    ap.add_argument("--dtype", default="auto", help="model.dtype of the backbone")
    ap.add_argument("--limit", type=int, default=None, help="BFCL test prompts (default: the whole split)")
    ap.add_argument("--arith-limit", type=int, default=100, help="held-out arithmetic problems")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-toolformer"))
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 steps, 4 examples: wiring check (records nothing)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.micro_batch, args.limit, args.arith_limit = 2, 2, 2, 4, 4
    if args.batch % args.micro_batch:
        sys.exit(f"--batch {args.batch} must be a multiple of --micro-batch {args.micro_batch}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    by_arm = {a: {} for a in ARMS}
    for s in seeds:  # seed by seed, so that an interrupted bench has whole pairs
        for a in ARMS:
            by_arm[a][s] = run_arm(args, a, s, args.out)
    wall = time.time() - t0
    initial = dict(zip(by_arm["with"][seeds[0]]["tasks"], by_arm["with"][seeds[0]]["initial_details"]))
    kept = [by_arm["with"][s]["stages"][0].get("built") for s in seeds]
    cmd = "python bench/toolformer_sft.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = (f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — Toolformer data in muse's sft stage (bench/toolformer_sft)\n\n"
            f"`{cmd}` on {machine()}, torch {__import__('torch').__version__}; wall of this invocation {wall / 60:.1f} min for "
            f"{len(seeds)} seeds x 2 arms{' (--quick: wiring only, not a measurement)' if args.quick else ''}. "
            f"muse's sft stage, {args.steps} steps of {args.batch} conversations, model.dtype {args.dtype}; "
            f"BFCL test {'whole split' if not args.limit else f'first {args.limit}'}, arithmetic test first {args.arith_limit}.\n\n"
            + table(by_arm, seeds, initial) + f"\n\nToolformer builds (with arm, per seed): {json.dumps(kept)}\n")
    record(text, append=args.record and not args.quick)


if __name__ == "__main__":
    main()
