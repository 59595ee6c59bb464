"""bench/bdh: BDH against a GPT of about the same parameter count, the spiking BDH's curve, and BDH
generation on its running recurrent state against re-reading the whole sequence for every byte.

Everything is measured in ONE invocation, in one process (single thread), side by side:
  1. training: plain BDH (skillstream/models/bdh.py), a GPT-2 (transformers' GPT2LMHeadModel, byte
     vocabulary, width chosen so its parameter count is the closest to BDH's) and the spiking BDH
     (LIF + STDP, thresholds calibrated to the target rate, firing-rate regulariser) train on the SAME
     batches of bytes (English prose of the Python docs, the builtin ``pydoc_text`` task: train split
     for training, its fixed validation split for validation) for the same number of steps with the
     same batch, sequence length, optimizer (AdamW) and LR schedule. Their steps are interleaved
     (step i of each model, then step i+1), so load from other jobs on a shared machine hits all
     of them alike. Reported: validation bits per byte (mean next-byte cross-entropy / ln 2 over a
     fixed set of validation windows) every --eval-every steps and at the end, and training tokens/s
     (batch x sequence / wall time of the optimizer steps, evaluation excluded, first --skip steps
     not timed);
  2. generation: the trained BDH appends --gen-tokens bytes (greedy) to a validation prompt, once
     with the running state (``BDH.generate(use_state=True)``: the prompt is read once, then one
     byte per step on the carried state) and once re-reading the whole sequence for every new byte
     (``use_state=False``, the reference's way); bytes/s, the ratio (goal >= 10x) and whether both
     produce the same bytes. The GPT with and without its KV cache (``generate(use_cache=...)``)
     is shown beside it for reference.

    python bench/bdh.py                 # the real measurement (~10-15 min on 2 shared cores), appends to bench/RESULTS.md
    python bench/bdh.py --quick         # wiring check: tiny models, a few steps (seconds); records nothing
    python bench/bdh.py --dim 128 --steps 600 --mult 32

See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
RESULTS_MD = REPO / "bench" / "RESULTS.md"
TARGET_GEN = 10.0

DEFAULTS = dict(dim=64, layers=4, heads=4, mult=16, gpt_layers=None, steps=300, batch_size=8, seq_len=128,
                lr=2e-3, weight_decay=0.1, warmup=20, eval_every=50, val_windows=48, skip=3,
                gen_tokens=256, prompt_bytes=64, rate_weight=1.0, seed=0)
QUICK = dict(dim=32, layers=2, heads=2, mult=4, steps=6, batch_size=2, seq_len=32, warmup=2, eval_every=3,
             val_windows=4, skip=1, gen_tokens=16, prompt_bytes=16)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def corpus(split: str) -> bytes:
    """The pydoc_text task's split (English prose of the Python docs), chunks joined by newlines."""
    from skillstream.data.dragon_tasks import pydoc_text_rows
    return "\n".join(r.data["text"] for r in pydoc_text_rows(split)).encode("utf-8")


def train_batches(data: bytes, steps: int, batch: int, seq: int, seed: int):
    """Random windows of seq+1 bytes, the same sequence of batches for every model."""
    rng = random.Random(seed)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    for _ in range(steps):
        starts = [rng.randrange(len(data) - seq - 1) for _ in range(batch)]
        yield torch.stack([buf[s:s + seq + 1] for s in starts])


def val_windows(data: bytes, n: int, seq: int) -> torch.Tensor:
    """Up to n non-overlapping windows of seq+1 bytes from the start of the validation split (fixed)."""
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = min(n, (len(data) - 1) // (seq + 1))
    return torch.stack([buf[i * (seq + 1):(i + 1) * (seq + 1)] for i in range(n)])


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

class Runner:
    """A model, its optimizer and LR schedule, and how to get next-byte logits from it."""

    def __init__(self, name: str, model: torch.nn.Module, kind: str, args):
        self.name, self.model, self.kind = name, model, kind
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _lr_factor(s, args.warmup, args.steps))
        self.seconds, self.tokens, self.curve, self.losses = 0.0, 0, [], []

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        if self.kind == "gpt":
            return self.model(input_ids=idx).logits
        return self.model._run(idx)[0]

    def step(self, batch: torch.Tensor, timed: bool) -> float:
        self.model.train()
        t0 = time.perf_counter()
        x, y = batch[:, :-1], batch[:, 1:]
        loss = F.cross_entropy(self.logits(x).reshape(-1, 256).float(), y.reshape(-1))
        total = loss
        if self.kind == "spiking" and self.model.config.rate_reg_weight > 0:
            total = loss + self.model.config.rate_reg_weight * self.model.firing_rate_loss()
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        if timed:
            self.seconds += time.perf_counter() - t0
            self.tokens += x.numel()
        self.losses.append(float(loss.detach()))
        return float(loss.detach())

    @torch.no_grad()
    def val_bpb(self, windows: torch.Tensor, batch: int) -> float:
        self.model.eval()
        nll, n = 0.0, 0
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            logits = self.logits(w[:, :-1]).float()
            nll += float(F.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1), reduction="sum"))
            n += w[:, 1:].numel()
        return nll / n / math.log(2)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine to 10 % of the peak (same for every model)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def gpt_params(d: int, layers: int, n_pos: int) -> int:
    """GPT-2 parameter count (tied head) at width d: embeddings + blocks + final LayerNorm."""
    return 256 * d + n_pos * d + layers * (12 * d * d + 13 * d) + 2 * d


