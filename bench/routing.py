"""bench/routing: per-sample routing and mixing of LoRA experts vs a single PEFT adapter, and memory per expert.

Measured side by side in ONE invocation, each measurement in a fresh subprocess (so its peak
memory is its own), all on the same NL2Bash prompts, the same batches and the same seeds:
  1. inference throughput (no grad) of a single PEFT adapter (plain PEFT, one adapter active: the
     baseline) vs top-1 per-sample routing over 4 experts in mixed batches, (a) through PEFT's own
     mixed-batch path `model(..., adapter_names=[...])` and (b) through
     `skillstream.experts.mixing.mixing(model, names, one_hot_weights)`: forward tokens/s (prefill)
     and greedy generation tokens/s; target >= 0.9x the single adapter;
  2. dense mixing over the same 4 experts (per-sample softmax weights, every expert contributes to
     every sample) through `mixing`; target >= 0.5x the single adapter;
  3. memory added per expert: bytes of LoRA parameters per expert, and the resident-memory growth
     of one process while the pool grows from 1 to 2, 4 and 8 experts (the backbone's weights are
     checked to stay the same tensors: no copy).
  4. scale (`--scale 4,16,100`): what choosing and serving cost as the pool grows, at each count
     in one invocation (counts interleaved, ABBA): routing (the router's frozen-backbone features
     of a batch, its head, the hybrid weights), novelty (a chunk's triple signal, then the
     experts it is compared with — every one below `experts.index.exact_below`, an HNSW index's
     nearest above — their full similarity components, the calibrated decider's probabilities
     and the decision; the index is rebuilt each time, as after every chunk's profile refresh),
     and serving the pool through PEFT's per-sample `adapter_names` (forward and generation)
     beside one adapter of the same model, both timed in one process per count, with the cost at
     each count as a ratio to the smallest count's (the run's own baseline); target: routing and
     novelty at the largest count < 2x their cost at the smallest.
Every expert gets a non-zero LoRA B (PEFT initialises B = 0, which would make every expert the
backbone), and a verification child checks that the routed output of each sample equals that
sample's single-adapter output (logits and generated tokens), and that dense mixing equals
PEFT's exact "cat" merge of the row's weights -- so the timed runs do equal work.

    python bench/routing.py            # SmolLM2-135M, LoRA r=16 on all linear layers, appends to bench/RESULTS.md
    python bench/routing.py --quick    # tiny model, few reps: wiring check, records nothing
    python bench/routing.py --scale 4,16,100   # part 4 only, appends to bench/RESULTS.md

See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
from common import MARK  # noqa: E402
RESULTS_MD = REPO / "bench" / "RESULTS.md"
MiB = 1024 ** 2
TARGETS = {"peft_top1": 0.9, "mix_top1": 0.9, "mix_dense": 0.5}
LABELS = {"single": "single PEFT adapter (baseline)", "peft_top1": "top-1 routing, PEFT `adapter_names`",
          "mix_top1": "top-1 routing, `mixing` one-hot", "mix_dense": "dense mixing, `mixing` softmax"}
MODES = tuple(LABELS)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-4
# dense mixing sums 4 deltas per layer, PEFT's "cat" merge does one rank-4r product: the same sum in a
# different float32 order, which over 30 layers moves logits of size ~20 by a few 1e-4
DENSE_ATOL = 1e-3


def expert_names(n: int) -> list[str]:
    return [f"e{k}" for k in range(n)]


# ------------------------------------------------------------------------------------------------
# helpers shared by the children
# ------------------------------------------------------------------------------------------------

def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    import gc
    gc.collect()
    return _status_bytes("VmRSS")


def _one_thread() -> None:
    import torch
    torch.set_num_threads(1)


def lora_config(spec: dict):
    from peft import LoraConfig
    return LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=TARGET_MODULES,
                      task_type="CAUSAL_LM")


def randomize_b(model, names: list[str], seeds: list[int], std: float) -> None:
    """A non-zero LoRA B for each expert of `names`, from its own seed (PEFT initialises B = 0: every
    expert would be the backbone). One pass over the parameters for all of them: with 100 experts a
    pass per expert would walk 100 x 42,000 parameter names."""
    import torch
    gens = {name: torch.Generator().manual_seed(seed) for name, seed in zip(names, seeds)}
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".lora_B." in key and (g := gens.get(key.split(".lora_B.", 1)[1].split(".", 1)[0])) is not None:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def add_adapters(model, names: list[str], spec: dict) -> None:
    """More LoRA adapters beside the first, each made by PEFT's own `LoraLayer.update_layer` on every
    LoRA layer, as `PeftModel.add_adapter` does. add_adapter itself also walks every module of the
    model per adapter, and the modules grow with each adapter: 100 adapters on SmolLM2 took 8-12 min
    per process on this 2-core machine (bench/RESULTS.md, 2026-12-06 09:32), while this is linear in
    the adapters. The serving child checks that each row served through `adapter_names` equals that
    expert served alone, so the adapters are what add_adapter makes."""
    from peft.tuners.lora import LoraLayer
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for name in names:
        config = lora_config(spec)
        model.peft_config[name] = config
        for layer in layers:
            layer.update_layer(name, config.r, config.lora_alpha, config=config)


def lora_bytes(model, name: str) -> int:
    return sum(p.numel() * p.element_size() for key, p in model.named_parameters()
               if f".lora_A.{name}." in key or f".lora_B.{name}." in key)


def build_model(spec: dict, n_experts: int):
    """Backbone + n experts (plain PEFT adapters e0..e{n-1}, non-zero B), e0 active, eval mode."""
    import torch
    from peft import get_peft_model

    from skillstream.models.backbone import load_backbone

    torch.manual_seed(spec["seed"])
    backbone, tok = load_backbone(spec["model"], seed=spec["seed"])
    names = expert_names(n_experts)
    model = get_peft_model(backbone, lora_config(spec), adapter_name=names[0])
    add_adapters(model, names[1:], spec)
    randomize_b(model, names, [spec["seed"] * 1000 + k for k in range(n_experts)], spec["b_std"])
    model.set_adapter(names[0])
    model.eval()
    return model, tok, names


def build_inputs(spec: dict, tok) -> list[dict]:
    """Batches of NL2Bash prompts (chat template, left padding, lengths as they are) and each batch's routing.

    Routing: each batch is split evenly over the experts (a seeded shuffle of 0,1,..,n-1 repeated),
    so a mixed batch really mixes; dense weights are a softmax of seeded Gaussian logits.
    """
    import torch

    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples
    from skillstream.data.render import Renderer

    n, bs = spec["experts"], spec["batch_size"]
    examples = load_examples(SourceConfig(source="nl2bash", split="train", limit=bs * spec["batches"]))
    renderer = Renderer(tok, 1024, None)
    texts = [renderer.prompt_text(ex) for ex in examples]
    tok.padding_side = "left"  # generation continues every row from its last token
    g = torch.Generator().manual_seed(spec["seed"])
    batches = []
    for i in range(0, len(texts), bs):
        enc = tok(texts[i:i + bs], return_tensors="pt", padding=True, add_special_tokens=True)
        b = enc["input_ids"].shape[0]
        if n <= b:
            route = torch.arange(b) % n
            route = route[torch.randperm(b, generator=g)]
        else:  # more experts than rows: each row a different expert drawn from the whole pool
            route = torch.randperm(n, generator=g)[:b]
        dense = torch.softmax(torch.randn(b, n, generator=g), dim=-1)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "route": route, "dense": dense})
    return batches


def forward_fn(model, names: list[str], mode: str, logits: str):
    """f(batch) -> logits: one inference forward of `mode` on a batch (the block is entered per batch)."""
    keep = 1 if logits == "last" else 0  # last: the prefill a generation does (no full-vocabulary head)

    def call(b, **kw):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                     logits_to_keep=keep, **kw).logits

    return routed_fn(call, model, names, mode)


def routed_fn(fn, model, names: list[str], mode: str):
    """fn(batch, **kw) served the way `mode` says: one adapter, PEFT's per-row adapter_names, or `mixing`."""
    from skillstream.experts.mixing import mixing, one_hot

    if mode == "single":
        return fn
    if mode == "peft_top1":
        return lambda b: fn(b, adapter_names=[names[k] for k in b["route"].tolist()])
    if mode not in ("mix_top1", "mix_dense"):
        raise ValueError(mode)

    def mixed(b):
        w = one_hot(b["route"], len(names)) if mode == "mix_top1" else b["dense"]
        with mixing(model, names, w):
            return fn(b)
    return mixed


