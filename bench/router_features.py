"""bench/router_features: which frozen-backbone features let a router tell a recipe's skills apart.

For every stage (skill) of a recipe, the training prompts (`--train` per skill) and held-out
validation prompts (`--validation` per skill: the next prompts of the same TRAINING split, never
the test split, so the depth chosen here is not chosen on test data) are rendered exactly as the
router sees them at generation time. One forward pass per prompt gives every layer's hidden states;
for each (pooling, depth) a `skillstream.experts.router.Router` (the router the skill stream trains,
per-sample layer norm and all) is fitted on the training features of all skills at once (the
jointly trained ceiling of a linear router on those features) and scored on the held-out ones.
A check confirms that the features taken here are what `pooled_features` (the router's reader)
returns for one configuration.

    python bench/router_features.py                      # dylora_moe on SmolLM2-135M, appends to bench/RESULTS.md
    python bench/router_features.py --quick              # tiny model, 8 prompts per skill: wiring check, records nothing
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)


def skill_prompts(recipe: str, model: str, n_train: int, n_validation: int):
    """{skill: (train examples, validation examples)}: the first n_train prompts of each stage's training
    source and the next n_validation of the same split (held out of the router's fit)."""
    from skillstream.config import load_recipe
    from skillstream.data.examples import load_examples

    cfg = load_recipe(recipe, overrides={"model": model})
    out = {}
    for st in cfg.resolved_stages():
        if not st.data.train:
            raise SystemExit(f"error: recipe {recipe!r} stage {st.name!r} has no training data")
        pool = load_examples(st.data.train[0].model_copy(update={"limit": n_train + n_validation}))
        if len(pool) < n_train + 1:
            raise SystemExit(f"error: stage {st.name!r}: its training split has {len(pool)} prompts, "
                             f"fewer than --train {n_train} plus one for validation")
        out[st.name] = (pool[:n_train], pool[n_train:])
    return cfg, out


@torch.no_grad()
def layer_features(model, tok, renderer, examples, depths: list[float], max_length: int) -> dict:
    """{(pooling, depth): (n, hidden)} from one forward per prompt (batch 1: no padding at all)."""
    from skillstream.experts.router import decoder_layers, transformer_body

    body = transformer_body(model)
    n_layers = len(decoder_layers(body))
    feats: dict[tuple[str, float], list[torch.Tensor]] = {}
    raw_last = {}  # hidden_states[-1] is the final *normed* output; the router reads the last layer's raw one
    handle = decoder_layers(body)[-1].register_forward_hook(
        lambda module, args, output: raw_last.update(h=output[0] if isinstance(output, tuple) else output))
    try:
        for ex in examples:
            ids = tok(renderer.prompt_text(ex), add_special_tokens=True)["input_ids"][-max_length:]
            hidden = body(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            for d in depths:
                # hidden_states[k] is the output of k decoder layers (k = n_layers: the raw one, hooked above)
                k = min(n_layers, max(1, round(d * n_layers)))
                h = hidden[-1] if d >= 1.0 else (raw_last["h"] if k == n_layers else hidden[k])
                feats.setdefault(("mean", d), []).append(h[0].float().mean(0))
                feats.setdefault(("last", d), []).append(h[0, -1].float())
    finally:
        handle.remove()
    return {k: torch.stack(v) for k, v in feats.items()}


def fit_router(train: list[torch.Tensor], test: list[torch.Tensor], steps: int, seed: int,
               depth: float | list[float] = 1.0) -> list[float]:
    """Held-out accuracy per skill of a Router fitted jointly on every skill's training features
    (`depth`: a list when the features are several depths' concatenated, normalised block by block)."""
    from skillstream.experts.router import Router

    x = torch.cat(train)
    y = torch.cat([torch.full((len(t),), i) for i, t in enumerate(train)])
    router = Router(x.shape[1], len(train), seed=seed, depth=depth)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(router(x), y).backward()
        opt.step()
    with torch.no_grad():
        return [float((router(t).argmax(-1) == i).float().mean()) for i, t in enumerate(test)]


def stream_router(train: list[torch.Tensor], test: list[torch.Tensor], router_cfg, chunk_size: int,
                  seed: int, depth: float | list[float] = 1.0) -> list[float]:
    """Held-out accuracy per skill of the router as the skill stream trains it: skills in order, chunk
    by chunk, `steps_per_chunk` updates per chunk with feature replay (RouterTrainer, the recipe's
    router settings, `refit_steps` on the memory after each chunk), a new output row when a skill
    begins (as if novelty found every boundary)."""
    from skillstream.experts.router import Router, RouterTrainer

    router = Router(train[0].shape[1], 1, kind=router_cfg.kind, seed=seed, depth=depth)
    trainer = RouterTrainer(router, feature_alpha=router_cfg.feature_alpha, lr=router_cfg.lr,
                            capacity_per_expert=router_cfg.capacity_per_expert, seed=seed)
    for expert, feats in enumerate(train):
        if expert:
            trainer.add_expert()
        for start in range(0, len(feats), chunk_size):
            trainer.learn_chunk(feats[start:start + chunk_size], expert, router_cfg.steps_per_chunk,
                                router_cfg.refit_steps)  # as Lifecycle.learn_chunk
    with torch.no_grad():
        return [float((router(t).argmax(-1) == i).float().mean()) for i, t in enumerate(test)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="dylora_moe")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", type=int, default=120, help="training prompts per skill")
    ap.add_argument("--validation", type=int, default=40,
                    help="held-out prompts per skill, the next ones of the training split (never the test split)")
    ap.add_argument("--depths", default="0.2,0.3,0.4,0.5,0.6,0.8,1.0")
    ap.add_argument("--concat", default="0.4+0.6,0.5+0.7,0.3+0.6",
                    help="depth sets whose last-token features are also fitted concatenated (as router.depth: [a, b])")
    ap.add_argument("--steps", type=int, default=300, help="full-batch Adam steps of the router fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.model, args.train, args.validation = "tiny", 8, 8
    from skillstream.data.render import Renderer
    from skillstream.experts.router import pooled_features
    from skillstream.models.backbone import load_backbone

    torch.manual_seed(args.seed)
    combos = [[float(d) for d in c.split("+")] for c in args.concat.split(",") if c]
    depths = sorted({float(d) for d in args.depths.split(",")} | {d for c in combos for d in c})
    t0 = time.time()
    cfg, skills = skill_prompts(args.recipe, args.model, args.train, args.validation)
    model, tok = load_backbone(args.model, seed=args.seed)
    model.eval()
    renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt)
    feats = {s: tuple(layer_features(model, tok, renderer, part, depths, cfg.data.max_length) for part in parts)
             for s, parts in skills.items()}
    # what the router's own reader returns for the first prompt: must be the feature measured here
    first = next(iter(skills.values()))[0][:1]
    ids = tok(renderer.prompt_text(first[0]), add_special_tokens=True, return_tensors="pt")
    ids = {k: v[:, -cfg.data.max_length:] for k, v in ids.items()}
    for pooling in ("mean", "last"):
        for d in depths:
            reader = pooled_features(model, ids, pooling=pooling, depth=d)[0]
            here = feats[next(iter(skills))][0][(pooling, d)][0]
            if not torch.allclose(reader, here, atol=1e-4):
                raise SystemExit(f"error: features differ from the router's reader ({pooling}, depth {d})")
    names = list(skills)
    rows = []

    def row(pooling: str, depth: list[float]) -> None:
        train = [torch.cat([feats[s][0][(pooling, d)] for d in depth], -1) for s in names]
        test = [torch.cat([feats[s][1][(pooling, d)] for d in depth], -1) for s in names]
        n = [len(t) for t in test]
        per = fit_router(train, test, args.steps, args.seed, depth)
        streamed = stream_router(train, test, cfg.experts.router, cfg.experts.chunk_size, args.seed, depth)
        overall, overall_s = (sum(p * k for p, k in zip(acc, n)) / sum(n) for acc in (per, streamed))
        rows.append(f"| {pooling} | {'+'.join(f'{d:.1f}' for d in depth)} | {overall:.3f} | {overall_s:.3f} | "
                    + " | ".join(f"{p:.2f}" for p in per) + " | " + " | ".join(f"{p:.2f}" for p in streamed) + " |")
        print(rows[-1], flush=True)

    for pooling in ("mean", "last"):
        for d in depths:
            row(pooling, [d])
    for combo in combos:  # the router reads several depths at once (router.depth: a list)
        row("last", combo)
    cmd = "python bench/router_features.py " + " ".join(sys.argv[1:])
    text = (f"## {date.today()} router_features ({args.recipe}, {args.model}, seed {args.seed})\n\n`{cmd}` on "
            f"{common.machine()}, {time.time() - t0:.0f} s. Joint: a linear Router fitted on all skills' {args.train} "
            f"training prompts at once ({args.steps} full-batch steps: the ceiling of a linear router on those "
            f"features). Stream: the recipe's router ({cfg.experts.router.kind}, {cfg.experts.router.steps_per_chunk} "
            f"steps per chunk of {cfg.experts.chunk_size}, feature_alpha {cfg.experts.router.feature_alpha}) trained "
            f"skill after skill as the stream trains it. Held-out accuracy on validation prompts (n per skill: "
            f"{', '.join(f'{s} {len(v)}' for s, (_, v) in skills.items())}; the training split's prompts after the first "
            f"{args.train}, never the test split); features from the frozen backbone at a relative depth (1.0 = final normed output); a+b: the "
            f"last-token features of both depths concatenated, as `router.depth: [a, b]` reads them.\n\n"
            f"| pooling | depth | joint | stream | " + " | ".join(f"joint {n}" for n in names) + " | "
            + " | ".join(f"stream {n}" for n in names) + " |\n|---|---:|---:|---:|" + "---:|" * (2 * len(names))
            + "\n" + "\n".join(rows) + "\n")
    common.record(text, append=not args.quick)


if __name__ == "__main__":
    main()
