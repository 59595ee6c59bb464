"""bench/activations: what autograd keeps for the backward of one LoRA training forward, by tensor width
and dtype — where a training step's activation memory goes, measured exactly rather than from RSS.

One forward of the quickstart recipe's model (LoRA r 16 on every linear layer, its dropout) on a
batch of 8 x 256 random tokens (the last four rows padded from position 200, as a length-sorted batch
is), under the autocast `train.bf16: auto` chooses on this machine, for float32 and bfloat16 backbone
weights (`model.dtype`), with PEFT's own `nn.Dropout` and with skillstream's `MaskDropout`
(skillstream/lora_dropout.py). Every tensor autograd saves is counted once (by storage) through
`torch.autograd.graph.saved_tensors_hooks`. No timing, so a shared machine does not change it.

    python bench/activations.py            # SmolLM2-135M, appends to bench/RESULTS.md
    python bench/activations.py --quick    # tiny model: wiring check, records nothing
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime as dt
import shlex
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.common import machine, record  # noqa: E402

MiB = 1024 ** 2
BATCH, LENGTH, PADDED_FROM = 8, 256, 200


def saved_by_kind(model, ids: torch.Tensor, mask: torch.Tensor, autocast: bool) -> dict[tuple[int, str], int]:
    """{(last dimension, dtype): bytes} of the tensors autograd keeps for this forward's backward."""
    seen: dict[int, tuple[tuple[int, str], int]] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), ((t.shape[-1] if t.dim() else 1, str(t.dtype).removeprefix("torch.")),
                                             storage.nbytes()))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, attention_mask=mask)
    kinds: collections.Counter = collections.Counter()
    for kind, nbytes in seen.values():
        kinds[kind] += nbytes
    return dict(kinds)


def plain_dropout(model):
    """PEFT's own dropout back in every LoRA layer (what attach_lora replaces)."""
    from peft.tuners.lora import LoraLayer

    from skillstream.lora_dropout import MaskDropout
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name, d in layer.lora_dropout.items():
                if isinstance(d, MaskDropout):
                    layer.lora_dropout[name] = torch.nn.Dropout(d.p)
    return model


def measure(args) -> list[dict]:
    from skillstream.config import load_recipe
    from skillstream.model_setup import attach_lora, bf16_enabled
    from skillstream.models.backbone import load_backbone

    cfg = load_recipe("quickstart")
    autocast = bf16_enabled(cfg.train.bf16, "cpu")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        backbone, tok = load_backbone(args.model, seed=0, dtype=dtype)
        vocab = backbone.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (BATCH, args.length), generator=g)
        mask = torch.ones_like(ids)
        mask[BATCH // 2:, round(args.length * PADDED_FROM / LENGTH):] = 0
        compact = attach_lora(backbone, cfg)
        for label, model in (("nn.Dropout (PEFT)", plain_dropout(copy.deepcopy(compact))), ("MaskDropout", compact)):
            kinds = saved_by_kind(model, ids, mask, autocast)
            rows.append({"weights": str(dtype).removeprefix("torch."), "dropout": label, "kinds": kinds, "p": cfg.lora.dropout,
                         "total": sum(kinds.values()), "layers": backbone.config.num_hidden_layers})
    return rows


def report(args, rows: list[dict]) -> str:
    cmd = "python bench/activations.py " + " ".join(shlex.quote(a) for a in args.argv)
    tokens = BATCH * args.length
    kinds = sorted({k for r in rows for k in r["kinds"]}, key=lambda k: -max(r["kinds"].get(k, 0) for r in rows))[:8]
    lines = [f"## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — what autograd keeps for one LoRA training "
             f"forward (bench/activations, {args.model}, issue 26 item 4)", "",
             f"`{cmd}` on {machine()}, torch {torch.__version__}"
             f"{' (--quick: wiring only, not a measurement)' if args.quick else ''}. quickstart's LoRA (r 16, every "
             f"linear layer, dropout {rows[0]['p']}), one forward of {BATCH} x {args.length} tokens (rows 4-7 "
             f"padded from {round(args.length * PADDED_FROM / LENGTH)}), autocast as `train.bf16: auto` decides here; "
             "bytes of every tensor saved for backward, each storage once. Exact counts, no timing.", "",
             "| weights | LoRA dropout | saved, MiB | KiB per token per layer | "
             + " | ".join(f"width {w} {d}" for w, d in kinds) + " |",
             "|---|---|---:|---:|" + "---:|" * len(kinds)]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['dropout']} | {r['total'] / MiB:.0f} | "
                     f"{r['total'] / tokens / r['layers'] / 1024:.1f} | "
                     + " | ".join(f"{r['kinds'].get(k, 0) / MiB:.0f}" for k in kinds) + " |")
    for w in ("float32", "bfloat16"):
        plain, mask = [r["total"] for r in rows if r["weights"] == w]
        lines.append(f"\n{w} weights: MaskDropout keeps {mask / plain:.2f}x what nn.Dropout keeps "
                     f"({(plain - mask) / MiB:.0f} MiB less).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 32 tokens per row: wiring check (records nothing)")
    ap.add_argument("--no-record", action="store_true", help="print the table without appending it")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.model, args.length = ("tiny", 32) if args.quick else ("smollm2-135m", LENGTH)
    torch.manual_seed(0)
    rows = measure(args)
    record(report(args, rows), append=not (args.quick or args.no_record))
    return rows


if __name__ == "__main__":
    main()
