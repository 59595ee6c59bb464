"""bench/throughput: our engine vs transformers `Trainer` + PEFT, and option scoring vs naive.

Measured side by side in ONE invocation, each measurement in a fresh subprocess (so its peak
memory is its own):
  1. training tokens/s (non-pad tokens / wall time of the training loop, model loading and
     evaluation excluded, the first --skip optimizer steps not timed) of `skillstream.run.train`
     on the quickstart recipe vs `Trainer` + `get_peft_model` on the SAME tokenized examples,
     batch size, precision, optimizer steps and LR schedule kind; the Trainer is run twice:
     default random sampler, and grouped by length;
  2. `score_options` (prompt once + KV cache) vs `score_options_naive` (one forward per
     (prompt, option)) on SST-2 test examples, with argmax agreement;
  3. peak memory (VmHWM) of each training process.

    python bench/throughput.py            # SmolLM2-135M, fp32 and bf16, appends to bench/RESULTS.md
    python bench/throughput.py --quick    # tiny model, a few steps: wiring check, records nothing

See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SST2 = SHARED / "data" / "glue_stream" / "sst2"
RESULTS_MD = REPO / "bench" / "RESULTS.md"
RECIPE = "quickstart"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)
from common import MARK  # noqa: E402
GiB = 1024 ** 3

TARGET_TRAIN, TARGET_SCORE, TARGET_PEAK_GIB, TARGET_MFU = 1.5, 1.8, 3.0, 0.35


# ------------------------------------------------------------------------------------------------
# helpers shared by the children
# ------------------------------------------------------------------------------------------------

def _peak_rss_bytes() -> int:
    """VmHWM (peak resident set) of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _recipe(spec: dict):
    """The quickstart recipe with the benchmark's overrides: the config both sides follow."""
    from skillstream.config import load_recipe
    return load_recipe(RECIPE, _overrides(spec))


def _overrides(spec: dict) -> dict:
    return {"model": {"name": spec["model"], "dtype": spec.get("dtype", "auto")}, "data.eval": [], "report_to": [],
            "train.steps": spec["steps"], "train.batch_size": spec["batch_size"], "train.grad_accum": 1,
            "train.bf16": spec["bf16"], "train.warmup_steps": spec["lr_warmup"],
            "train.checkpoint_every": 10 ** 9,  # no checkpoint inside the timed loop (Trainer: save_strategy=no)
            **({"data.train.0.limit": spec["train_limit"]} if spec.get("train_limit") else {})}


def _tokenized_train(cfg, tok):
    """The training split tokenized exactly as the engine does (objective lm = Renderer.tokenize)."""
    from skillstream.data.examples import load_examples
    from skillstream.data.render import Renderer
    renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt)
    return [renderer.tokenize(ex) for src in cfg.data.train for ex in load_examples(src)]


class _Meter:
    """Counts non-pad and padded tokens per batch; timing starts after `skip` optimizer steps."""

    def __init__(self, skip: int):
        self.skip, self.t_begin, self.t0, self.t1 = skip, None, None, None
        self.batches: list[tuple[int, int]] = []   # (non-pad tokens, padded tokens) per batch, in order

    def add(self, mask) -> None:
        self.batches.append((int(mask.sum()), int(mask.numel())))

    def result(self, steps: int) -> dict:
        timed = self.batches[self.skip:steps]
        tokens, padded = sum(b[0] for b in timed), sum(b[1] for b in timed)
        seconds = self.t1 - self.t0
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                "pad_fraction": 1 - tokens / max(padded, 1), "timed_steps": steps - self.skip}


# ------------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------------