def generate_fn(model, names: list[str], mode: str, new_tokens: int):
    """f(batch) -> token ids: greedy generation of exactly `new_tokens` tokens per row."""

    def gen(b, **kw):
        return model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)

    return routed_fn(gen, model, names, mode)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


# ------------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------------

def child_throughput(spec: dict) -> dict:
    """Forward and generation tokens/s of one mode: warm-up, then `reps` timed passes over all batches."""
    import torch
    mode = spec["mode"]
    model, tok, names = build_model(spec, spec["experts"])
    batches = build_inputs(spec, tok)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    fwd = forward_fn(model, names, mode, spec["logits"])
    out: dict = {"mode": mode, "prompt_tokens": tokens, "padded_tokens": sum(b["input_ids"].numel() for b in batches),
                 "batches": len(batches), "batch_size": spec["batch_size"]}
    with torch.inference_mode():
        for _ in range(spec["warmup"]):
            for b in batches:
                fwd(b)
        times = []
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            for b in batches:
                fwd(b)
            times.append(time.perf_counter() - t0)
        out.update(forward_seconds=times, forward_tokens_per_s=[tokens / t for t in times])
        if spec["gen_tokens"] > 0:
            gen = generate_fn(model, names, mode, spec["gen_tokens"])
            b = batches[0]
            gen(b)  # warm-up
            gtimes = []
            for _ in range(spec["gen_reps"]):
                t0 = time.perf_counter()
                ids = gen(b)
                gtimes.append(time.perf_counter() - t0)
            new = (ids.shape[1] - b["input_ids"].shape[1]) * ids.shape[0]
            out.update(gen_batch=ids.shape[0], gen_new_tokens=new, gen_seconds=gtimes,
                       gen_tokens_per_s=[new / t for t in gtimes])
    return out