def build_models(args, calib: torch.Tensor) -> dict[str, Runner]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from skillstream.models.bdh import BDH, BDHConfig
    from skillstream.models.spiking import SpikingBDH, SpikingBDHConfig

    dims = dict(n_layer=args.layers, n_embd=args.dim, n_head=args.heads, mlp_internal_dim_multiplier=args.mult,
                dropout=0.0)
    torch.manual_seed(args.seed)
    bdh = BDH(BDHConfig(**dims))
    n_bdh = bdh.num_parameters()
    n_pos = args.seq_len + args.prompt_bytes + args.gen_tokens  # room for the generation comparison
    gl = args.gpt_layers or args.layers
    heads = args.heads
    width = min(range(heads, 8 * args.dim + 1, heads), key=lambda d: abs(gpt_params(d, gl, n_pos) - n_bdh))
    torch.manual_seed(args.seed)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=n_pos, n_embd=width, n_layer=gl, n_head=heads,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    torch.manual_seed(args.seed)
    spk = SpikingBDH(SpikingBDHConfig(**dims, rate_reg_weight=args.rate_weight))
    init_rates = spk.calibrate_thresholds(calib)  # thresholds set so ~target_rate fire on English text
    runners = {"bdh": Runner("BDH", bdh, "bdh", args), "gpt": Runner("GPT-2", gpt, "gpt", args),
               "spiking": Runner("spiking BDH (LIF+STDP)", spk, "spiking", args)}
    runners["spiking"].init_rates = init_rates
    return runners


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def time_generation(runners: dict[str, Runner], prompt: torch.Tensor, new: int) -> dict:
    bdh = runners["bdh"].model.eval()
    gpt = runners["gpt"].model.eval()
    bdh.generate(prompt[:, :4], 2, temperature=0)  # warm-up, untimed
    out = {}
    for key, fn in (("bdh_state", lambda: bdh.generate(prompt, new, temperature=0, use_state=True)),
                    ("bdh_reread", lambda: bdh.generate(prompt, new, temperature=0, use_state=False)),
                    ("gpt_kv_cache", lambda: gpt.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                          min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)),
                    ("gpt_no_cache", lambda: gpt.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                          min_new_tokens=new, do_sample=False, use_cache=False, pad_token_id=0))):
        t0 = time.perf_counter()
        seq = fn()
        s = time.perf_counter() - t0
        out[key] = {"seconds": s, "new_tokens": int(seq.size(1) - prompt.size(1)),
                    "tokens_per_s": (seq.size(1) - prompt.size(1)) / s, "bytes": seq[0, prompt.size(1):].tolist()}
    st, rr = out["bdh_state"], out["bdh_reread"]
    same = sum(a == b for a, b in zip(st["bytes"], rr["bytes"]))
    return {"prompt_bytes": int(prompt.size(1)), "new_tokens": new, **out,
            "speedup": rr["seconds"] / st["seconds"], "gpt_cache_speedup": out["gpt_no_cache"]["seconds"] / out["gpt_kv_cache"]["seconds"],
            "agreement": same / max(1, len(st["bytes"])),
            "first_divergence": next((i for i, (a, b) in enumerate(zip(st["bytes"], rr["bytes"])) if a != b), None),
            "sample": bytes(st["bytes"]).decode("utf-8", errors="replace")}


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------