def child_ours(spec: dict) -> dict:
    from skillstream.models.backbone import load_tokenizer
    from skillstream.plugins import Plugin
    from skillstream.run import train

    cfg = _recipe(spec)
    known = {tuple(t.input_ids) for t in _tokenized_train(cfg, load_tokenizer(cfg.model.name))}
    meter = _Meter(spec["skip"])
    foreign = [0]

    class Timer(Plugin):
        """Times steps skip+1..end and checks every sequence the engine trains on is one of ours."""
        name = "bench_timer"

        def before_stage(self, ctx):
            meter.t_begin = time.perf_counter()
            if meter.skip == 0:
                meter.t0 = meter.t_begin

        def loss_term(self, ctx, batch, outputs):
            mask = batch["attention_mask"]
            meter.add(mask)
            for row, m in zip(batch["input_ids"].tolist(), mask.tolist()):
                foreign[0] += tuple(r for r, k in zip(row, m) if k) not in known
            return None

        def after_step(self, ctx, metrics):
            if ctx.step == meter.skip:
                meter.t0 = time.perf_counter()

        def after_stage(self, ctx):
            meter.t1 = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        run = train(RECIPE, out=Path(tmp) / "run", overrides=_overrides(spec), show_progress=False, plugins=[Timer()])
    stage = run.results["stages"][0]
    out = meter.result(spec["steps"])
    out.update(training_mfu(spec, out["tokens_per_s"]))
    out.update(whole_loop_tokens_per_s=stage["tokens_per_s"], engine_tokens=stage["tokens"],
               engine_seconds=stage["seconds"], sequences_not_in_dataset=foreign[0], examples=len(known))
    return out


def child_trainer(spec: dict, grouped: bool) -> dict:
    import inspect

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from skillstream.model_setup import backbone_options
    from skillstream.models.backbone import load_backbone

    cfg = _recipe(spec)
    # the frozen weights in the dtype the engine loads them in (model.dtype): the same precision on both sides
    model, tok = load_backbone(cfg.model.name, seed=cfg.seed, dtype=backbone_options(cfg)["dtype"])
    items = _tokenized_train(cfg, tok)
    features = [{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels}
                for t in items]

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self): return len(features)
        def __getitem__(self, i): return features[i]

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    meter = _Meter(spec["skip"])
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    def collate(batch):
        out = collator(batch)
        meter.add(out["attention_mask"])
        return out

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter.t_begin = time.perf_counter()
            if meter.skip == 0:
                meter.t0 = meter.t_begin

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == meter.skip:
                meter.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            meter.t1 = time.perf_counter()

    t = cfg.train
    params = inspect.signature(TrainingArguments.__init__).parameters
    grouping = ({"train_sampling_strategy": "group_by_length" if grouped else "random"}
                if "train_sampling_strategy" in params else {"group_by_length": grouped})  # transformers < 5
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=t.steps, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=1,
            learning_rate=t.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
            warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
            max_grad_norm=t.max_grad_norm or 0.0, bf16=bool(spec["bf16"]), use_cpu=True, seed=cfg.seed,
            dataloader_num_workers=0, save_strategy="no", report_to=[], logging_steps=10 ** 6,
            disable_tqdm=True, **grouping)
        trainer = Trainer(model=model, args=args, train_dataset=ListDataset(), data_collator=collate,
                          processing_class=tok, callbacks=[Timer()])
        trainer.train()
    out = meter.result(t.steps)
    out.update(training_mfu(spec, out["tokens_per_s"]))
    whole = meter.batches[:t.steps]
    out.update(whole_loop_tokens_per_s=sum(b[0] for b in whole) / max(meter.t1 - meter.t_begin, 1e-9),
               examples=len(features), optim=args.optim if isinstance(args.optim, str) else args.optim.value)
    return out