def child_serving(spec: dict) -> dict:
    """Serving a pool of spec["experts"] adapters (part 4): one adapter active (the baseline) and PEFT's
    per-row `adapter_names` (each row of a batch a different expert), timed in the SAME process on the
    same model, passes alternating (A B B A ...), so load on a shared machine hits both alike; and
    the equal-work check: every row served through adapter_names equals its expert served alone."""
    import torch
    t0 = time.perf_counter()
    model, tok, names = build_model(spec, spec["experts"])
    build = time.perf_counter() - t0
    batches = build_inputs(spec, tok)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    modes = ("single", "peft_top1")
    out: dict = {"experts": len(names), "build_seconds": build, "prompt_tokens": tokens,
                 "batch_size": spec["batch_size"], "batches": len(batches),
                 "forward_tokens_per_s": {m: [] for m in modes}, "gen_tokens_per_s": {m: [] for m in modes}}
    with torch.inference_mode():
        b = batches[0]
        routed = forward_fn(model, names, "peft_top1", "all")(b)
        single = {}
        for k in sorted(set(b["route"].tolist())):
            model.set_adapter(names[k])
            single[k] = forward_fn(model, names, "single", "all")(b)
        model.set_adapter(names[0])
        ok, diff = routed_rows_match(single, routed, b["route"])
        out["equal_work"] = {"ok": ok, "max_abs_diff": diff, "experts_in_batch": len(single)}
        fwd = {m: forward_fn(model, names, m, spec["logits"]) for m in modes}
        for _ in range(spec["warmup"]):
            for m in modes:
                for b in batches:
                    fwd[m](b)
        for rep in range(spec["reps"]):
            for m in (modes if rep % 2 == 0 else modes[::-1]):
                t = time.perf_counter()
                for b in batches:
                    fwd[m](b)
                out["forward_tokens_per_s"][m].append(tokens / (time.perf_counter() - t))
        if spec["gen_tokens"] > 0:
            gen = {m: generate_fn(model, names, m, spec["gen_tokens"]) for m in modes}
            b = batches[0]
            for m in modes:
                gen[m](b)  # warm-up
            for rep in range(spec["gen_reps"]):
                for m in (modes if rep % 2 == 0 else modes[::-1]):
                    t = time.perf_counter()
                    ids = gen[m](b)
                    new = (ids.shape[1] - b["input_ids"].shape[1]) * ids.shape[0]
                    out["gen_tokens_per_s"][m].append(new / (time.perf_counter() - t))
            out.update(gen_batch=ids.shape[0], gen_new_tokens=new)
    return out


def routed_rows_match(single: dict, routed, route, *, exact_tokens: bool = False) -> tuple[bool, float]:
    """Does row i of `routed` equal row i of the single-adapter output of its expert route[i]? (ok, max abs diff)."""
    import torch
    worst, ok = 0.0, True
    for i, k in enumerate(route.tolist()):
        ref, got = single[k][i], routed[i]
        if exact_tokens:
            ok &= bool(torch.equal(ref, got))
            worst = max(worst, float((ref != got).sum()))
        else:
            d = float((ref - got).abs().max())
            worst = max(worst, d)
            ok &= bool(torch.allclose(got, ref, atol=ATOL, rtol=ATOL))
    return ok, worst


def child_verify(spec: dict) -> dict:
    """Equal work: routed outputs equal the chosen expert's single-adapter outputs; dense = PEFT's cat merge."""
    import torch
    model, tok, names = build_model(spec, spec["experts"])
    batches = build_inputs(spec, tok)
    out: dict = {"checks": {}}
    with torch.inference_mode():
        for bi, b in enumerate(batches[:spec["verify_batches"]]):
            single = {}
            for k, name in enumerate(names):
                model.set_adapter(name)
                single[k] = forward_fn(model, names, "single", "all")(b)
            model.set_adapter(names[0])
            with model.disable_adapter():
                base = forward_fn(model, names, "single", "all")(b)
            out["expert_vs_expert_max_abs_logit_diff"] = float((single[0] - single[1]).abs().max())
            out["expert_vs_backbone_max_abs_logit_diff"] = float((single[0] - base).abs().max())
            for mode in ("peft_top1", "mix_top1"):
                ok, diff = routed_rows_match(single, forward_fn(model, names, mode, "all")(b), b["route"])
                out["checks"][f"{mode} logits, batch {bi}"] = {"ok": ok, "max_abs_diff": diff}
        b = batches[0]
        if spec["gen_tokens"] > 0:
            single = {}
            for k, name in enumerate(names):
                model.set_adapter(name)
                single[k] = generate_fn(model, names, "single", spec["gen_tokens"])(b)
            model.set_adapter(names[0])
            for mode in ("peft_top1", "mix_top1"):
                ok, diff = routed_rows_match(single, generate_fn(model, names, mode, spec["gen_tokens"])(b),
                                             b["route"], exact_tokens=True)
                out["checks"][f"{mode} generated tokens"] = {"ok": ok, "max_abs_diff": diff}
            out["experts_generate_differently"] = not torch.equal(single[0], single[1])
        dense = forward_fn(model, names, "mix_dense", "all")(b)
    for row in range(min(2, b["dense"].shape[0])):  # dense row r == PEFT's exact "cat" merge with w[r]
        merged = f"cat{row}"
        model.add_weighted_adapter(names, b["dense"][row].tolist(), merged, combination_type="cat")
        model.set_adapter(merged)
        with torch.inference_mode():
            ref = forward_fn(model, names, "single", "all")(b)[row]
        model.set_adapter(names[0])
        model.delete_adapter(merged)
        d = float((dense[row] - ref).abs().max())
        out["checks"][f"mix_dense row {row} vs PEFT cat merge"] = {
            "ok": bool(torch.allclose(dense[row], ref, atol=DENSE_ATOL, rtol=ATOL)), "max_abs_diff": d}
    out["ok"] = all(c["ok"] for c in out["checks"].values())
    return out


