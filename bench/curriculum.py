"""bench/curriculum: auto-curriculum mixing strategies against the uniform mixture, in ONE run.

A mixture of four training sources of different difficulty, one of them unlearnable:
  easy    repetitive English (a few template sentences; generated, seeded)
  bash    NL2Bash requests and commands (builtin nl2bash, train split)
  prose   the Python language reference (builtin pydoc_topics, train split)
  noise   random characters (generated, seeded): nothing to learn beyond the alphabet
          `--noise printable` (default): 300 random printable ASCII characters; the tokenizer merges
          some neighbours, so a model from scratch keeps learning which merged tokens occur (its loss
          falls slowly for hundreds of steps: measured in bench/RESULTS.md)
          `--noise symbols`: 150 symbols drawn uniformly from the printable characters that are one
          token each after a space, space-separated: a uniform distribution over single tokens, whose
          loss floor (ln of the alphabet size) is reached early -- unlearnable after that
Validation: held-out examples of the three learnable sources (fresh easy texts, nl2bash test
split, pydoc_topics test split); validation loss = mean over those sources of their mean
per-example token loss, measured every --eval-every steps by a probe plugin.

Every strategy trains the same model from the same seed for the same number of steps through the
same sampler (the curriculum plugin's per-batch mixture sampling; `uniform` keeps equal weights).
`oracle` is not a curriculum: uniform over the three learnable sources only, i.e. what a rule that
knew the noise source at step 0 would get from removing it (re-weighting the learnable sources could
gain more; removing the noise alone gains this much). With `--probe held_out` (the default) every
strategy, uniform and oracle included, trains without the probe examples, so all see the same data.
Reported per strategy: steps to reach the uniform mixture's FINAL validation loss (first probe at
or below it; ratio to uniform's steps), final validation loss, and the noise source's weight
(at the start, mean over the second half, at the end).

    python bench/curriculum.py --quick            # wiring check: tiny model, a few steps; records nothing
    python bench/curriculum.py                    # tiny model trained from scratch, 300 steps, 4 strategies
    python bench/curriculum.py --record           # ... and append the tables to bench/RESULTS.md

Goal (issue 6): the best adaptive strategy needs <= 0.8x the steps of uniform and gives the noise
source less weight over time. `difficulty-raw` is the seed's rule with raw (not per-share)
progress, kept for comparison; `difficulty-var` is the difficulty rule on the seed's combined signal,
mean loss + `--var-coef` x its variance. `hardest` (weights proportional to difficulty) is included to show
what naive "sample the hardest" does with an unlearnable source.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "bench" / "RESULTS.md"
SOURCES = ("easy", "bash", "prose", "noise")
LEARNABLE = ("easy", "bash", "prose")

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the old man"]
VERBS = ["sat on", "looked at", "walked to", "painted", "cleaned", "found"]
OBJECTS = ["the mat", "a red door", "the garden", "the small table", "a blue car", "the window"]


def easy_text(rng: random.Random, sentences: int = 8) -> str:
    return " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(sentences))


def noise_text(rng: random.Random, chars: int = 300) -> str:
    return "".join(chr(rng.randrange(33, 127)) for _ in range(chars))


def single_token_symbols(tok) -> list[str]:
    """Printable ASCII characters that the tokenizer keeps as ONE token after a space."""
    return [c for c in map(chr, range(33, 127)) if len(tok(" " + c, add_special_tokens=False)["input_ids"]) == 1]


def symbols_text(rng: random.Random, symbols: list[str], count: int = 150) -> str:
    return " ".join(rng.choice(symbols) for _ in range(count))


def write_data(folder: Path, n_train: int, n_val: int, seed: int, noise) -> dict[str, Path]:
    """`noise` makes one noise text from an RNG."""
    rng = random.Random(seed)
    files = {}
    for name, make, n in (("easy", easy_text, n_train), ("noise", noise, n_train), ("easy_val", easy_text, n_val)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": make(rng)}) + "\n" for _ in range(n)))
        files[name] = path
    return files


def make_probe(val_items: dict, pad_id: int, every: int):
    from skillstream.curriculum.auto import per_example_loss
    from skillstream.plugins import Plugin

    class ValidationProbe(Plugin):
        """Mean validation loss over the learnable sources, at step 0 and every `every` steps."""
        name = "validation_probe"

        def __init__(self):
            self.curve: list[tuple[int, float, dict]] = []

        def _measure(self, ctx):
            per = {k: sum(v) / len(v) for k, v in ((k, per_example_loss(ctx.model, items, pad_id)) for k, items in val_items.items())}
            self.curve.append((ctx.step, sum(per.values()) / len(per), per))

        def before_stage(self, ctx):
            self._measure(ctx)

        def after_step(self, ctx, metrics):
            if ctx.step % every == 0 or ctx.step == ctx.total_steps:
                self._measure(ctx)
            return {"validation/loss": self.curve[-1][1]} if self.curve[-1][0] == ctx.step else None

    return ValidationProbe()


def run_strategy(mode: str, args, files: dict, out: Path, val_items: dict, pad_id: int) -> dict:
    from skillstream.run import train

    sources = [{"source": str(files["easy"])}, {"source": "nl2bash"}, {"source": "pydoc_topics"}]
    if mode != "oracle":
        sources.append({"source": str(files["noise"])})
    recipe = {
        "name": f"curriculum-{mode}", "seed": args.seed, "report_to": [],
        "model": {"name": args.model, "freeze_backbone": args.model != "tiny"},
        "lora": None if args.model == "tiny" else {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"max_length": args.max_length, "train": sources},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "schedule": "constant",
                  "warmup_steps": min(10, args.steps // 10), "log_every": args.eval_every,
                  "checkpoint_every": 10 ** 9, "bf16": False},
        "plugins": [{"name": "auto_curriculum", "mixing": "uniform" if mode == "oracle" else mode.split("-")[0], "freeze_interval": args.freeze_interval,
                     "sample_size": args.sample_size, "eta": args.eta, "bandit_lr": args.bandit_lr,
                     **{k: getattr(args, k) for k in ("max_scale", "smoothing", "absolute", "probe")},
                     **({"progress": "raw"} if mode == "difficulty-raw" else {}),
                     **({"var_coef": args.var_coef} if mode == "difficulty-var" else {})}],
    }
    probe = make_probe(val_items, pad_id, args.eval_every)
    t0 = time.time()
    train(recipe, out=out / mode, show_progress=False, plugins=[probe])
    from skillstream.checkpoint import list_checkpoints

    state = json.loads((list_checkpoints(out / mode / "checkpoints")[-1] / "state.json").read_text())["run_state"]
    curriculum = state["plugins"]["curriculum"]       # one entry per refresh, step 0 included
    names = curriculum["names"]
    noise = next((i for i, n in enumerate(names) if n.startswith("noise")), None)  # None: the oracle has none
    weights = [(h["step"], h["weights"][noise] if noise is not None else 0.0) for h in curriculum["history"]]
    half = [w for s, w in weights if s > args.steps / 2] or [weights[-1][1]]
    return {"mode": mode, "curve": [(s, v) for s, v, _ in probe.curve], "final_per_source": probe.curve[-1][2],
            "final": probe.curve[-1][1], "noise_weight": {"start": weights[0][1], "second_half_mean": sum(half) / len(half),
                                                          "end": weights[-1][1]},
            "weights_end": dict(zip(names, curriculum["weights"])), "seconds": time.time() - t0,
            "history": curriculum["history"]}


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((s for s, v in curve if v <= target + 1e-12), None)


def table(results: list[dict], steps: int) -> str:
    reference = next((r for r in results if r["mode"] == "uniform"), results[0])  # --no-uniform: the first mode
    target = reference["final"]
    lines = [f"Target: {reference['mode']}'s final validation loss on the learnable sources = {target:.4f} "
             f"(after {steps} steps)", "",
             "| strategy | steps to target | x uniform | final val loss | noise weight at step 0 / mean over 2nd half / end | final weights | s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        s = steps_to(r["curve"], target)
        ratio = f"{s / steps:.2f}x" if s is not None else "not reached"
        w = r["noise_weight"]
        ends = ", ".join(f"{k} {v:.2f}" for k, v in r["weights_end"].items())
        lines.append(f"| {r['mode']} | {s if s is not None else '-'} | {ratio} | {r['final']:.4f} | "
                     f"{w['start']:.3f} / {w['second_half_mean']:.3f} / {w['end']:.3f} | {ends} | {r['seconds']:.0f} |")
    adaptive = [r for r in results if r["mode"] in ("difficulty", "difficulty-raw", "difficulty-var", "bandit", "alignment")]
    best = min(adaptive, key=lambda r: (steps_to(r["curve"], target) or 10 ** 9), default=None)
    if best is not None:
        s = steps_to(best["curve"], target)
        met = s is not None and s <= 0.8 * steps and best["noise_weight"]["end"] < best["noise_weight"]["start"]
        lines += ["", f"Best adaptive strategy: {best['mode']} ({'%.2fx' % (s / steps) if s else 'not reached'}); "
                      f"goal <= 0.8x uniform and less noise weight over time: {'met' if met else '**NOT met**'}"]
    hardest = next((r for r in results if r["mode"] == "hardest"), None)
    if hardest is not None:
        lines.append(f"Naive 'hardest': noise weight {hardest['noise_weight']['start']:.3f} -> "
                     f"{hardest['noise_weight']['end']:.3f} (sampling by difficulty feeds the unlearnable source).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, a few steps: wiring check (records nothing)")
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    ap.add_argument("--modes", default="uniform,difficulty,bandit,hardest",
                    help="comma-separated: uniform, difficulty, difficulty-raw, difficulty-var, bandit, alignment, hardest, oracle")
    ap.add_argument("--no-uniform", action="store_true",
                    help="do not add the uniform mixture (the first mode is the reference; for comparing two settings)")
    ap.add_argument("--var-coef", type=float, default=1.0,
                    help="difficulty-var: the difficulty rule with signal = mean loss + VAR_COEF x its variance "
                         "(the seed's combination; `difficulty` uses the plugin's default)")
    ap.add_argument("--noise", choices=["printable", "symbols"], default="printable",
                    help="the unlearnable source: random printable characters or space-separated single-token symbols")
    ap.add_argument("--model", default="tiny", help="tiny (trained from scratch, full weights) or a model with LoRA")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--freeze-interval", type=int, default=10)  # 10 / eta 1: the best measured (RESULTS.md)
    ap.add_argument("--sample-size", type=int, default=16)
    ap.add_argument("--eta", type=float, default=1.0, help="difficulty rule step size (the plugin's eta)")
    # the difficulty rule's options default to the plugin's defaults
    ap.add_argument("--max-scale", type=float, default=1.0,
                    help="cap of the per-share factor (the plugin's max_scale; 0 = uncapped)")
    ap.add_argument("--smoothing", type=float, default=0.5, help="EMA weight of past progress (the plugin's smoothing)")
    ap.add_argument("--probe", choices=["held_out", "train"], default="held_out",
                    help="score each source's probe sample held out of training (default) or among its training examples")
    ap.add_argument("--absolute", action=argparse.BooleanOptionalAction, default=True,
                    help="absolute learning progress (the plugin's absolute; --no-absolute: signed)")
    ap.add_argument("--bandit-lr", type=float, default=1.0, help="EXP3 learning rate (the plugin's bandit_lr)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--val-size", type=int, default=32, help="validation examples per learnable source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = ap.parse_args(argv)
    args.max_scale = args.max_scale or None  # 0: uncapped (the plugin's null)
    if args.quick:
        args.steps, args.eval_every, args.freeze_interval, args.sample_size = 12, 4, 4, 4
        # 128: an NL2Bash request in the chat template keeps its answer (at 48 none did, and the curriculum
        # refuses a source with nothing to score)
        args.batch_size, args.max_length, args.val_size = 4, 128, 4
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "uniform" not in modes and not args.no_uniform:
        modes.insert(0, "uniform")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples
    from skillstream.data.render import Renderer
    from skillstream.models.backbone import load_tokenizer

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-curriculum-"))
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.model)
    if args.noise == "symbols":
        noise = functools.partial(symbols_text, symbols=single_token_symbols(tok))
    else:
        noise = noise_text
    files = write_data(out, n_train=64 if args.quick else 400, n_val=args.val_size, seed=args.seed, noise=noise)
    renderer = Renderer(tok, args.max_length)
    val = {"easy": SourceConfig(source=str(files["easy_val"])),
           "bash": SourceConfig(source="nl2bash", split="test"),
           "prose": SourceConfig(source="pydoc_topics", split="test")}
    val_items = {k: [renderer.tokenize(e) for e in load_examples(src)[:args.val_size]] for k, src in val.items()}

    results = []
    for mode in modes:
        print(f"[{mode}] training {args.steps} steps ...", flush=True)
        results.append(run_strategy(mode, args, files, out, val_items, tok.pad_token_id))
        print(f"[{mode}] final validation loss {results[-1]['final']:.4f} ({results[-1]['seconds']:.0f}s)", flush=True)
    text = table(results, args.steps)
    print("\n" + text)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nrun directories and results.json in {out}")
    if args.record:
        cmd = "python bench/curriculum.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        import torch
        with RESULTS_MD.open("a") as f:
            f.write(f"\n## bench/curriculum — {dt.datetime.now().isoformat(timespec='minutes')}\n\n"
                    f"`{cmd}` on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                    f"{' (--quick: wiring only, not a measurement)' if args.quick else ''}\n\n"
                    f"Model {args.model}, {args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, "
                    f"lr {args.lr}, noise {args.noise}, freeze_interval {args.freeze_interval}, sample_size {args.sample_size}, eta {args.eta}, "
                    f"probe {args.probe}, max_scale {args.max_scale}, smoothing {args.smoothing}, absolute {args.absolute}, "
                    f"bandit_lr {args.bandit_lr}, var_coef (difficulty-var) {args.var_coef}, seed {args.seed}\n\n"
                    f"{text}\n")
        print(f"appended to {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