def child_scoring(spec: dict) -> dict:
    import torch

    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples
    from skillstream.data.render import Renderer
    from skillstream.evaluation.option_scoring import score_options, score_options_naive
    from skillstream.models.backbone import load_backbone
    from skillstream.model_setup import attach_lora

    cfg = _recipe(spec)
    model, tok = load_backbone(cfg.model.name, seed=cfg.seed)
    model = attach_lora(model, cfg)  # what the evaluator scores during a run
    model.eval()
    renderer = Renderer(tok, cfg.data.max_length, None)
    examples = load_examples(SourceConfig(source=str(SST2), split="test", limit=spec["examples"]))
    # Exactly as evaluation/runner.py::_accuracy builds them.
    options = examples[0].options
    opt_ids = [tok(renderer.answer_text(examples[0], o), add_special_tokens=False)["input_ids"] for o in options]
    prompts = [tok(renderer.prompt_text(ex), add_special_tokens=True)["input_ids"] for ex in examples]
    bs, pad = spec["score_batch"], tok.pad_token_id

    def batched(ps):
        return torch.cat([score_options(model, ps[i:i + bs], opt_ids, pad) for i in range(0, len(ps), bs)])

    warm = prompts[:min(bs, len(prompts))]
    batched(warm), score_options_naive(model, warm[:2], opt_ids, pad)  # warm-up, not timed
    t0 = time.perf_counter()
    fast = batched(prompts)
    t1 = time.perf_counter()
    naive = score_options_naive(model, prompts, opt_ids, pad)
    t2 = time.perf_counter()
    agree = (fast.argmax(-1).cpu() == naive.argmax(-1).cpu()).float().mean().item()
    return {"examples": len(prompts), "options": len(options), "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
            "option_tokens": [len(o) for o in opt_ids], "batch": bs,
            "fast_seconds": t1 - t0, "naive_seconds": t2 - t1,
            "fast_examples_per_s": len(prompts) / (t1 - t0), "naive_examples_per_s": len(prompts) / (t2 - t1),
            "agreement": agree, "max_abs_diff": (fast.cpu() - naive.cpu()).abs().max().item()}


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 6) -> float:
    """This machine's dense matmul rate in FLOP/s (best of `repeats` n x n @ n x n products, after one
    untimed product), in this process: the denominator of model-FLOPs utilisation."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class LinearFlops:
    """Matmul FLOPs of every nn.Linear forward while attached (2 x in x out per row: the projections,
    MLP, LoRA factors and LM head, padding rows included; attention's score products are not counted)."""

    def __init__(self, model):
        import torch
        self.flops = 0
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def _hook(self, module, args, out):
        self.flops += 2 * module.in_features * module.out_features * (args[0].numel() // module.in_features)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def training_mfu(spec: dict, tokens_per_s: float) -> dict:
    """Model FLOPs of LoRA training per token: 4 x the backbone's Linear weights (2 forward, 2 for the
    gradient of the activations; the frozen weights get no gradient, LoRA's own are negligible), per
    second, over this process's matmul peak in the run's precision."""
    import torch

    from skillstream.models.backbone import load_backbone

    model, _ = load_backbone(spec["model"], seed=0)
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    peak = matmul_peak("bf16" if spec["bf16"] else "fp32")
    return {"flops_per_token": 4 * weights, "peak_flops_per_s": peak, "mfu": 4 * weights * tokens_per_s / peak}


RTE = SHARED / "data" / "glue_stream" / "rte"
# RTE with ten more answer options than its two: no shared task has >= 10 labels, and option scoring's
# cost grows with the options (the labels stay RTE's, so the distractors are never the answer)
DISTRACTORS = ["neutral", "paraphrase", "unrelated", "partial entailment", "opposite", "cause", "effect", "example",
               "generalization", "specialization"]


def eval_task(tmp: Path, n: int, model: str):
    """The stream's task as the adaptive_learner recipe reads it: rte12 (RTE's test rows, 12 options)."""
    from skillstream.config import load_recipe
    from skillstream.evaluation.suite import prepare_eval_tasks

    folder = tmp / "stream" / "rte12"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(json.loads((RTE / "labels.json").read_text()) + DISTRACTORS))
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text((RTE / f"{split}.json").read_text())
    (tmp / "stream" / "stream.yaml").write_text("tasks: [rte12]\ninstructions: {rte12: 'Does sentence 1 entail sentence 2?'}\n")
    cfg = load_recipe("adaptive_learner", overrides={"model": model, "data.stream": str(tmp / "stream"),
                                                     "data.stream_test_limit": n})
    return cfg, prepare_eval_tasks(cfg, cfg.resolved_stages()[0].data)[0]


def child_eval(spec: dict) -> dict:
    """Stream evaluation (generative exact match with option scoring beside it) with the skillstream
    found at spec["code"] (this checkout or a worktree of an older commit): outputs and examples/s."""
    sys.path.insert(0, spec["code"])
    import torch

    import skillstream
    from skillstream.data.render import Renderer
    from skillstream.evaluation.generation import generate_and_score
    from skillstream.models.backbone import load_backbone
    from skillstream.model_setup import attach_lora

    if spec["precision"] == "bf16":  # what a run with train.bf16 on declares (evaluation/precision.py reads it)
        from accelerate import Accelerator
        Accelerator(mixed_precision="bf16", cpu=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, task = eval_task(Path(tmp), spec["eval_examples"], spec["model"])
    model, tok = load_backbone(cfg.model.name, seed=cfg.seed)
    model = attach_lora(model, cfg)  # what the stream scores: the LoRA-wrapped backbone, in eval mode
    if spec.get("lora_b_std"):  # a trained adapter's B is not zero: A and B drawn from one seeded generator,
        g = torch.Generator().manual_seed(0)  # so both sides score the same adapter (PEFT's own init of A reads
        with torch.no_grad():                 # the global RNG, which the two code versions may leave apart)
            for name, p in sorted(model.named_parameters()):
                if ".lora_A." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
                elif ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * spec["lora_b_std"])
    model.eval()
    renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt)
    examples = task.examples
    prompts = [renderer.prompt_text(ex) for ex in examples]
    options = examples[0].options
    opt_ids = [tok(renderer.answer_text(examples[0], o), add_special_tokens=False)["input_ids"] for o in options]
    bs, new = cfg.data.eval_batch_size, task.max_new_tokens
    generate_and_score(model, tok, prompts[:bs], new, bs, options=opt_ids)  # warm-up, not timed
    flops = LinearFlops(model)
    profiling = spec.get("profile", False)
    if profiling:  # the timed pass only (not loading, not warm-up)
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
    t0 = time.perf_counter()
    # the inner loop of evaluate_examples(exact_match, also=[accuracy]) on one option group
    texts, scores = generate_and_score(model, tok, prompts, new, bs, options=opt_ids)
    seconds = time.perf_counter() - t0
    top_ops = []
    if profiling:
        prof.__exit__(None, None, None)
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        top_ops = [(e.key, e.count, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total) for e in events[:12]]
    flops.remove()
    peak = matmul_peak(spec["precision"])
    from skillstream.evaluation.runner import normalize_text
    em = sum(normalize_text(t) == normalize_text(ex.completion) for t, ex in zip(texts, examples)) / len(examples)
    acc = sum(options[b] == ex.completion for b, ex in zip(scores.argmax(-1).tolist(), examples)) / len(examples)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    return {"code": str(Path(skillstream.__file__).resolve().parents[1]), "precision": spec["precision"],
            "examples": len(examples), "options": len(options), "batch": bs, "max_new_tokens": new,
            "prompt_tokens_mean": sum(lengths) / len(lengths), "seconds": seconds,
            "examples_per_s": len(examples) / seconds, "flops": flops.flops, "flops_per_s": flops.flops / seconds,
            "peak_flops_per_s": peak, "mfu": flops.flops / seconds / peak, "exact_match": em, "accuracy": acc,
            "texts": texts, "scores": scores.float().tolist(), "weights_dtype": str(next(model.parameters()).dtype),
            "model": spec["model"], "top_ops": top_ops}