def child_memory(spec: dict) -> dict:
    """RSS of one process as the pool grows 0 -> 1 -> 2 -> 4 -> 8 experts; the backbone's tensors are never copied."""
    import torch
    from peft import get_peft_model

    from skillstream.experts.pool import ExpertPool
    from skillstream.models.backbone import load_backbone

    torch.manual_seed(spec["seed"])
    backbone, tok = load_backbone(spec["model"], seed=spec["seed"])
    base_ptrs = {p.data_ptr() for p in backbone.parameters()}
    base_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    counts = sorted(set(spec["memory_counts"]))
    rss = {0: _rss()}
    names = expert_names(max(counts))
    model = get_peft_model(backbone, lora_config(spec), adapter_name=names[0])
    pool = ExpertPool(model, seed=spec["seed"])
    randomize_b(model, names[:1], [spec["seed"] * 1000], spec["b_std"])
    rss[1] = _rss()
    for k, name in enumerate(names[1:], start=1):
        pool.create(name)  # how skillstream adds an expert (a seeded PEFT add_adapter)
        randomize_b(model, [name], [spec["seed"] * 1000 + k], spec["b_std"])
        if k + 1 in counts:
            rss[k + 1] = _rss()
    non_lora = [p for key, p in model.named_parameters() if ".lora_" not in key]
    per_expert = [lora_bytes(model, n) for n in names]
    return {"backbone_bytes": base_bytes, "lora_bytes_per_expert": per_expert[0],
            "lora_bytes_all_equal": len(set(per_expert)) == 1,
            "lora_params_per_expert": per_expert[0] // 4,
            "rss_bytes": {str(k): v for k, v in rss.items()},
            "backbone_tensors_shared": {p.data_ptr() for p in non_lora} == base_ptrs
                                       and sum(p.numel() * p.element_size() for p in non_lora) == base_bytes,
            "experts": len(pool)}


def random_profiles(anchor, n: int, seed: int) -> dict:
    """n expert profiles around a real chunk signal (each part jittered by seeded noise of its own
    scale; context statistics spread by up to +-30%), so the similarities have a realistic spread."""
    import torch

    from skillstream.experts.signals import ExpertProfile, TaskSignal
    g = torch.Generator().manual_seed(seed)
    jitter = lambda t: t + t.norm() / t.numel() ** 0.5 * torch.randn(t.shape, generator=g)  # noqa: E731
    out = {}
    for i in range(n):
        scale = 1 + 0.3 * (2 * torch.rand(2, generator=g) - 1)
        out[f"e{i}"] = ExpertProfile(f"e{i}", TaskSignal(jitter(anchor.embedding), jitter(anchor.gradient),
                                                         jitter(anchor.fisher), anchor.entropy * float(scale[0]),
                                                         anchor.length * float(scale[1]), 8))
    return out


