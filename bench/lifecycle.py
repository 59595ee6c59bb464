"""bench/lifecycle: a skill that comes back after another, on the skill stream (issue 30 item 3).

The stream is bash, call, bash: NL2Bash training requests 0-79, then 80 BFCL `simple` training
conversations, then NL2Bash training requests 80-159 (new requests of the first skill: the data
source's `offset`). Sizes and novelty / router / seeding settings are the flagship's
(`dylora_moe` as the code running it has them: chunks of 40, its `chunk_epochs`, LoRA r 16, 8 signal examples, ...), with
`experts.validation.holdout: 2` (run B: `--holdout`, default 8; every expert keeps that many examples of each
chunk it trains on as its own held-out set). Evaluated before the stream and at its end (`experts.score: end`) on the whole NL2Bash
test split and on BFCL `simple` test prompts (the first `--call-limit`), routing on the same tasks'
held-out prompts.

Two runs, one after the other:
  A  returning skill: `experts.novelty.decider: calibrated` (the window and thresholds the
     flagship's). Shown: whether the returning bash chunks reuse bash's expert (decisions.jsonl) and
     the experts at the end.
  B  a deliberately split skill: the threshold decider with window 1 and a similarity threshold just
     above the similarity run A measured for the returning bash chunks (the highest of them + 0.02),
     so each returning chunk makes a new expert; `experts.merge.method: ties` with
     `merge.similarity` = the lowest similarity of a chunk run A reused an expert for (profiles as
     alike as chunks A judged one skill) and the merge criterion `--merge-criterion` at its default
     bound: `merged_gain` (the merge is tried and kept if it keeps at least `merge.min_transfer` 0.5 of
     each expert's own held-out gain over the backbone; the default here), `heldout_gain` (each expert
     recovers that share of the other's) or `output_kl` (`merge.max_output_kl` 0.05).
     Shown: the merges (results.json `lifecycle`) with the profile similarity and the criterion's
     measure, and for every chunk the
     pairs the merge check compared (`merge_checks` in decisions.jsonl), so a merge that does not
     happen says by how much it missed.
Both runs have merge on (A at the defaults: it shows whether different skills stay apart). Both
thresholds of B come from run A's decisions, never from a test score.

Reported per run: bash and call scores with n and Wilson 95% intervals, routing accuracy, experts;
and the paired bootstrap difference of bash (and call) between B and A on the same test examples,
with whether its interval excludes 0.

    python bench/lifecycle.py --out /work/scratch/lifecycle    # SmolLM2-135M, both runs, appends to bench/RESULTS.md
    python bench/lifecycle.py --quick --out /tmp/lc            # tiny model, a few examples: wiring check, records nothing

A run directory that already holds a results.json is read back, an interrupted one resumed.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import machine, record, train_in_child  # noqa: E402
from skillstream.evaluation.intervals import paired_difference  # noqa: E402

RUNS = ("A", "B")
TASKS = ("bash", "call")
MARGIN = 0.02  # B's novelty threshold: this much above the returning chunks' highest similarity in A


def recipe(args, run: str, thresholds: dict | None = None) -> dict:
    """The flagship recipe with the stream bash, call, bash and run A's or B's lifecycle settings."""
    from skillstream.config import find_recipe
    raw = yaml.safe_load(find_recipe("dylora_moe").read_text())
    n, size = args.examples, args.chunk_size
    evals = [{"name": "bash", "source": "nl2bash", "split": "test", "metric": "bash", "max_new_tokens": 40,
              **({"limit": args.bash_limit} if args.bash_limit else {})},
             {"name": "call", "source": "bfcl:simple", "split": "test", "metric": "tool_call", "max_new_tokens": 64,
              "limit": args.call_limit}]
    data = {k: v for k, v in raw["data"].items() if k != "eval"}
    if args.quick:  # a wiring check: short answers; 512 tokens hold every BFCL simple conversation whole (the
        data["max_length"] = 512  # longest is 431), so none is left without an answer token and out of training
        for t in evals:
            t["max_new_tokens"] = 4
    data.update(eval=evals, eval_cache=str(args.out / "eval_cache"))
    trains = [{"source": "nl2bash", "split": "train", "limit": n},
              {"source": "bfcl:simple", "split": "train", "limit": n},
              {"source": "nl2bash", "split": "train", "offset": n, "limit": n}]  # NEW bash requests
    # the returning skill's stage has the first one's name: one skill, measured (routing, oracle) by the bash task
    stages = [{"name": name, "data": {**{k: v for k, v in data.items() if k != "eval_cache"}, "eval": evals,
                                      "train": [t]}}
              for name, t in zip(("bash", "call", "bash"), trains)]
    e = copy.deepcopy(raw["experts"])
    # scored before the stream and after it, the router's choice only (a row costs ~20 min on the 2-core machine)
    # run A's held-out sets feed its calibrated decider; B's also its merge check (`--holdout`)
    holdout = 2 if run == "A" else args.holdout
    e.update(chunk_size=size, validation={"holdout": holdout, "capacity": max(8, 2 * holdout)}, score="end", oracle=False)
    if args.quick:  # a tiny random backbone: a whole epoch of a chunk, the steps to match
        e.update(chunk_epochs=1.0, router={**e["router"], "mature_steps": 2, "eval_examples": 4, "steps_per_chunk": 10,
                                           "refit_steps": 20},
                 seeding={**e["seeding"], "steps": 3, "warmup_steps": 1})
    if run == "A":
        e["novelty"] = {**e["novelty"], "decider": "calibrated"}
        e["merge"] = {"method": "ties"}
    else:
        e["novelty"] = {**e["novelty"], "similarity_threshold": thresholds["novelty"], "window": 1}
        e["merge"] = {"method": "ties", "similarity": thresholds["merge"], "criterion": args.merge_criterion}
    out = {**{k: v for k, v in raw.items() if k not in ("stages", "data", "experts")},
           "name": f"lifecycle_{run}", "experts": e, "data": data, "stages": stages, "report_to": []}
    if args.quick:
        out.update(model="tiny", lora={**raw["lora"], "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    return out


def run_stream(args, run: str, cfg: dict, runner=train_in_child) -> dict:
    """One stream, in a fresh process by default; a finished run is read back, an interrupted one resumed."""
    run_dir = args.out / run
    if not (run_dir / "results.json").exists():
        runner(cfg, run_dir, resume=(run_dir / "checkpoints").exists(), label=f"run {run}", bench="bench/lifecycle")
    return json.loads((run_dir / "results.json").read_text())


def decisions(args, run: str) -> list[dict]:
    return [json.loads(x) for x in (args.out / run / "decisions.jsonl").read_text().splitlines()]


def returning(res: dict, decs: list[dict]) -> list[dict]:
    """The decisions of the returning skill's chunks (the last stage's)."""
    first = sum(st["chunks"] for st in res["stages"][:-1])
    return [d for d in decs if d["chunk"] >= first]


def thresholds_from(res_a: dict, decs_a: list[dict]) -> dict:
    """B's settings from run A's decisions: a novelty threshold above every returning chunk's
    similarity (so each one is novel), and a merge similarity as low as the least alike chunk A reused."""
    back = [d["similarity"] for d in returning(res_a, decs_a) if d.get("similarity") is not None]
    reused = [d["similarity"] for d in decs_a if d["decision"] == "reuse" and d.get("similarity") is not None]
    if not back or not reused:
        raise SystemExit("bench/lifecycle: run A has no similarity for the returning chunks or no reuse: "
                         f"no threshold for run B can be read from it (decisions: {[d['decision'] for d in decs_a]})")
    return {"novelty": min(1.0, math.ceil((max(back) + MARGIN) * 100) / 100),
            "merge": math.floor(min(reused) * 100) / 100,
            "returning_similarities": [round(s, 4) for s in back], "reuse_similarities": [round(s, 4) for s in reused]}


def final_rows(res: dict) -> dict[str, dict]:
    return dict(zip(res["tasks"], res["details"][-1]))


def ci(row: dict) -> str:
    c = row.get("score_ci95")
    return f"{row['score']:.3f} [{c[0]:.3f}, {c[1]:.3f}]" if c else f"{row['score']:.3f}"


def decision_line(d: dict) -> str:
    sim = d.get("similarity")
    p = (d.get("p_reuse") or {}).get(d.get("best"))
    extra = f", p_reuse {p:.2f}" if p is not None else ""
    return (f"{d['chunk']} {d['skill']}: {d['decision']} {d['expert']}"
            + (f" (similarity {sim:.3f}{extra})" if sim is not None else "")
            + (f", trained {d['trained']}" if d.get("trained") else ""))


def report(args, res: dict[str, dict], decs: dict[str, list], th: dict, wall: float) -> str:
    cmd = "python bench/lifecycle.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    walls = " + ".join(f"{res[r]['wall_seconds'] / 60:.1f}" for r in RUNS)
    lines = [f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — expert lifecycle: a skill that comes back "
             f"(bash, call, bash) on {'the tiny model' if args.quick else 'SmolLM2-135M'} (bench/lifecycle, issue 30 item 3)",
             "",
             f"`{cmd}` on {machine()}, torch {__import__('torch').__version__}; wall of runs A + B {walls} min "
             f"(this invocation {wall / 60:.1f} min: a finished run is read back)"
             f"{' (--quick: wiring only, not a measurement)' if args.quick else ''}. "
             f"Stream: NL2Bash train requests 0-{args.examples - 1}, BFCL simple train {args.examples}, NL2Bash train "
             f"requests {args.examples}-{2 * args.examples - 1}; chunks of {args.chunk_size}, the flagship's "
             f"(`dylora_moe`) novelty, router and seeding settings, `validation.holdout` 2 (run B {args.holdout}). Evaluation before and after the stream: "
             f"NL2Bash test {'whole split' if not args.bash_limit else f'first {args.bash_limit}'}, BFCL simple test "
             f"first {args.call_limit}; routing on up to 40 held-out prompts per task. Seed 0, one run each.",
             "",
             f"Run B's thresholds, from run A's decisions: the returning bash chunks' similarity in A was "
             f"{th['returning_similarities']} -> novelty threshold {th['novelty']:.2f} (highest + {MARGIN}, window 1); "
             f"the chunks A reused an expert for had similarity {th['reuse_similarities']} -> merge.similarity "
             f"{th['merge']:.2f} (the lowest), {criterion_text(args.merge_criterion)}, TIES.",
             "",
             f"| run | decisions (chunk skill: decision expert) | experts at the end | merges (profile similarity, {MEASURE[args.merge_criterion]}) | "
             "bash [Wilson 95%] | call [Wilson 95%] | routing [95%] (bash, call) |",
             "|---|---|---|---|---|---|---|"]
    for run in RUNS:
        r, rows = res[run], final_rows(res[run])
        merges = "; ".join(f"{'+'.join(m['merge'])} -> {m['into']} ({m['profile_similarity']:.3f}, {measure(m)})"
                           for m in r["lifecycle"] if "merge" in m) or "none"
        routing = r["routing"]
        per = ", ".join(f"{routing['per_task'][t]['accuracy']:.2f}" for t in TASKS if t in routing["per_task"])
        rci = routing.get("ci95") or [0, 0]
        lines.append(f"| {run} | {'; '.join(decision_line(d) for d in decs[run])} | {len(r['experts'])} "
                     f"({', '.join(r['experts'])}; skill -> expert {r['skill_expert']}) | {merges} | "
                     f"{ci(rows['bash'])} n={rows['bash']['n']} | {ci(rows['call'])} n={rows['call']['n']} | "
                     f"{routing['task_agnostic_accuracy']:.3f} [{rci[0]:.3f}, {rci[1]:.3f}] n={routing['n']} ({per}) |")
    lines += ["", "| B − A, same test examples | difference | paired bootstrap 95% | interval |", "|---|---:|---|---|"]
    for t in TASKS:
        a, b = final_rows(res["A"])[t], final_rows(res["B"])[t]
        d = paired_difference(a["outcomes"], b["outcomes"])
        lines.append(f"| {t} (n={d['n']}) | {d['difference']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
                     f"{'excludes' if d['excludes_zero'] else 'includes'} 0 |")
    checks = [(run, d["chunk"], c) for run in RUNS for d in decs[run] for c in d.get("merge_checks", [])]
    lines += ["", "Merge checks (every pair compared after a chunk; a merge needs both profile similarity ≥ "
                  f"merge.similarity, A 0.95 (default) and B {th['merge']:.2f}; A then output KL ≤ 0.05, B "
                  f"{criterion_text(args.merge_criterion)}):",
              "", "| run | after chunk | pair | profile similarity | criterion's measure |", "|---|---:|---|---:|---:|"]
    lines += [f"| {run} | {chunk} | {' / '.join(c['pair'])} | {c['profile_similarity']:.3f} | {measure(c)} |"
              for run, chunk, c in checks]
    cal = res["A"]["novelty"].get("calibration") or {}
    lines += ["", f"Run A's calibrated decider: {cal.get('outcomes', 0)} outcomes, Brier "
                  f"{cal['brier']:.3f}" if cal.get("brier") is not None else "", ""]
    for run in RUNS:
        r = res[run]
        rows = [dict(zip(r["tasks"], row)) for row in r["details"]]
        lines.append(f"Run {run} (bash, call) after the stream: "
                     + "; ".join(f"{row['bash']['score']:.3f}, {row['call']['score']:.3f}" for row in rows)
                     + f" (backbone {r['initial_details'][0]['score']:.3f}, {r['initial_details'][1]['score']:.3f}); "
                     f"maturity at the end {r['routing']['policy']['maturity']} (below {r['routing']['policy']['maturity_threshold']}: "
                     f"the router mixes densely); train {r['seconds']:.0f} s, wall {r['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


MEASURE = {"output_kl": "output KL", "heldout_gain": "held-out transfer", "merged_gain": "share the merge keeps"}


def criterion_text(criterion: str) -> str:
    return ("merge.max_output_kl 0.05 (default)" if criterion == "output_kl" else
            f"merge.criterion {criterion} with merge.min_transfer 0.5 (default)")


SHARES = {"transfer": "transfer", "merged_share": "the merge keeps"}


def measure(check: dict) -> str:
    """A merge check's or merge's measure: the output KL (nats/token), the two held-out transfers (the
    share of each expert's own held-out gain the other recovers), or the two shares the merge keeps."""
    for key, label in SHARES.items():
        if key in check:
            t = check[key]
            return ("not measured (profiles apart)" if t is None else
                    f"{label} " + " / ".join("n/a (no own gain)" if x is None else f"{x:.2f}" for x in t))
    kl = check.get("output_kl")
    return "not measured (profiles apart)" if kl is None else f"output KL {kl:.4f}"


def main(argv: list[str] | None = None, runner=train_in_child) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where the two run directories go (outside the repository)")
    ap.add_argument("--examples", type=int, default=80, help="training requests per stage")
    ap.add_argument("--chunk-size", type=int, default=40)
    ap.add_argument("--bash-limit", type=int, default=None, help="NL2Bash test requests (default: the whole split, 60)")
    ap.add_argument("--call-limit", type=int, default=40, help="BFCL simple test prompts")
    ap.add_argument("--holdout", type=int, default=None,
                    help="run B: examples of each chunk an expert keeps as its held-out set (validation.holdout; "
                         "capacity twice that, at least 8; default 8, 2 with --quick: with 2 the first bash expert "
                         "showed no gain on its own 4 held-out examples)")
    ap.add_argument("--merge-criterion", choices=("merged_gain", "heldout_gain", "output_kl"), default="merged_gain",
                    help="run B's merge criterion (experts.merge.criterion)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 8 examples per stage: wiring check (records nothing)")
    ap.add_argument("--no-record", action="store_true", help="print the tables without appending them")
    args = ap.parse_args(argv)
    if args.quick:
        args.examples, args.chunk_size, args.bash_limit, args.call_limit = 8, 4, 4, 4
    args.holdout = args.holdout or (2 if args.quick else 8)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res, decs = {}, {}
    res["A"] = run_stream(args, "A", recipe(args, "A"), runner)
    decs["A"] = decisions(args, "A")
    th = thresholds_from(res["A"], decs["A"])
    res["B"] = run_stream(args, "B", recipe(args, "B", th), runner)
    decs["B"] = decisions(args, "B")
    text = report(args, res, decs, th, time.time() - t0)
    record(text, append=not (args.quick or args.no_record))
    return {"results": res, "decisions": decs, "thresholds": th, "report": text}


if __name__ == "__main__":
    main()
