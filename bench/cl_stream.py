"""Continual learning on a stream folder: methods x (AvgAcc, BWT, FWT, AvgAcc/MTL, time), both protocols.

    python bench/cl_stream.py --stream ../shared/data/glue_stream --quick      # the five methods below
    python bench/cl_stream.py --stream DIR --methods seq_lora,ewc_replay,expert_per_task,mtl [--record]
    python bench/cl_stream.py --seeds 0,1,2 --record         # every method per seed; the headline is the mean over seeds

Every method is the `adaptive_learner` recipe with overrides, run in a fresh subprocess on the
same stream, seed, sizes and step budget:
  seq_lora         one shared LoRA, no protection (the forgetting lower bound)
  ewc_replay       the recipe's defaults: gamma-gated EWC + replay + neuromodulation + early stopping
  expert_per_task  one LoRA per task, chosen at evaluation by the oracle task id
  mtl              one LoRA trained jointly on the union of all tasks (the upper bound), same total steps
  expert_pool      the expert-pool regime: one unlabelled stream of chunks, a new expert when novelty lasts,
                   a router choosing experts at evaluation (no task id); one pass over each task's examples
  expert_pool_replay  expert_pool + the recipe's replay kept per expert (a reused expert rehearses its own
                   earlier chunks)
The main protocol is generative exact match (the answer must be the label); option scoring is
reported beside it. Nothing here is tuned per task: sizes are per-stream settings.

Rows of a task folder whose label is not in its labels.json (the shared MNLI test split has 20 rows
labelled '-', MNLI's "no gold label") are skipped with `data.invalid_labels=skip` (`--invalid-labels`,
default skip here; the library's default is error): each run prints one warning per file (passed on
here) and the recorded text names the skipped rows per file.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

# Novelty: dylora_moe's absolute threshold and weights, plus thresholds calibrated on each expert's own
# chunks (novelty.py: mean - 2 std of the similarities of the chunks it reused, std at least 0.02) and
# 16-example signals (of each chunk's 30 at the quick size, 40 at the full: SIZES; dylora_moe reads 4
# of 8). Why: with the absolute threshold alone the three NLI tasks (similarity 0.85-0.93 to each other)
# shared one expert and rte was forgotten (BWT -0.067, bench/RESULTS.md 2026-12-01); these settings were
# chosen after measuring this stream's similarities, so other streams are the test of them.
POOL = {"novelty": {"similarity_threshold": 0.85, "window": 2, "signal_examples": 16,
                    "spread_z": 2.0, "min_spread": 0.02,
                    "weights": {"embedding": 0.2, "gradient": 0.3, "context": 0.5}},
        "seeding": {"lr": 1.0e-3, "steps": 10}, "consolidation": {"lr": 2.0e-4}}  # chunk_size: per size (SIZES)
METHODS = {
    "seq_lora": {"plugins": []},
    "ewc_replay": {},
    "expert_per_task": {"plugins": [], "lora.per_stage": True},
    "mtl": {"plugins": []},
    # the expert-pool regime (skillstream/experts/stream_run.py): the tasks as one unlabelled stream of
    # chunks, reuse-or-create by novelty (POOL above), a router picks experts at evaluation (task-agnostic)
    "expert_pool": {"plugins": [], "experts": POOL},
    # ... with the recipe's replay (budget, alpha, policy) kept per expert: a reused expert rehearses
    # its own earlier chunks while it learns the new ones (continual/replay.py, scope adapter)
    "expert_pool_replay": {"plugins": [{"name": "replay", "budget": 200, "alpha": 0.2, "policy": "class_balanced",
                                        "scope": "adapter"}], "experts": POOL},
}
EVAL_CACHE = "eval_cache"  # under --out: the evaluations the methods share (the backbone's initial row)
SIZES = {  # (train examples per task, test examples per task, steps per task, expert_pool chunk size)
    # quick: 15 steps of 8 per task, so the pool reads 120 examples per task, 4 chunks of 30 (the
    # novelty window is 2 chunks and the calibrated thresholds need chunks an expert took as its own).
    # At 20 steps per task (and chunks of 40) the five methods took 46.3 min, 2 at a time on 2 cores
    # (bench/RESULTS.md, 2026-12-01; expert_pool 27 min of it with the calibrated novelty): over the
    # 40-min goal, and no packing of those method times into 2 lanes fits under 42 min
    "quick": (200, 20, 15, 30),
    "full": (1000, 200, 150, 40),
}


def mtl_overrides(stream: Path, train_limit: int, test_limit: int, steps_per_task: int, max_new: int) -> dict:
    from skillstream.data.stream import read_stream

    tasks = read_stream(stream)
    return {"data.stream": None, "stages": [],
            "data.train": [{"source": str(t.folder), "instruction": t.instruction, "limit": train_limit} for t in tasks],
            "data.eval": [{"name": t.name, "source": str(t.folder), "instruction": t.instruction, "limit": test_limit,
                           "metric": "exact_match", "also": ["accuracy"], "max_new_tokens": max_new} for t in tasks],
            "train.steps": steps_per_task * len(tasks)}


def base_overrides(args, out: Path) -> dict:
    train_limit, test_limit, steps, _ = SIZES["quick" if args.quick else "full"]
    return {"model": args.model, "report_to": [], "seed": args.seed, "data.stream": str(args.stream),
            "data.invalid_labels": args.invalid_labels, "data.eval_cache": str(out / EVAL_CACHE),
            "data.stream_train_limit": train_limit, "data.stream_test_limit": test_limit,
            "train.steps": args.steps or steps}


def score_backbone(args, out: Path) -> float:
    """The initial row, once for every method: each of them starts from the backbone (an untrained
    LoRA adds nothing), so each finds these evaluations in the shared memo (data.eval_cache) instead
    of scoring the same model on the same examples again. Returns the seconds it took."""
    code = ("import json, sys\n"
            "from skillstream.config import load_recipe\n"
            "from skillstream.data.render import Renderer\n"
            "from skillstream.evaluation.memo import EvalMemo\n"
            "from skillstream.evaluation.suite import evaluate_all, prepare_eval_tasks\n"
            "from skillstream.models.backbone import load_backbone\n"
            "from accelerate import Accelerator\n"
            "from skillstream.model_setup import bf16_enabled\n"
            "cfg = load_recipe('adaptive_learner', overrides=json.loads(sys.argv[1]))\n"
            # in the runs' precision (evaluation/precision.py reads it from the Accelerator): the memo
            # keeps evaluations by precision, and the methods look theirs up in their own
            "Accelerator(mixed_precision='bf16' if bf16_enabled(cfg.train.bf16, 'cpu') else 'no', cpu=True)\n"
            "model, tok = load_backbone(cfg.model.name, seed=cfg.seed)\n"
            "renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt)\n"
            "tasks = prepare_eval_tasks(cfg, cfg.resolved_stages()[0][1])\n"
            "evaluate_all(model, tok, renderer, tasks, cfg, EvalMemo(cfg.data.eval_cache))\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(base_overrides(args, out))],
                          capture_output=True, text=True, env={**os.environ, "CI": "true"})
    if proc.returncode:
        raise SystemExit(f"scoring the backbone failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def run_method(method: str, args, out: Path) -> dict:
    train_limit, test_limit, steps, chunk_size = SIZES["quick" if args.quick else "full"]
    steps = args.steps or steps
    overrides = {**base_overrides(args, out), **METHODS[method]}
    if method == "mtl":
        overrides.update(mtl_overrides(args.stream, train_limit, test_limit, steps, 8))
    if "experts" in METHODS[method]:  # the expert-pool regime
        # the pool makes one pass over each task's examples (chunks of experts.chunk_size): give it as
        # many examples as the other methods have optimizer steps x batch, so the step budget is the same
        from skillstream.config import load_recipe

        batch = load_recipe("adaptive_learner").train.batch_size
        overrides["data.stream_train_limit"] = min(train_limit, steps * batch)
        overrides["experts"] = {**METHODS[method]["experts"], "chunk_size": chunk_size}
    code = ("import json, sys, skillstream; o = json.loads(sys.argv[1]); "
            "skillstream.train('adaptive_learner', out=sys.argv[2], overrides=o, show_progress=False)")
    env = {**os.environ, "CI": "true"}
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # share the cores between concurrent methods
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(overrides), str(out / method)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    for line in proc.stderr.splitlines():  # skipped rows: one warning per file, passed on
        if line.startswith("warning:") and "data.invalid_labels=skip" in line:
            print(f"  {method}: {line}", file=sys.stderr, flush=True)
    results = json.loads((out / method / "results.json").read_text())
    steps_done = sum(s["steps"] for s in results["stages"])
    return {"results": results, "wall_s": time.time() - t0, "train_s": results["seconds"],
            "remembered": results.get("evaluations_remembered", 0),
            "s_per_step": results["seconds"] / max(steps_done, 1)}


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def with_ci(value, ci) -> str:
    return fmt(value) if not ci else f"{fmt(value)} [{ci[0]:.3f}, {ci[1]:.3f}]"


def minus_mtl(r: dict, mtl: dict) -> str:
    """AvgAcc minus MTL's on the same test examples, with its paired-bootstrap 95% interval; '*' where
    the interval excludes 0."""
    from skillstream.evaluation.intervals import row_difference

    diff = row_difference(r["initial_details"], mtl["details"][-1], r["details"][-1])
    if diff is None or diff["ci95"] is None:
        return "n/a"
    ci = diff["ci95"]
    return f"{r['avg_acc'] - mtl['avg_acc']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]{'*' if diff['excludes_zero'] else ''}"


def table(rows: dict, protocol: str | None) -> str:
    """The main protocol's rows carry per-example outcomes: AvgAcc, BWT and FWT with their paired-bootstrap
    95% intervals and each method's difference to MTL; a further protocol has its scores only."""
    def pick(r):
        return r["results"] if protocol is None else r["results"]["protocols"][protocol]
    mtl = pick(rows["mtl"])["avg_acc"] if "mtl" in rows else None
    lines = ["| method | AvgAcc [95% CI] | BWT [95% CI] | FWT | AvgAcc / MTL | AvgAcc − MTL [paired 95% CI] | n per task "
             "| train s | s/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        p = pick(r)
        ci = p.get("ci95", {}) if protocol is None else {}
        ratio = p["avg_acc"] / mtl if mtl else None
        diff = minus_mtl(p, rows["mtl"]["results"]) if protocol is None and "mtl" in rows and name != "mtl" else ""
        lines.append(f"| {name} | {with_ci(p['avg_acc'], ci.get('avg_acc'))} | {with_ci(p['bwt'], ci.get('bwt'))} | "
                     f"{with_ci(p['fwt'], ci.get('fwt'))} | {fmt(ratio)} | {diff} | {p.get('n', '') if protocol is None else ''} | "
                     f"{r['train_s']:.0f} | {r['s_per_step']:.2f} |")
    return "\n".join(lines)


def spread(values: list[float]) -> str:
    """mean ± sample sd (min..max) of one number over seeds (the report's format), n/a for none."""
    from skillstream.report.seeds import spread as over_seeds

    return str(over_seeds(values) or "n/a")


def headline(by_seed: dict[int, dict]) -> str:
    """Each method's AvgAcc, BWT and AvgAcc / MTL as the mean over seeds with their spread."""
    methods = list(next(iter(by_seed.values())))
    lines = ["| method | AvgAcc | BWT | FWT | AvgAcc / MTL | seeds |", "|---|---:|---:|---:|---:|---:|"]
    for m in methods:
        res = [rows[m]["results"] for rows in by_seed.values()]
        ratio = [r["avg_acc"] / rows["mtl"]["results"]["avg_acc"] for r, rows in zip(res, by_seed.values())
                 if "mtl" in rows and rows["mtl"]["results"]["avg_acc"]]
        lines.append(f"| {m} | {spread([r['avg_acc'] for r in res])} | {spread([r['bwt'] for r in res])} | "
                     f"{spread([r['fwt'] for r in res])} | {spread(ratio) if ratio else 'n/a'} | {len(res)} |")
    return "\n".join(lines)


def skipped_note(stream: Path, invalid_labels: str) -> str:
    """One line naming the rows every method skipped (the same files and rows for all of them)."""
    if invalid_labels != "skip":
        return ""
    from skillstream.config import load_recipe
    from skillstream.data.examples import skipped_rows

    cfg = load_recipe("adaptive_learner", overrides={"data.stream": str(stream), "data.invalid_labels": "skip"})
    skipped = skipped_rows(cfg)
    if not skipped:
        return ""
    parts = [f"{Path(f).parent.name}/{Path(f).name}: {v['skipped']} of {v['rows']} (labels {v['labels']})"
             for f, v in skipped.items()]
    return f"Rows skipped (label not in labels.json, `data.invalid_labels=skip`): {'; '.join(parts)}.\n\n"


def pool_note(rows: dict) -> str:
    """Routing accuracy and experts created for the expert-pool methods (task-agnostic inference)."""
    lines = []
    for name, r in rows.items():
        res = r["results"]
        if "routing" in res:
            lines.append(f"{name}: routing accuracy {res['routing']['task_agnostic_accuracy']:.3f}, "
                         f"{res['experts_created']} experts for {res['skills']} tasks "
                         f"({', '.join(f'{k} -> {v}' for k, v in res['skill_expert'].items())}), "
                         f"created at chunks {res['novelty']['first_expert_at'] + res['novelty']['created_at']} "
                         f"(task boundaries {res['novelty']['true_boundaries']})")
    return "".join(f"{x}\n" for x in lines) + ("\n" if lines else "")


def memo_note(rows: dict, backbone_s: float) -> str:
    """Which task evaluations of each matrix came from the memo (the same weights on the same inputs)."""
    counts = ", ".join(f"{name} {r['remembered']}" for name, r in rows.items())
    return (f"Task evaluations taken from the memo (same weights, same examples: the backbone's initial row, "
            f"scored once in {backbone_s:.0f} s before the methods; an expert no later task touched): {counts}.\n")


def overhead_note(rows: dict) -> str:
    if "seq_lora" not in rows or "ewc_replay" not in rows:
        return ""
    base, ewc = rows["seq_lora"], rows["ewc_replay"]
    per_step = ewc["s_per_step"] / base["s_per_step"] - 1
    return (f"EWC+replay time overhead vs seq_lora (same run): {per_step:+.1%} per step "
            f"({ewc['s_per_step']:.2f} vs {base['s_per_step']:.2f} s/step; goal <= +15%), "
            f"{ewc['train_s'] / base['train_s'] - 1:+.1%} in total train time.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stream", type=Path, default=ROOT.parent / "shared" / "data" / "glue_stream")
    # the longest first, so the last method to start is a short one (2 at a time on 2 cores)
    ap.add_argument("--methods", default="expert_pool,ewc_replay,seq_lora,mtl,expert_per_task")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="steps per task (overrides the size)")
    ap.add_argument("--seed", type=int, default=0, help="one seed (see --seeds)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds: every method runs once per seed, "
                                                  "and a headline table gives the mean and spread over them")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--jobs", type=int, default=None,
                    help="methods run at once, each in its own process with cores/jobs threads "
                         "(default: as many as there are cores, at most one per method)")
    ap.add_argument("--invalid-labels", choices=["error", "skip"], default="skip",
                    help="rows whose label is not in labels.json: skip them, counted and reported (default), or stop")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown methods {unknown} (known: {', '.join(METHODS)})", file=sys.stderr)
        sys.exit(2)
    if not args.stream.is_dir():
        print(f"error: --stream {args.stream}: not a folder", file=sys.stderr)
        sys.exit(2)
    if args.jobs is None:
        args.jobs = max(1, min(len(methods), os.cpu_count() or 1))
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: expected a positive number", file=sys.stderr)
        sys.exit(2)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    except ValueError:
        print(f"error: --seeds {args.seeds!r}: expected comma-separated integers", file=sys.stderr)
        sys.exit(2)
    root = args.out or Path(tempfile.mkdtemp(prefix="cl_stream-"))
    t0 = time.time()
    by_seed, sections = {}, []
    for seed in seeds:
        args.seed = seed
        out = root / f"seed-{seed}" if len(seeds) > 1 else root
        print(f"seed {seed}: scoring the backbone once for every method ...", file=sys.stderr, flush=True)
        backbone_s = score_backbone(args, out)

        def one(m: str) -> dict:
            print(f"seed {seed}: running {m} ...", file=sys.stderr, flush=True)
            return run_method(m, args, out)

        # methods are independent processes; with --jobs N, N of them share the machine at a time (on 2
        # cores two 1-thread processes get more done than one 2-thread process at these batch sizes)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            rows = dict(zip(methods, pool.map(one, methods)))
        by_seed[seed] = rows
        sections.append(f"### seed {seed}\n\nGenerative exact match (main protocol):\n\n{table(rows, None)}\n\n"
                        f"Option scoring:\n\n{table(rows, 'accuracy')}\n\n{pool_note(rows)}"
                        f"{memo_note(rows, backbone_s)}{overhead_note(rows)}")
    wall = time.time() - t0
    size = "quick" if args.quick else "full"
    cmd = "python bench/cl_stream.py " + " ".join(sys.argv[1:])
    text = (f"## {date.today()} cl_stream ({size}, {args.model}, seeds {', '.join(map(str, seeds))})\n\n`{cmd}` on "
            f"{common.machine()}, stream {args.stream.name}, run dirs in {root}; "
            f"{args.jobs} method(s) at a time, wall {wall / 60:.1f} min for the whole command\n\n"
            f"{skipped_note(args.stream, args.invalid_labels)}"
            + (f"Headline, mean over {len(seeds)} seeds (sample sd; min..max), generative exact match:\n\n"
               f"{headline(by_seed)}\n\n" if len(seeds) > 1 else "")
            + "\n".join(sections))
    common.record(text, append=args.record)


if __name__ == "__main__":
    main()