def child_selection(spec: dict) -> dict:
    """Routing and novelty at spec["experts"] experts: median seconds per call of each part."""
    import torch

    from skillstream.config import ExpertsConfig
    from skillstream.data.render import Renderer
    from skillstream.experts.calibration import ReuseCalibrator, features
    from skillstream.experts.index import ProfileIndex
    from skillstream.experts.mixing import hybrid_weights
    from skillstream.experts.novelty import NoveltyDetector
    from skillstream.experts.router import Router
    from skillstream.experts.signals import SignalConfig, SimilarityWeights, compute_signal, similarity_components
    from skillstream.models.backbone import load_backbone

    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples

    n = spec["experts"]
    torch.manual_seed(spec["seed"])
    model, tok = load_backbone(spec["model"], seed=spec["seed"])
    model.eval()
    cfg = ExpertsConfig()  # the defaults: index hnsw from 32 experts, 8 candidates; calibration prior
    depth = [0.4, 0.6]  # dylora_moe's router
    router = Router(model.config.hidden_size * len(depth), n, seed=spec["seed"], pooling="last", depth=depth)
    with torch.no_grad():
        router.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(spec["seed"]))
    maturity = torch.rand(n, generator=torch.Generator().manual_seed(spec["seed"] + 1))
    examples = load_examples(SourceConfig(source="nl2bash", split="train", limit=spec["batch_size"]))
    renderer = Renderer(tok, 1024, None)
    tok.padding_side = "left"
    enc = tok([renderer.prompt_text(ex) for ex in examples], return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    weights = SimilarityWeights(**cfg.novelty.weights)
    index = ProfileIndex(weights, kind=cfg.index.kind, exact_below=cfg.index.exact_below,
                         candidates=cfg.index.candidates, ef=cfg.index.ef, m=cfg.index.m, seed=spec["seed"])
    calibrator = ReuseCalibrator.from_threshold(cfg.novelty.similarity_threshold, cfg.novelty.weights,
                                                cfg.novelty.calibration.prior_slope)
    sig_cfg = SignalConfig(max_length=256, seed=spec["seed"])
    chunk = examples[:spec["signal_examples"]]
    anchor = compute_signal(model, tok, chunk, config=sig_cfg)
    profiles = random_profiles(anchor, n, spec["seed"])

    def lookup(signal, entropy: float) -> dict:
        index.invalidate()  # profiles are refreshed after every chunk: the index is rebuilt for the next one
        names = index.candidates(signal, profiles)
        comps = {e: similarity_components(signal, profiles[e].signal) for e in names}
        sims = {e: weights.embedding * c["embedding"] + weights.gradient * c["gradient"] + weights.context * c["context"]
                for e, c in comps.items()}
        reusable = {e: calibrator.probability(features(c, entropy)) for e, c in comps.items()
                    if calibrator.upper(features(c, entropy)) >= 0.5}
        best = max(sims, key=sims.get)
        return {**NoveltyDetector().observe(entropy, sims[best], best, sims, reusable), "compared": len(names)}

    parts: dict[str, list[float]] = {k: [] for k in ("route_features", "route_head", "novelty_signal", "novelty_lookup")}
    with torch.inference_mode():
        for rep in range(spec["warmup"] + spec["reps"]):
            t0 = time.perf_counter()
            feats = router.read(model, batch)
            t1 = time.perf_counter()
            probs = router.probs(feats)
            w = hybrid_weights(probs, maturity, 0.5, 1)
            entropy = float(router.entropy(feats).mean())
            t2 = time.perf_counter()
            if rep >= spec["warmup"]:
                parts["route_features"].append(t1 - t0)
                parts["route_head"].append(t2 - t1)
            del w
    for rep in range(spec["warmup"] + spec["reps"]):
        t0 = time.perf_counter()
        signal = compute_signal(model, tok, chunk, config=sig_cfg)
        t1 = time.perf_counter()
        record = lookup(signal, entropy)
        t2 = time.perf_counter()
        if rep >= spec["warmup"]:
            parts["novelty_signal"].append(t1 - t0)
            parts["novelty_lookup"].append(t2 - t1)
    # the lookup alone is sub-millisecond: time it over many calls for a stable figure
    t0 = time.perf_counter()
    for _ in range(spec["lookup_calls"]):
        lookup(signal, entropy)
    lookup_each = (time.perf_counter() - t0) / spec["lookup_calls"]
    return {"experts": n, "parts": parts, "lookup_each": lookup_each, "candidates": record["compared"],
            "index": "hnsw" if index.uses_ann(n) else "exact", "decision": record["decision"],
            "batch_size": spec["batch_size"], "signal_examples": len(chunk)}


CHILDREN = {"throughput": child_throughput, "verify": child_verify, "memory": child_memory,
            "selection": child_selection, "serving": child_serving}


def child_main(kind: str, spec_json: str) -> None:
    _one_thread()
    import torch
    spec = json.loads(spec_json)
    out = CHILDREN[kind](spec)
    out.update(kind=kind, peak_rss_bytes=_status_bytes("VmHWM"), torch_threads=torch.get_num_threads())
    print(MARK + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------

def run_child(kind: str, spec: dict) -> dict:
    return common.run_child(__file__, kind, spec, label=f"{kind:<10} {spec.get('mode', kind):<10}", bench="bench/routing",
                            cwd=REPO, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def run_inline(kind: str, spec: dict) -> dict:
    """The same child in this process (tests): no separate peak memory."""
    _one_thread()
    out = CHILDREN[kind](json.loads(json.dumps(spec)))
    out.update(kind=kind, peak_rss_bytes=_status_bytes("VmHWM"), torch_threads=1)
    return out


def measure(spec: dict, runner=run_child) -> dict:
    """Every measurement of one invocation: throughput per mode (rounds in alternating order), verify, memory."""
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(spec["rounds"]):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):  # ABBA: drift on a shared machine hits all modes alike
            runs[mode].append(runner("throughput", {**spec, "mode": mode}))
    return {"throughput": runs, "verify": runner("verify", spec), "memory": runner("memory", spec)}


def measure_scale(spec: dict, counts: list[int], runner=run_child) -> dict:
    """Part 4 at each count, counts in alternating order per round (ABBA), each child a fresh process:
    selection (routing and novelty), and serving (one adapter vs PEFT's adapter_names, in one process)."""
    runs: dict[int, dict[str, list[dict]]] = {n: {"selection": [], "serving": []} for n in counts}
    for r in range(spec["rounds"]):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            at = {**spec, "experts": n}
            if spec["selection"]:
                runs[n]["selection"].append(runner("selection", at))
            if spec["serving"]:
                runs[n]["serving"].append(runner("serving", at))
    return runs


def scale_report(spec: dict, counts: list[int], runs: dict) -> str:
    out = []
    if spec["selection"]:
        out += selection_table(spec, counts, runs) + [""]
    if spec["serving"]:
        out += serving_table(spec, counts, runs)
    return "\n".join(out) + "\n"


def selection_table(spec: dict, counts: list[int], runs: dict) -> list[str]:
    ms = lambda xs: 1000 * _median(xs)  # noqa: E731
    rows = {}
    for n in counts:
        sel = runs[n]["selection"]
        part = {k: [x for r in sel for x in r["parts"][k]] for k in sel[0]["parts"]}
        lookup = _median([r["lookup_each"] for r in sel])
        rows[n] = {"route": ms(part["route_features"]) + ms(part["route_head"]), "route_head": ms(part["route_head"]),
                   "novelty": ms(part["novelty_signal"]) + 1000 * lookup, "lookup": 1000 * lookup,
                   "index": sel[0]["index"], "candidates": sel[0]["candidates"]}
    out = ["| experts | routing ms/batch (router head + hybrid ms) | novelty ms/chunk (lookup ms: index, similarity, decider) "
           "| compared in full |", "|---:|---:|---:|---|"]
    for n in counts:
        r = rows[n]
        out.append(f"| {n} | {r['route']:.1f} ({r['route_head']:.3f}) | {r['novelty']:.0f} ({r['lookup']:.3f}) | "
                   f"{r['candidates']} of {n} ({r['index']}) |")
    lo, hi = rows[counts[0]], rows[counts[-1]]
    ratio = lambda k: hi[k] / lo[k]  # noqa: E731
    out += ["", f"Cost at {counts[-1]} experts / cost at {counts[0]}: routing {ratio('route'):.2f}x "
                f"(head + hybrid alone {ratio('route_head'):.2f}x), novelty {ratio('novelty'):.2f}x "
                f"(lookup alone {ratio('lookup'):.2f}x); target < 2x: routing {verdict(ratio('route') < 2)}, "
                f"novelty {verdict(ratio('novelty') < 2)}, lookup alone {verdict(ratio('lookup') < 2)}.", "",
            f"model {spec['model']}; routing: a batch of {spec['batch_size']} NL2Bash prompts, features at depths 0.4 "
            f"and 0.6 (last token), a linear head over N experts, hybrid weights; novelty: the triple signal of "
            f"{spec['signal_examples']} examples, then {spec['lookup_calls']} timed lookups (index rebuilt each time, "
            f"experts.index defaults: exact below 32, 8 candidates, HNSW M 16, ef 64) against N profiles jittered around "
            f"a real signal, the calibrated decider's prior. Medians of {spec['reps']} reps x {spec['rounds']} rounds, "
            f"counts in alternating order per round, each measurement a fresh process, 1 torch thread."]
    return out


def serving_summary(spec: dict, counts: list[int], runs: dict) -> dict[int, dict]:
    """Per count: median tokens/s of one adapter and of adapter_names (same processes), their ratio,
    and adapter_names' cost per token relative to the smallest count (the run's baseline)."""
    rows = {}
    for n in counts:
        srv = runs[n]["serving"]
        fwd = {m: _median([x for r in srv for x in r["forward_tokens_per_s"][m]]) for m in ("single", "peft_top1")}
        gen = {m: _median([x for r in srv for x in r["gen_tokens_per_s"][m]]) if spec["gen_tokens"] else None
               for m in ("single", "peft_top1")}
        rows[n] = {"fwd": fwd, "gen": gen, "build": _median([r["build_seconds"] for r in srv]),
                   "rss": max(r["peak_rss_bytes"] for r in srv), "ok": all(r["equal_work"]["ok"] for r in srv),
                   "diff": max(r["equal_work"]["max_abs_diff"] for r in srv),
                   "in_batch": srv[0]["equal_work"]["experts_in_batch"]}
    lo = rows[counts[0]]
    for r in rows.values():
        r["vs_single"] = r["fwd"]["peft_top1"] / r["fwd"]["single"]
        r["cost_vs_lo"] = lo["fwd"]["peft_top1"] / r["fwd"]["peft_top1"]  # time per token, relative
        r["gen_vs_single"] = r["gen"]["peft_top1"] / r["gen"]["single"] if r["gen"]["single"] else None
        r["gen_cost_vs_lo"] = lo["gen"]["peft_top1"] / r["gen"]["peft_top1"] if r["gen"]["peft_top1"] else None
    return rows


def serving_table(spec: dict, counts: list[int], runs: dict) -> list[str]:
    rows = serving_summary(spec, counts, runs)
    out = [f"| experts loaded | experts per batch | one adapter forward tok/s | adapter_names forward tok/s | "
           f"adapter_names / one adapter | adapter_names cost per token / at {counts[0]} | generate tok/s one / adapter_names "
           f"| generate cost per token / at {counts[0]} | build s | peak GiB | equal work (max abs logit diff) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n in counts:
        r = rows[n]
        gen = f"{r['gen']['single']:.1f} / {r['gen']['peft_top1']:.1f}" if r["gen"]["single"] else "-"
        gcost = f"{r['gen_cost_vs_lo']:.2f}x" if r["gen_cost_vs_lo"] else "-"
        out.append(f"| {n} | {r['in_batch']} | {r['fwd']['single']:.0f} | {r['fwd']['peft_top1']:.0f} | {r['vs_single']:.2f}x | "
                   f"{r['cost_vs_lo']:.2f}x | {gen} | {gcost} | {r['build']:.0f} | {r['rss'] / 1024 ** 3:.2f} | "
                   f"{'ok' if r['ok'] else '**FAILED**'} ({r['diff']:.2g}) |")
    lo, hi = rows[counts[0]], rows[counts[-1]]
    out += ["", f"Serving {counts[-1]} adapters through PEFT's `adapter_names` costs {hi['cost_vs_lo']:.2f}x per prompt token "
                f"what serving {counts[0]} does (forward), "
                + (f"{hi['gen_cost_vs_lo']:.2f}x per generated token; " if hi["gen_cost_vs_lo"] else "")
                + f"beside one adapter of the same model it runs at {hi['vs_single']:.2f}x its forward throughput. "
                f"Normalised by one adapter in the same process (load drift between processes cancels), adapter_names "
                f"forward at {counts[-1]} costs {lo['vs_single'] / hi['vs_single']:.2f}x what it costs at {counts[0]}.", "",
            f"serving: model {spec['model']}, LoRA r={spec['r']} on all linear layers, B ~ N(0, {spec['b_std']}); "
            f"{spec['batches']} batch(es) of {spec['batch_size']} NL2Bash prompts (chat template, left padding); a batch "
            f"is split evenly over the experts when they are no more than its rows, else each row is a different "
            f"expert drawn from the N; forward: inference mode, logits "
            f"{'of the last position (a prefill)' if spec['logits'] == 'last' else 'of every position'}, "
            f"{spec['warmup']} untimed pass(es), then {spec['reps']} timed passes per mode alternating in ONE process "
            f"(one adapter active vs adapter_names on the same model); generation: the first batch, {spec['gen_tokens']} "
            f"greedy tokens, {spec['gen_reps']} per mode alternating; medians over {spec['rounds']} round(s), counts in "
            f"alternating order, each count a fresh process, 1 torch thread. Equal work: every row of the first batch "
            f"through adapter_names equals its expert served alone (atol {ATOL}). Build: backbone load plus the "
            f"adapters (PEFT's per-layer update_layer, see add_adapters)."]
    return out


def summarize(results: dict) -> dict:
    """Median tokens/s per mode over every timed rep of every round, and ratios to the single adapter."""
    out = {}
    for mode, rounds in results["throughput"].items():
        fwd = [x for r in rounds for x in r["forward_tokens_per_s"]]
        gen = [x for r in rounds for x in r.get("gen_tokens_per_s", [])]
        out[mode] = {"forward": _median(fwd), "forward_min": min(fwd), "forward_max": max(fwd), "forward_n": len(fwd),
                     "generate": _median(gen) if gen else None,
                     "generate_min": min(gen) if gen else None, "generate_max": max(gen) if gen else None,
                     "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rounds)}
    for mode in out:
        for what in ("forward", "generate"):
            base = out["single"][what]
            out[mode][f"{what}_ratio"] = out[mode][what] / base if base and out[mode][what] else None
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def build_report(spec: dict, results: dict) -> str:
    s = summarize(results)
    v, mem = results["verify"], results["memory"]
    first = results["throughput"]["single"][0]
    rows = ["| measurement | forward tokens/s (min-max) | ratio | generate tokens/s (min-max) | ratio | target | status | peak GiB |",
            "|---|---:|---:|---:|---:|---|---|---:|"]
    for mode in MODES:
        m = s[mode]
        target = TARGETS.get(mode)
        gen = (f"{m['generate']:.1f} ({m['generate_min']:.1f}-{m['generate_max']:.1f})" if m["generate"] else "-")
        gratio = f"{m['generate_ratio']:.2f}x" if m["generate_ratio"] else "-"
        if target is None:
            tgt, status = "baseline", ""
        else:
            tgt = f"≥ {target}x"
            status = f"forward {verdict(m['forward_ratio'] >= target)}"
            if m["generate_ratio"]:
                status += f", generate {verdict(m['generate_ratio'] >= target)}"
        rows.append(f"| {LABELS[mode]} | {m['forward']:.0f} ({m['forward_min']:.0f}-{m['forward_max']:.0f}) | "
                    f"{m['forward_ratio']:.2f}x | {gen} | {gratio} | {tgt} | {status} | {m['peak_rss_bytes'] / 1024 ** 3:.2f} |")
    checks = ["| equal-work check | max abs diff | status |", "|---|---:|---|"]
    for name, c in v["checks"].items():
        unit = " tokens differ" if "tokens" in name else ""
        checks.append(f"| {name} | {c['max_abs_diff']:.2g}{unit} | {'ok' if c['ok'] else '**FAILED**'} |")
    checks.append(f"| (experts really differ: max abs logit diff e0 vs e1 {v['expert_vs_expert_max_abs_logit_diff']:.2f}, "
                  f"e0 vs backbone {v['expert_vs_backbone_max_abs_logit_diff']:.2f}"
                  + (f"; greedy generations of e0 and e1 differ: {'yes' if v.get('experts_generate_differently') else 'no'}"
                     if "experts_generate_differently" in v else "") + ") | | |")
    rss = {int(k): b for k, b in mem["rss_bytes"].items()}
    lora = mem["lora_bytes_per_expert"]
    memrows = ["| experts | LoRA MiB (params) | RSS MiB | RSS growth vs 1 expert MiB | growth per added expert MiB | growth / LoRA bytes |",
               "|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(rss):
        grow = (rss[n] - rss[1]) / MiB if n >= 1 else None
        per = (rss[n] - rss[1]) / (n - 1) if n > 1 else None
        memrows.append(f"| {n} | {n * lora / MiB:.1f} | {rss[n] / MiB:.0f} | "
                       f"{'-' if grow is None else f'{grow:.1f}'} | {'-' if per is None else f'{per / MiB:.1f}'} | "
                       f"{'-' if per is None else f'{per / lora:.2f}'} |")
    big = max(rss)
    per_added = (rss[big] - rss[1]) / max(1, big - 1)
    memnote = (f"LoRA r={spec['r']} on {', '.join(TARGET_MODULES)}: {mem['lora_params_per_expert']:,} parameters = "
               f"{lora / MiB:.1f} MiB per expert (fp32), {100 * lora / mem['backbone_bytes']:.1f}% of the backbone's "
               f"{mem['backbone_bytes'] / MiB:.0f} MiB; measured RSS growth {per_added / MiB:.1f} MiB per added expert "
               f"({per_added / lora:.2f}x its LoRA bytes). Backbone tensors after adding {mem['experts']} experts are the "
               f"same storages as before (no copy): {'yes' if mem['backbone_tensors_shared'] else '**NO**'}.")
    notes = (f"model {spec['model']}, LoRA r={spec['r']} alpha={spec['alpha']} dropout 0 on all linear layers, "
             f"{spec['experts']} experts with LoRA B ~ N(0, {spec['b_std']}); inputs: the first "
             f"{first['batches'] * spec['batch_size']} NL2Bash train prompts (chat template), {first['batches']} batches "
             f"of {spec['batch_size']}, left padding, {first['prompt_tokens']} prompt tokens ({first['padded_tokens']} with "
             f"padding); each mixed batch routed evenly over the experts (seeded shuffle), dense weights a softmax "
             f"of seeded Gaussian logits. Forward: inference mode, use_cache=False, "
             f"logits {'of the last position only (the prefill of a generation)' if spec['logits'] == 'last' else 'of every position'}; "
             f"tokens/s = non-pad prompt tokens / time of one pass over all batches, {spec['warmup']} untimed pass(es), "
             f"median of {spec['reps']} reps x {spec['rounds']} round(s) (alternating order, each mode a fresh subprocess). "
             f"Generation: the first batch ({first.get('gen_batch', '-')} rows, prefill included), greedy, exactly {spec['gen_tokens']} new tokens "
             f"(KV cache), tokens/s = new tokens / wall time, median of {spec['gen_reps']} x {spec['rounds']}. "
             f"The `mixing` block is entered per call (hooks registered and removed each time). "
             f"torch threads {first['torch_threads']}.")
    return ("\n".join(rows) + "\n\n" + "\n".join(checks) + "\n\n" + "\n".join(memrows) + "\n\n" + memnote + "\n\n"
            + notes + "\n")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for pkg in ("torch", "transformers", "peft"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def record(report: str, command: str, machine_text: str, quick: bool) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS_MD.open("a") as f:
        f.write(f"\n## {stamp}: bench/routing{' (quick: wiring check, not a measurement)' if quick else ''}\n\n"
                f"- command: `{command}`\n- machine: {machine_text}\n- python {platform.python_version()}, "
                f"{_versions()}\n\n{report}")


def make_spec(args) -> dict:
    q = args.quick
    pick = lambda value, quick, full: value if value is not None else (quick if q else full)  # noqa: E731
    return {"model": args.model or ("tiny" if q else "smollm2-135m"), "seed": args.seed,
            "r": args.r, "alpha": args.alpha, "experts": args.experts, "b_std": args.b_std,
            "batch_size": pick(args.batch_size, 8, 16), "batches": pick(args.batches, 2, 2),
            "warmup": pick(args.warmup, 1, 1), "reps": pick(args.reps, 2, 3), "rounds": pick(args.rounds, 1, 2),
            "gen_tokens": pick(args.gen_tokens, 4, 16), "gen_reps": pick(args.gen_reps, 2, 2),
            "verify_batches": pick(args.verify_batches, 1, 1), "logits": args.logits,
            "memory_counts": [1, 2, 4, 8], "lookup_calls": args.lookup_calls, "signal_examples": args.signal_examples,
            "serving": not args.no_serving, "selection": not args.no_selection}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Per-sample routing / dense mixing of LoRA experts vs a single PEFT adapter, "
                                             "and memory per expert, side by side.")
    ap.add_argument("--quick", action="store_true", help="tiny model, few reps (wiring check); records nothing")
    ap.add_argument("--model", default=None, help="backbone (default smollm2-135m; tiny with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default 16; 8 with --quick)")
    ap.add_argument("--batches", type=int, default=None, help="batches per timed pass (default 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed passes per subprocess (default 3; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed passes first (default 1)")
    ap.add_argument("--rounds", type=int, default=None, help="subprocesses per mode, in alternating order (default 2; 1 with --quick)")
    ap.add_argument("--gen-tokens", type=int, default=None, help="new tokens per generation, 0 = no generation (default 16; 4 with --quick)")
    ap.add_argument("--gen-reps", type=int, default=None, help="timed generations per subprocess (default 2)")
    ap.add_argument("--verify-batches", type=int, default=None, help="batches checked for equal logits (default 1)")
    ap.add_argument("--logits", choices=["last", "all"], default="last",
                    help="forward computes the logits of the last position (default, a generation's prefill) or of every position")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--b-std", type=float, default=0.01, help="std of the random LoRA B given to every expert")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--machine", default=None, help="machine description written to bench/RESULTS.md (default: lscpu)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--scale", default=None,
                    help="comma-separated expert counts (e.g. 4,16,100): measure routing, novelty and PEFT adapter_names "
                         "serving at each (part 4) instead of parts 1-3")
    ap.add_argument("--lookup-calls", type=int, default=200, help="--scale: timed novelty lookups per process")
    ap.add_argument("--no-serving", action="store_true",
                    help="--scale: routing and novelty only (no serving children)")
    ap.add_argument("--no-selection", action="store_true", help="--scale: serving only (no routing or novelty children)")
    ap.add_argument("--signal-examples", type=int, default=8, help="--scale: examples in the chunk whose signal is read")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    return ap


def main(argv=None, runner=run_child) -> dict | None:
    args = parser().parse_args(argv)
    if args._child:
        return child_main(*args._child)
    spec = make_spec(args)
    for key in ("batch_size", "batches", "reps", "rounds", "experts", "r", "gen_reps", "verify_batches"):
        if spec[key] < 1:
            print(f"bench/routing: --{key.replace('_', '-')} must be at least 1", file=sys.stderr)
            sys.exit(2)
    if args.scale and args.no_serving and args.no_selection:
        print("bench/routing: --no-serving and --no-selection leave nothing to measure", file=sys.stderr)
        sys.exit(2)
    if spec["experts"] < 2:
        print("bench/routing: --experts must be at least 2 (routing needs a choice)", file=sys.stderr)
        sys.exit(2)
    command = "python bench/routing.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                           if (argv if argv is not None else sys.argv[1:]) else "")
    if args.scale:
        try:
            counts = sorted({int(c) for c in args.scale.split(",")})
        except ValueError:
            counts = []
        if len(counts) < 2 or counts[0] < 2:
            print(f"bench/routing: --scale needs two or more expert counts >= 2, got {args.scale!r}", file=sys.stderr)
            sys.exit(2)
        runs = measure_scale(spec, counts, runner)
        report = scale_report(spec, counts, runs)
        machine_text = args.machine or common.machine()
        print(f"\n{command}\nmachine: {machine_text}\n\n{report}")
        if not args.quick and not args.no_record:
            record(report, command, machine_text, False)
            print(f"appended to {RESULTS_MD.relative_to(REPO)}", file=sys.stderr)
        return {"spec": spec, "counts": counts, "scale": runs, "report": report}
    print(f"bench/routing: {spec['model']}, {spec['experts']} experts r={spec['r']}, {spec['batches']} batches x "
          f"{spec['batch_size']}, {spec['reps']} reps x {spec['rounds']} rounds", file=sys.stderr)
    results = measure(spec, runner)
    report = build_report(spec, results)
    machine_text = args.machine or common.machine()
    print(f"\n{command}\nmachine: {machine_text}\n\n{report}")
    if not results["verify"]["ok"]:
        print("bench/routing: the equal-work check FAILED (see the table)", file=sys.stderr)
    if not args.quick and not args.no_record:
        record(report, command, machine_text, False)
        print(f"appended to {RESULTS_MD.relative_to(REPO)}", file=sys.stderr)
    return {"spec": spec, "results": results, "summary": summarize(results), "report": report}


if __name__ == "__main__":
    main()