def run(args) -> dict:
    torch.set_num_threads(1)
    train, val = corpus("train"), corpus("validation")
    windows = val_windows(val, args.val_windows, args.seq_len)
    from skillstream.models.bdh_lm import calibration_text
    calib = torch.tensor(list(calibration_text(4 * args.seq_len).encode()[:4 * args.seq_len])).view(4, -1)
    runners = build_models(args, calib)
    eval_batch = max(args.batch_size, 8)
    for r in runners.values():
        r.curve.append((0, r.val_bpb(windows, eval_batch)))
    t_start = time.perf_counter()
    for i, batch in enumerate(train_batches(train, args.steps, args.batch_size, args.seq_len, args.seed), start=1):
        for r in runners.values():  # interleaved: every model sees this batch before anyone sees the next
            r.step(batch, timed=i > args.skip)
        if i % args.eval_every == 0 or i == args.steps:
            for r in runners.values():
                r.curve.append((i, r.val_bpb(windows, eval_batch)))
            if not args.quiet:
                print(f"step {i:5d}  " + "  ".join(f"{k} train {r.losses[-1] / math.log(2):.3f} val {r.curve[-1][1]:.3f} bpb"
                                                   for k, r in runners.items()), file=sys.stderr, flush=True)
    train_wall = time.perf_counter() - t_start
    spk = runners["spiking"].model
    with torch.no_grad():
        spk.eval()
        spk._run(windows[: eval_batch, :-1])
        final_rates = spk.last_firing_rates
    prompt = windows[:1, : args.prompt_bytes]
    gen = time_generation(runners, prompt, args.gen_tokens)
    models = {}
    for k, r in runners.items():
        models[k] = {"name": r.name, "params": sum(p.numel() for p in r.model.parameters()),
                     "val_bpb": r.curve[-1][1], "val_curve": [[s, v] for s, v in r.curve],
                     "train_bpb_last": sum(r.losses[-10:]) / len(r.losses[-10:]) / math.log(2),
                     "tokens_per_s": r.tokens / max(r.seconds, 1e-9), "timed_steps": args.steps - args.skip,
                     "seconds": r.seconds}
    c = runners["gpt"].model.config
    models["gpt"]["config"] = {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head, "n_positions": c.n_positions}
    models["bdh"]["config"] = models["spiking"]["config"] = {"n_layer": args.layers, "n_embd": args.dim, "n_head": args.heads,
                                                             "mlp_internal_dim_multiplier": args.mult,
                                                             "neurons": args.mult * args.dim // args.heads}
    models["spiking"]["firing_rates_init"] = runners["spiking"].init_rates
    models["spiking"]["firing_rates_final"] = final_rates
    return {"settings": {k: getattr(args, k) for k in DEFAULTS}, "data": {"train_bytes": len(train), "val_bytes": len(val),
            "val_windows": int(windows.size(0)), "val_bytes_scored": int(windows[:, 1:].numel())},
            "models": models, "generation": gen, "train_wall_seconds": train_wall, "torch_threads": torch.get_num_threads()}


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def build_report(res: dict) -> str:
    m, g, s = res["models"], res["generation"], res["settings"]
    b, gp, sp = m["bdh"], m["gpt"], m["spiking"]
    better = "BDH better" if b["val_bpb"] < gp["val_bpb"] else "GPT better"
    lines = ["| measurement | BDH | GPT-2 | spiking BDH | note |", "|---|---:|---:|---:|---|",
             f"| parameters | {b['params']:,} | {gp['params']:,} | {sp['params']:,} | GPT width {gp['config']['n_embd']}, "
             f"{gp['config']['n_layer']} layers (closest count to BDH's) |",
             f"| validation bits/byte, step {s['steps']} | {b['val_bpb']:.3f} | {gp['val_bpb']:.3f} | {sp['val_bpb']:.3f} | "
             f"{better} by {abs(b['val_bpb'] - gp['val_bpb']):.3f} bpb |",
             f"| train bits/byte (mean of last 10 steps) | {b['train_bpb_last']:.3f} | {gp['train_bpb_last']:.3f} | "
             f"{sp['train_bpb_last']:.3f} | |",
             f"| training tokens/s | {b['tokens_per_s']:.0f} | {gp['tokens_per_s']:.0f} | {sp['tokens_per_s']:.0f} | "
             f"BDH / GPT {b['tokens_per_s'] / gp['tokens_per_s']:.2f}x |"]
    curve = ["| step | " + " | ".join(str(st) for st, _ in b["val_curve"]) + " |",
             "|---|" + "---:|" * len(b["val_curve"])]
    for k in ("bdh", "gpt", "spiking"):
        curve.append(f"| {m[k]['name']} val bpb | " + " | ".join(f"{v:.3f}" for _, v in m[k]["val_curve"]) + " |")
    gen = ["| generation, greedy, batch 1 | bytes/s | seconds | ratio | target | status |", "|---|---:|---:|---:|---|---|",
           f"| BDH, running recurrent state | {g['bdh_state']['tokens_per_s']:.0f} | {g['bdh_state']['seconds']:.2f} | "
           f"{g['speedup']:.1f}x | ≥ {TARGET_GEN:.0f}x | {verdict(g['speedup'] >= TARGET_GEN)} |",
           f"| BDH, re-reading the whole sequence per byte (reference) | {g['bdh_reread']['tokens_per_s']:.0f} | "
           f"{g['bdh_reread']['seconds']:.2f} | 1.0x | | |",
           f"| GPT-2, KV cache (reference) | {g['gpt_kv_cache']['tokens_per_s']:.0f} | {g['gpt_kv_cache']['seconds']:.2f} | "
           f"{g['gpt_cache_speedup']:.1f}x | | |",
           f"| GPT-2, no cache | {g['gpt_no_cache']['tokens_per_s']:.0f} | {g['gpt_no_cache']['seconds']:.2f} | 1.0x | | |"]
    div = "" if g["first_divergence"] is None else f" (first difference at byte {g['first_divergence']})"
    rates = lambda xs: "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"  # noqa: E731
    notes = (f"Data: builtin `pydoc_text` (English prose of `pydoc_data.topics`, Python {platform.python_version()}), "
             f"train split {res['data']['train_bytes']:,} bytes, validation split {res['data']['val_bytes']:,} bytes "
             f"({res['data']['val_windows']} fixed windows, {res['data']['val_bytes_scored']:,} bytes scored). "
             f"{s['steps']} steps, batch {s['batch_size']} x {s['seq_len']} bytes, identical batches for all three, "
             f"AdamW lr {s['lr']} (betas 0.9/0.95, wd {s['weight_decay']}), warmup {s['warmup']} + cosine to 10 %, clip 1.0, "
             f"dropout 0, steps interleaved, first {s['skip']} not timed, torch threads {res['torch_threads']}. "
             f"BDH: {s['layers']} layers (one shared block), width {s['dim']}, {s['heads']} heads, multiplier {s['mult']} "
             f"({b['config']['neurons']} neurons per head x {s['heads']}). Spiking: same dims, thresholds calibrated, "
             f"rate regulariser weight {s['rate_weight']}, STDP on; firing rates per layer at init {rates(sp['firing_rates_init'])}, "
             f"after training {rates(sp['firing_rates_final'])}. Generation: prompt {g['prompt_bytes']} validation bytes + "
             f"{g['new_tokens']} new; state and re-read outputs agree on {100 * g['agreement']:.0f}% of the bytes"
             f"{div}. "
             f"Training loop wall time {res['train_wall_seconds']:.0f} s.")
    return "\n".join(lines) + "\n\n" + "\n".join(curve) + "\n\n" + "\n".join(gen) + "\n\n" + notes + "\n"


def record(report: str, command: str, res: dict) -> None:
    from importlib.metadata import version
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS_MD.open("a") as f:
        f.write(f"\n## {stamp} — bench/bdh\n\n- command: `{command}`\n- machine: {common.machine()}\n"
                f"- python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}\n\n"
                f"{report}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="BDH vs a same-size GPT-2 on the same bytes; spiking BDH's curve; "
                                             "generation with the recurrent state vs re-reading.")
    ap.add_argument("--quick", action="store_true", help="tiny models, a few steps (seconds): wiring check, records nothing")
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        kind = float if isinstance(v, float) else int
        ap.add_argument(flag, type=kind, default=None, help=f"default {v}" + (f", {QUICK[k]} with --quick" if k in QUICK else ""))
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    ap.add_argument("--record", action="store_true", help="with --quick: append to bench/RESULTS.md anyway")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK.get(k, v) if args.quick else v)
    if args.dim % args.heads:
        ap.error(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads})")
    if args.steps <= args.skip:
        ap.error(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    command = "python bench/bdh.py" + ("" if not sys.argv[1:] or argv is not None else " " + shlex.join(sys.argv[1:]))
    res = run(args)
    report = build_report(res)
    print(f"\n{command}\nmachine: {common.machine()}\n\n{report}")
    print("BENCH_RESULT " + json.dumps({k: v for k, v in res.items()}, default=float))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=float))
    if (not args.quick or args.record) and not args.no_record:
        record(report, command, res)
        print(f"appended to {RESULTS_MD.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
