"""bench/memory: peak memory and training tokens/s of a LoRA run with float32 vs bfloat16 backbone weights
(`model.dtype`), each with and without activation checkpointing (`train.gradient_checkpointing`), and
whether checkpointing leaves the loss curve as it was.

Each measurement is one `skillstream.run.train` of the quickstart recipe in a fresh subprocess, so its
peak memory is its own; the configurations run interleaved, `--repeats` times. What a run reports:
  - tokens/s: results.json's non-pad training tokens over the training loop's wall time;
  - peak memory of training: on CUDA `torch.cuda.max_memory_allocated` over the stage; on CPU the
    resident set, sampled every 5 ms by a thread from the stage's start to its end (peak), less the
    resident set at the stage's start (the loaded model and data): what training adds;
  - the loss of every step (compared between checkpointing on and off at the same dtype).

    python bench/memory.py                # SmolLM2-135M, appends to bench/RESULTS.md
    python bench/memory.py --quick        # tiny model, 3 steps: wiring check, records nothing
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
from common import MARK  # noqa: E402

MiB = 1024 ** 2
CONFIGS = [("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]


def child(spec: dict) -> dict:
    import psutil
    import torch

    from skillstream.plugins import Plugin
    from skillstream.run import train

    class Memory(Plugin):
        """Peak memory of the stage: CUDA's allocator peak, or the resident set sampled by a thread."""
        name = "bench_memory"

        def __init__(self):
            self.start = self.peak = 0
            self._stop, self._thread = threading.Event(), None

        def before_stage(self, ctx):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                self.start = torch.cuda.memory_allocated()
                return
            process = psutil.Process()
            self.start = self.peak = process.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, process.memory_info().rss)
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()

        def after_stage(self, ctx):
            if torch.cuda.is_available():
                self.peak = torch.cuda.max_memory_allocated()
                return
            self._stop.set()
            self._thread.join()

    memory = Memory()
    overrides = {"model": {"name": spec["model"], "dtype": spec["dtype"]},
                 "train.gradient_checkpointing": spec["checkpointing"], "train.steps": spec["steps"],
                 "train.batch_size": spec["batch_size"], "train.grad_accum": 1, "train.log_every": 1,
                 "train.checkpoint_every": 10 ** 9, "data.max_length": spec["max_length"], "data.eval": [],
                 "report_to": []}
    with tempfile.TemporaryDirectory() as tmp:
        run = train("quickstart", out=Path(tmp) / "run", overrides=overrides, show_progress=False, plugins=[memory])
        losses = [json.loads(line)["loss"] for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    stage = run.results["stages"][0]
    return {"tokens_per_s": stage["tokens_per_s"], "tokens": stage["tokens"], "seconds": stage["seconds"],
            "start_mib": memory.start / MiB, "peak_mib": memory.peak / MiB,
            "added_mib": (memory.peak - memory.start) / MiB, "losses": losses,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 steps; records nothing")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(MARK + json.dumps(child(json.loads(args._child[1]))), flush=True)
        return
    if args.quick:
        args.model, args.steps, args.repeats = "tiny", 3, 1
    started = dt.datetime.now(dt.timezone.utc)
    runs: dict[tuple[str, bool], list[dict]] = {c: [] for c in CONFIGS}
    for repeat in range(args.repeats):  # interleaved: each repeat runs every configuration once
        for dtype, checkpointing in CONFIGS:
            spec = {"model": args.model, "dtype": dtype, "checkpointing": checkpointing, "steps": args.steps,
                    "batch_size": args.batch_size, "max_length": args.max_length}
            runs[(dtype, checkpointing)].append(common.run_child(
                __file__, "train", spec, label=f"{dtype} checkpointing={checkpointing} #{repeat + 1}",
                bench="bench/memory", cwd=REPO))

    device = runs[CONFIGS[0]][0]["device"]
    what = "CUDA allocator peak" if device == "cuda" else "peak RSS, sampled every 5 ms"
    lines = [f"| `model.dtype` | gradient checkpointing | tokens/s (mean [min, max]) | training adds, MiB ({what}, "
             f"less the stage start; mean [min, max]) | at stage start, MiB | peak, MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (dtype, checkpointing), rs in runs.items():
        tps, added = [r["tokens_per_s"] for r in rs], [r["added_mib"] for r in rs]
        lines.append(f"| {dtype} | {'on' if checkpointing else 'off'} | {statistics.mean(tps):.0f} "
                     f"[{min(tps):.0f}, {max(tps):.0f}] | {statistics.mean(added):.0f} [{min(added):.0f}, "
                     f"{max(added):.0f}] | {statistics.mean(r['start_mib'] for r in rs):.0f} | "
                     f"{statistics.mean(r['peak_mib'] for r in rs):.0f} |")
    curves = []
    for dtype in ("float32", "bfloat16"):
        off, on = runs[(dtype, False)][0]["losses"], runs[(dtype, True)][0]["losses"]
        diff = max(abs(a - b) for a, b in zip(off, on))
        repeat = max(abs(a - b) for r in runs[(dtype, True)] for a, b in zip(r["losses"], on))
        curves.append(f"- {dtype} weights: the loss of every step with checkpointing on vs off differs by at most "
                      f"{diff:.2g} (first run of each; {len(off)} steps, off: {', '.join(f'{x:.4f}' for x in off)}); "
                      f"repeats of one configuration differ by at most {repeat:.2g}")
    print("\n".join(lines + [""] + curves))
    if args.quick:
        return
    finished = dt.datetime.now(dt.timezone.utc)
    command = "python bench/memory.py " + shlex.join(sys.argv[1:])
    text = (f"## {started:%Y-%m-%d %H:%M}-{finished:%H:%M} UTC — memory: float32 vs bfloat16 backbone weights, with "
            f"and without gradient checkpointing ({args.model})\n\n"
            f"Command: `{command.strip()}`. Machine: {common.machine()}, {device}; shared with other jobs "
            f"(tokens/s is noisy: compare rows within this entry only). quickstart with LoRA r=16 on every linear "
            f"layer, {args.steps} steps of batch {args.batch_size}, max_length {args.max_length}, train.bf16 "
            f"as the recipe sets it (auto), no evaluation; n = {args.repeats} runs per configuration, each in "
            f"its own process, interleaved.\n\n" + "\n".join(lines) + "\n\n" + "\n".join(curves) + "\n")
    common.record(text)


if __name__ == "__main__":
    main()