CHILDREN = {"ours": child_ours, "trainer": lambda s: child_trainer(s, grouped=False),
            "trainer_grouped": lambda s: child_trainer(s, grouped=True), "scoring": child_scoring,
            "eval": child_eval}


def child_main(kind: str, spec_json: str) -> None:
    import torch
    spec = json.loads(spec_json)
    out = CHILDREN[kind](spec)
    out.update(kind=kind, peak_rss_bytes=_peak_rss_bytes(), torch_threads=torch.get_num_threads())
    if kind in ("ours", "trainer", "trainer_grouped"):
        from skillstream.model_setup import backbone_options
        out["weights"] = str(backbone_options(_recipe(spec))["dtype"]).removeprefix("torch.")
    print(MARK + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------
# parent
# ------------------------------------------------------------------------------------------------

def run_child(kind: str, spec: dict) -> dict:
    return common.run_child(__file__, kind, spec, label=f"{kind:<16} bf16={spec['bf16']!s:<5}", bench="bench/throughput",
                            cwd=REPO)


def eval_report(evals: list[dict], base_rev: str, lora_b_std: float = 0.0) -> str:
    """Stream evaluation, each run against the run of the code before in the same precision (same
    examples), and its speed also against the code before in fp32."""
    fp32_before = next(e for e in evals if e["side"] == "before" and e["precision"] == "fp32")
    rows = ["| code | precision | examples/s | speed-up vs before, same precision | speed-up vs before fp32 | "
            "model GFLOP/s | matmul peak GFLOP/s | MFU | exact match | option accuracy | generated texts as before | "
            "option argmax as before | max abs logp diff |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for e in evals:
        base = next((b for b in evals if b["side"] == "before" and b["precision"] == e["precision"]), fp32_before)
        same_text = sum(a == b for a, b in zip(e["texts"], base["texts"]))
        arg = [max(range(len(r)), key=r.__getitem__) for r in e["scores"]]
        arg0 = [max(range(len(r)), key=r.__getitem__) for r in base["scores"]]
        same_arg = sum(a == b for a, b in zip(arg, arg0))
        diff = max(abs(x - y) for r, r0 in zip(e["scores"], base["scores"]) for x, y in zip(r, r0))
        name = f"before ({base_rev})" if e["side"] == "before" else "this commit"
        rows.append(f"| {name} | {e['precision']} | {e['examples_per_s']:.2f} | "
                    f"{e['examples_per_s'] / base['examples_per_s']:.2f}x | "
                    f"{e['examples_per_s'] / fp32_before['examples_per_s']:.2f}x | {e['flops_per_s'] / 1e9:.1f} | "
                    f"{e['peak_flops_per_s'] / 1e9:.0f} | {100 * e['mfu']:.1f}% | {e['exact_match']:.3f} | "
                    f"{e['accuracy']:.3f} | {same_text}/{e['examples']} | {same_arg}/{e['examples']} | {diff:.1e} |")
    e = evals[0]
    note = (f"Task rte12 (glue_stream/rte test rows with 10 distractor options added: {e['options']} options), first "
            f"{e['examples']} examples, mean prompt {e['prompt_tokens_mean']:.0f} tokens, adaptive_learner's system "
            f"prompt, eval batch {e['batch']}, max_new_tokens {e['max_new_tokens']} (the stream's); {e['model']}, fp32 weights "
            f"with " + (f"a LoRA (r 8, all-linear) whose B is drawn N(0, {lora_b_std}^2), seed 0, as a trained adapter's"
                        if lora_b_std else "an untrained LoRA (r 8, all-linear)") + ". Timed: `generate_and_score` over all examples (the inner loop "
            f"of `evaluate_examples(exact_match, also=[accuracy])`), after one untimed batch; model FLOPs = "
            f"nn.Linear matmul FLOPs counted by hooks in the timed pass; bf16 = inside an `Accelerator(mixed_precision="
            f"'bf16')`, as a run with train.bf16 on.")
    return "\n".join(rows) + "\n\n" + note + "\n"


def profile_report(prof: dict) -> str:
    lines = ["| operator | calls | self CPU s | share |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {c} | {t:.2f} | {100 * f:.1f}% |" for k, c, t, f in prof["top_ops"]]
    return (f"torch.profiler over the timed pass, this commit, {prof['model']}, {prof['precision']}, "
            f"{prof['examples']} examples of rte12 ({prof['seconds']:.1f} s):\n\n"
            + "\n".join(lines) + "\n")


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def build_report(args, runs: dict, scoring: dict, model: str) -> str:
    rows = ["| run | precision | timed steps | tokens | seconds | tokens/s | whole-loop tokens/s | pad % | peak GiB | MFU |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"ours": "skillstream engine", "trainer": "Trainer + PEFT (random sampler)",
             "trainer_grouped": "Trainer + PEFT (group_by_length)"}
    for (kind, prec), r in runs.items():
        rows.append(f"| {names[kind]} | {prec}, {r['weights']} weights | {r['timed_steps']} | {r['tokens']} | {r['seconds']:.2f} | "
                    f"{r['tokens_per_s']:.0f} | {r['whole_loop_tokens_per_s']:.0f} | {100 * r['pad_fraction']:.1f} | "
                    f"{r['peak_rss_bytes'] / GiB:.2f} | {100 * r['mfu']:.1f}% |")
    summary = ["| measurement | ours | baseline | ratio | target | status |", "|---|---:|---:|---:|---|---|"]
    for prec in dict.fromkeys(p for _, p in runs):
        ours = runs[("ours", prec)]
        for base, label, note in (("trainer", "Trainer (defaults)", ""), ("trainer_grouped", "Trainer group_by_length", " (stricter)")):
            b = runs[(base, prec)]
            ratio = ours["tokens_per_s"] / b["tokens_per_s"]
            summary.append(f"| train tokens/s, {prec}, vs {label}{note} | {ours['tokens_per_s']:.0f} | "
                           f"{b['tokens_per_s']:.0f} | {ratio:.2f}x | ≥ {TARGET_TRAIN}x | {verdict(ratio >= TARGET_TRAIN)} |")
        if prec == "bf16":  # the MFU target is for a machine with bf16 arithmetic
            summary.append(f"| train MFU, bf16 (model FLOPs/s over this machine's bf16 matmul peak) | "
                           f"{100 * ours['mfu']:.1f}% | | | ≥ {100 * TARGET_MFU:.0f}% | {verdict(ours['mfu'] >= TARGET_MFU)} |")
    s = scoring
    ratio = s["fast_examples_per_s"] / s["naive_examples_per_s"]
    summary.append(f"| option scoring examples/s, SST-2 ({s['examples']} ex., {s['options']} options, batch {s['batch']}) "
                   f"vs naive | {s['fast_examples_per_s']:.1f} | {s['naive_examples_per_s']:.1f} | {ratio:.2f}x | "
                   f"≥ {TARGET_SCORE}x | {verdict(ratio >= TARGET_SCORE)} |")
    summary.append(f"| option scoring argmax agreement with naive | {100 * s['agreement']:.1f}% | | | 100% | "
                   f"{verdict(s['agreement'] == 1.0)} (max abs logp diff {s['max_abs_diff']:.1e}) |")
    peak_ours = max(r["peak_rss_bytes"] for (k, _), r in runs.items() if k == "ours") / GiB
    peak_base = max(r["peak_rss_bytes"] for (k, _), r in runs.items() if k != "ours") / GiB
    scope = "" if model == "smollm2-135m" else f" (model {model}: the target is for smollm2-135m)"
    summary.append(f"| peak memory GiB (VmHWM), LoRA training, {model} | {peak_ours:.2f} | {peak_base:.2f} | "
                   f"{peak_ours / peak_base:.2f}x | ≤ {TARGET_PEAK_GIB} GiB{scope} | {verdict(peak_ours <= TARGET_PEAK_GIB)} |")
    first = runs[next(iter(runs))]
    notes = (f"model {model}, recipe {RECIPE} (nl2bash train, {first['examples']} examples), batch {args.batch_size}, "
             f"{args.steps} optimizer steps (first {args.skip} not timed), LR warmup {args.lr_warmup} + cosine to "
             f"min_lr_ratio on both, Trainer optim `{runs[('trainer', next(iter(runs))[1])]['optim']}`, "
             f"torch threads {first['torch_threads']}; option scoring on the LoRA-wrapped model, fp32, mean prompt "
             f"{s['prompt_tokens_mean']:.0f} tokens, option tokens {s['option_tokens']}.")
    return "\n".join(summary) + "\n\n" + "\n".join(rows) + "\n\n" + notes + "\n"


def record(report: str, command: str, quick: bool) -> None:
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text("# bench/throughput results\n\nAppend-only log written by `bench/throughput.py` "
                              "(see bench/README.md). Newest at the bottom.\n")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS_MD.open("a") as f:
        f.write(f"\n## {stamp}{' (quick: wiring check, not a measurement)' if quick else ''}\n\n"
                f"- command: `{command}`\n- machine: {common.machine()}\n- python {platform.python_version()}, "
                f"{_versions()}\n\n{report}")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version
    out = []
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def _fail(message: str) -> None:
    print(f"bench/throughput: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Training tokens/s of skillstream vs Trainer+PEFT, and option scoring vs naive.")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps and examples (wiring check, < 2 min); records nothing unless --record")
    ap.add_argument("--model", default=None, help="backbone (default smollm2-135m; tiny with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per training run (default 40; 4 with --quick)")
    ap.add_argument("--skip", type=int, default=None, help="first optimizer steps not timed, as warm-up (default 5; 1 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per batch (default 8; 4 with --quick)")
    ap.add_argument("--bf16", choices=["both", "on", "off"], default=None, help="precision(s) to run (default both; off with --quick)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="training: the frozen backbone's weights (model.dtype), on both sides (default auto, the "
                         "quickstart recipe's: bf16 in a bf16 run, float32 in a float32 one)")
    ap.add_argument("--examples", type=int, default=None, help="SST-2 test examples to score (default 200; 8 with --quick)")
    ap.add_argument("--score-batch", type=int, default=None, help="prompts per score_options call (default 16; 4 with --quick)")
    ap.add_argument("--phases", default=None, help="comma list: train (training vs Trainer, option scoring vs "
                    "naive, memory), eval (stream evaluation vs --base), profile (where stream evaluation's time goes); default "
                    "train, and eval with --base")
    ap.add_argument("--base", default=None, help="eval: a checkout (git worktree) of the code before, run side by side")
    ap.add_argument("--base-rev", default=None, help="eval: the commit --base holds, for the record (default: read from it)")
    ap.add_argument("--eval-examples", type=int, default=None, help="eval: rte12 test examples (default 200; 8 with --quick)")
    ap.add_argument("--lora-b-std", type=float, default=0.0, help="eval: draw the LoRA's B from N(0, std^2) (a trained "
                    "adapter; default 0: untrained, B = 0)")
    ap.add_argument("--profile-examples", type=int, default=None, help="profile: examples (default 32; 4 with --quick)")
    ap.add_argument("--record", action="store_true", help="with --quick: append to bench/RESULTS.md anyway")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child_main(*args._child)

    q = args.quick
    args.model = args.model or ("tiny" if q else "smollm2-135m")
    args.steps = args.steps or (4 if q else 40)
    args.skip = args.skip if args.skip is not None else (1 if q else 5)
    args.batch_size = args.batch_size or (4 if q else 8)
    args.bf16 = args.bf16 or ("off" if q else "both")
    args.examples = args.examples or (8 if q else 200)
    args.score_batch = args.score_batch or (4 if q else 16)
    args.train_limit = 64 if q else None  # quick: tokenize only the first 64 training examples
    args.phases = [p.strip() for p in (args.phases or ("train,eval" if args.base else "train")).split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in ("train", "eval", "profile")]
    if unknown:
        _fail(f"--phases: unknown phase {unknown[0]!r} (expected train, eval, profile)")
    args.eval_examples = args.eval_examples or (8 if q else 200)
    args.profile_examples = args.profile_examples or (4 if q else 32)
    if "eval" in args.phases and not args.base:
        _fail("--phases eval needs --base PATH: a git worktree of the commit before (git worktree add PATH REV)")
    if args.base and not (Path(args.base) / "skillstream").is_dir():
        _fail(f"--base {args.base}: no skillstream package there")
    if not SST2.is_dir():
        _fail(f"SST-2 task folder not found at {SST2} (expected ../shared next to the repository)")
    if args.steps <= args.skip:
        _fail(f"--steps ({args.steps}) must exceed --skip ({args.skip})")
    from skillstream.config import load_recipe
    args.lr_warmup = min(load_recipe(RECIPE).train.warmup_steps, args.steps // 2)

    precisions = {"both": [False, True], "on": [True], "off": [False]}[args.bf16]
    command = "python bench/throughput.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    print(f"bench/throughput: {args.model}, {args.steps} steps x batch {args.batch_size}, "
          f"precision {'/'.join('bf16' if p else 'fp32' for p in precisions)}", file=sys.stderr)
    base = {"model": args.model, "steps": args.steps, "skip": args.skip, "batch_size": args.batch_size,
            "lr_warmup": args.lr_warmup, "examples": args.examples, "score_batch": args.score_batch, "train_limit": args.train_limit,
            "dtype": args.dtype}
    parts = []
    if "train" in args.phases:
        parts.append(train_phase(args, base, precisions))
    if "eval" in args.phases:
        import subprocess
        rev = args.base_rev or subprocess.run(["git", "-C", args.base, "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip()
        spec = {**base, "bf16": False, "eval_examples": args.eval_examples, "lora_b_std": args.lora_b_std}
        sides = [("before", args.base, "fp32"), ("this", str(REPO), "fp32"),
                 ("before", args.base, "bf16"), ("this", str(REPO), "bf16")]
        evals = []
        for side, code, prec in sides:
            if prec == "bf16" and not _bf16_hardware():
                continue
            r = common.run_child(__file__, "eval", {**spec, "code": code, "precision": prec},
                                 label=f"eval {side:<6} {prec}", bench="bench/throughput", cwd=REPO)
            evals.append({**r, "side": side})
        parts.append("### Stream evaluation\n\n" + eval_report(evals, rev, args.lora_b_std))
    if "profile" in args.phases:
        prec = "bf16" if _bf16_hardware() else "fp32"
        prof = common.run_child(__file__, "eval", {**base, "bf16": False, "code": str(REPO), "precision": prec,
                                                   "eval_examples": args.profile_examples, "profile": True},
                                label=f"profile {prec}", bench="bench/throughput", cwd=REPO)
        parts.append("### Where stream evaluation's time goes\n\n" + profile_report(prof))
    report = "\n".join(parts)
    print(f"\n{command}\nmachine: {common.machine()}\n\n{report}")
    if (not q or args.record) and not args.no_record:
        record(report, command, q)
        print(f"appended to {RESULTS_MD.relative_to(REPO)}", file=sys.stderr)


def _bf16_hardware() -> bool:
    from skillstream.model_setup import bf16_enabled
    return bf16_enabled("auto", "cpu")


def train_phase(args, base: dict, precisions: list[bool]) -> str:
    runs = {}
    for bf16 in precisions:
        for kind in ("ours", "trainer", "trainer_grouped"):
            runs[(kind, "bf16" if bf16 else "fp32")] = run_child(kind, {**base, "bf16": bf16})
    if any(r.get("sequences_not_in_dataset") for r in runs.values()):
        sys.exit("bench/throughput: the engine trained on sequences that are not in the shared tokenized set")
    scoring = run_child("scoring", {**base, "bf16": False})
    return "### Training and option scoring\n\n" + build_report(args, runs, scoring, args.model)


if __name__ == "__main__":
    main()
