"""bench/eval_protocols: generative exact match with option scoring beside it, one prefill vs two.

The continual-learning table scores every task under two protocols after every task (bench/cl_stream):
generative exact match and option scoring. Run apart, each prefills every prompt; run together
(`evaluate_examples(..., "exact_match", also=["accuracy"])`), option scoring reads the KV cache and
last-position logits that generation computed. Measured side by side in ONE process on the same
examples of a stream's tasks (the first --examples test examples of each), separate first, then
shared, then separate again (the mean of the two separate passes is the baseline, so warm-up and
drift favour neither). Reported per task: seconds of each, the ratio, and whether both give the
same exact match and the same option accuracy.

    python bench/eval_protocols.py              # SmolLM2-135M on glue_stream, 20 examples per task; appends to RESULTS.md
    python bench/eval_protocols.py --quick      # tiny model, 4 examples per task: wiring check, records nothing
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_MD = REPO / "bench" / "RESULTS.md"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)


def measure(model, tok, renderer, examples, batch_size: int, max_new_tokens: int) -> dict:
    from skillstream.evaluation.runner import evaluate_examples

    def separate():
        t0 = time.perf_counter()
        em = evaluate_examples(model, tok, renderer, examples, "exact_match", batch_size, max_new_tokens)
        acc = evaluate_examples(model, tok, renderer, examples, "accuracy", batch_size)
        return time.perf_counter() - t0, em["exact_match"], acc["accuracy"]

    first = separate()
    t0 = time.perf_counter()
    both = evaluate_examples(model, tok, renderer, examples, "exact_match", batch_size, max_new_tokens, also=["accuracy"])
    shared_s = time.perf_counter() - t0
    second = separate()
    separate_s = (first[0] + second[0]) / 2
    return {"separate_s": separate_s, "shared_s": shared_s, "ratio": shared_s / separate_s,
            "same": both["exact_match"] == first[1] and both["protocols"]["accuracy"] == first[2],
            "exact_match": both["exact_match"], "accuracy": both["protocols"]["accuracy"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", type=Path, default=REPO.parent / "shared" / "data" / "glue_stream")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=20, help="test examples per task")
    ap.add_argument("--batch-size", type=int, default=16, help="the adaptive_learner recipe's eval_batch_size")
    ap.add_argument("--max-new-tokens", type=int, default=8, help="bench/cl_stream's generation length")
    ap.add_argument("--quick", action="store_true", help="tiny model, 4 examples per task; records nothing")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.examples = "tiny", 4
    if not args.stream.is_dir():
        print(f"error: --stream {args.stream}: not a folder", file=sys.stderr)
        return 2

    import torch

    from skillstream.config import load_recipe
    from skillstream.data.render import Renderer
    from skillstream.evaluation.suite import prepare_eval_tasks
    from skillstream.models.backbone import load_backbone

    cfg = load_recipe("adaptive_learner", overrides={"data.stream": str(args.stream), "data.invalid_labels": "skip",
                                                     "data.stream_test_limit": args.examples})
    model, tok = load_backbone(args.model, seed=0)
    model.eval()
    renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt)
    rows = {}
    with torch.no_grad():
        for task in prepare_eval_tasks(cfg, cfg.resolved_stages()[0].data):  # the tasks as the stream run reads them
            rows[task.name] = measure(model, tok, renderer, task.examples, args.batch_size, args.max_new_tokens)
            r = rows[task.name]
            print(f"{task.name}: separate {r['separate_s']:.1f}s, shared {r['shared_s']:.1f}s ({r['ratio']:.2f}x), "
                  f"same scores: {r['same']}", flush=True)
    total_sep = sum(r["separate_s"] for r in rows.values())
    total_shared = sum(r["shared_s"] for r in rows.values())
    lines = ["| task | separate s | shared s | shared / separate | exact match | option accuracy | same scores |",
             "|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {k} | {r['separate_s']:.1f} | {r['shared_s']:.1f} | {r['ratio']:.2f}x | {r['exact_match']:.3f} | "
              f"{r['accuracy']:.3f} | {'yes' if r['same'] else 'NO'} |" for k, r in rows.items()]
    lines.append(f"| all | {total_sep:.1f} | {total_shared:.1f} | {total_shared / total_sep:.2f}x | | | "
                 f"{'yes' if all(r['same'] for r in rows.values()) else 'NO'} |")
    text = "\n".join(lines)
    print("\n" + text)
    if args.record and not args.quick:
        cmd = "python bench/eval_protocols.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with RESULTS_MD.open("a") as f:
            f.write(f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — bench/eval_protocols\n\n"
                    f"`{cmd}` on {common.machine()}, torch {torch.__version__}; model {args.model}, stream "
                    f"{args.stream.name}, {args.examples} test examples per task, batch {args.batch_size}, "
                    f"max_new_tokens {args.max_new_tokens}; separate = mean of a pass before and one after the shared pass\n\n"
                    f"{text}\n")
        print(f"appended to {RESULTS_MD}")
    return 0 if all(r["same"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
