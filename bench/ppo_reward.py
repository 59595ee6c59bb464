"""bench/ppo_reward: did RL raise the verifier reward on held-out prompts? Paired, before vs after.

Each run named (a run directory, or `RUN_DIR@STEP` for one of its saved checkpoints) answers the
held-out prompts of the evaluation task of the PPO stage of the first run that has one (the NL2Bash
test split for `destruct`), rendered with that stage's system prompt (`--system-prompt ''` for
none). Per prompt, the reward is the sum of the verifier terms of the PPO stage's `rewards` (shaping
terms such as `repetition` are left out: they are not the task), scored on

* the greedy answer, and
* the mean over `--samples` answers sampled at the PPO stage's temperature (what PPO optimises).

Every later run is compared with the first (the "before", e.g. the SFT start) prompt by prompt: the
mean difference with a 95% paired-bootstrap interval and the prompts that got better / worse.

    python bench/ppo_reward.py runs/sft runs/ppo runs/ppo@64     # appends its table to bench/RESULTS.md
    python bench/ppo_reward.py --quick                              # tiny model, fresh adapters: wiring check
"""
from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)


def run_config(spec: str):
    """The recipe a run (or RUN_DIR@STEP) trained with, read from its config.yaml."""
    import yaml

    from skillstream.config import load_recipe

    path = Path(spec.partition("@")[0]) / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {path.parent}: not a run directory (no config.yaml)")
    return load_recipe(yaml.safe_load(path.read_text()))


def ppo_stage(cfg):
    stages = [st for st in cfg.resolved_stages() if st.objective.name == "ppo"]
    if not stages:
        raise SystemExit(f"error: recipe {cfg.name!r} has no ppo stage to take the prompts and rewards from")
    return stages[-1]


def objective_settings(objective) -> dict:
    """The PPO stage's rewards, temperature and max_new_tokens, with the objective's own defaults."""
    from skillstream.objectives.ppo import DEFAULT_REWARDS, PPOObjective

    given = objective.model_dump()
    defaults = {k: p.default for k, p in inspect.signature(PPOObjective.__init__).parameters.items()}
    out = {k: given.get(k, defaults[k]) for k in ("rewards", "temperature", "max_new_tokens")}
    out["rewards"] = out["rewards"] if out["rewards"] is not None else DEFAULT_REWARDS
    return out


def load_run(spec: str):
    """A TrainedModel for 'RUN_DIR' or 'RUN_DIR@STEP' (that step's checkpoint weights on the run's adapter)."""
    import skillstream
    from safetensors.torch import load_file

    from skillstream.checkpoint import list_checkpoints

    run, _, step = spec.partition("@")
    trained = skillstream.load(run)
    if step:
        stage = ppo_stage(trained.config).name
        saved = {(s["stage"], s["stage_state"]["step"]): p for p in list_checkpoints(Path(run) / "checkpoints")
                 for s in [json.loads((p / "state.json").read_text())["run_state"]]}
        found = [p for (name, at), p in saved.items() if name == stage and str(at) == step]
        if not found:
            raise SystemExit(f"error: {run}: no checkpoint of stage {stage!r} at step {step} "
                             f"(saved: {sorted(at for name, at in saved if name == stage)})")
        weights = load_file(str(found[-1] / "weights.safetensors"))
        params = dict(trained.model.named_parameters())
        lora = {k for k in params if "lora_" in k}
        hits = {k: v for k, v in weights.items() if k in params}
        if not lora <= set(hits):
            raise SystemExit(f"error: {found[-1]}: its weights do not cover the run's adapter "
                             f"({len(lora - set(hits))} LoRA tensors missing)")
        with torch.no_grad():
            for k, v in hits.items():
                params[k].copy_(v)
    return trained


def answers(trained, examples, renderer, max_new_tokens: int, batch_size: int, temperature: float, seed: int):
    from skillstream.evaluation.generation import generate

    torch.manual_seed(seed)  # every run samples from the same generator state
    return generate(trained.model, trained.tokenizer, [renderer.prompt_text(ex) for ex in examples], max_new_tokens,
                    batch_size, temperature=temperature)


def rewards(terms, tok, examples, texts, max_new_tokens: int) -> list[float]:
    from skillstream.objectives.rewards import Sample

    out = []
    for ex, text in zip(examples, texts):
        s = Sample(text, tok(text, add_special_tokens=False)["input_ids"], ex, max_new_tokens, True)
        out.append(sum(t.weight * t(s) for t in terms))
    return out


def paired(before: list[float], after: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of after - before with the 2.5% and 97.5% quantiles of its bootstrap over prompts."""
    diff = [a - b for a, b in zip(after, before)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diff) for _ in diff) / len(diff) for _ in range(draws))
    return sum(diff) / len(diff), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", help="the 'before' run, then one or more 'after' runs (RUN_DIR or RUN_DIR@STEP)")
    ap.add_argument("--samples", type=int, default=8, help="sampled answers per prompt")
    ap.add_argument("--system-prompt", default=None, help="default: the PPO stage's")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny model, two fresh smoke runs")
    args = ap.parse_args()
    from skillstream.data.render import Renderer
    from skillstream.evaluation.suite import prepare_eval_tasks
    from skillstream.objectives.rewards import parse_rewards

    t0 = time.time()
    if args.quick:
        import tempfile

        import skillstream
        tmp = Path(tempfile.mkdtemp(prefix="ppo_reward-"))
        for name in ("a", "b"):
            skillstream.train("destruct", out=tmp / name, overrides={"model": "tiny", "stage": "ppo", "report_to": []},
                              smoke=True, show_progress=False)
        args.runs, args.samples = [str(tmp / "a"), str(tmp / "b")], 2
    if len(args.runs) < 2:
        raise SystemExit("error: name a 'before' run and at least one 'after' run")
    cfg = next((c for c in map(run_config, args.runs) if any(st.objective.name == "ppo" for st in c.resolved_stages())),
               None)
    if cfg is None:
        raise SystemExit(f"error: none of {args.runs} has a ppo stage to take the prompts and rewards from")
    stage = ppo_stage(cfg)
    obj = objective_settings(stage.objective)
    verifiers = [t for t in parse_rewards(obj["rewards"]) if t.is_verifier]
    task = prepare_eval_tasks(cfg, stage.data)[0]
    system = stage.data.system_prompt if args.system_prompt is None else (args.system_prompt or None)
    rows, scores = [], {}
    for i, spec in enumerate(args.runs):
        trained = load_run(spec)
        renderer = Renderer(trained.tokenizer, stage.data.max_length, system)

        def score(temperature: float, seed: int) -> list[float]:
            texts = answers(trained, task.examples, renderer, obj["max_new_tokens"], args.batch_size, temperature, seed)
            return rewards(verifiers, trained.tokenizer, task.examples, texts, obj["max_new_tokens"])

        greedy = score(0.0, args.seed)
        per_sample = [score(obj["temperature"], args.seed + s) for s in range(args.samples)]
        sampled = [sum(col) / len(col) for col in zip(*per_sample)]
        scores[spec] = (greedy, sampled)
        cells = [f"{sum(greedy) / len(greedy):.4f}", f"{sum(sampled) / len(sampled):.4f}"]
        if i:
            for base, now in zip(scores[args.runs[0]], (greedy, sampled)):
                m, lo, hi = paired(base, now, seed=args.seed)
                better = sum(a > b for a, b in zip(now, base))
                worse = sum(a < b for a, b in zip(now, base))
                cells.append(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}] ({better}/{worse})")
        else:
            cells += ["", ""]
        rows.append(f"| `{spec}` | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
        del trained
    names = " + ".join(t.name for t in verifiers)
    cmd = "python bench/ppo_reward.py " + " ".join(sys.argv[1:])
    text = (f"## {date.today()} ppo_reward ({cfg.name}, {cfg.model.name})\n\n`{cmd}` on "
            f"{common.machine()}, {time.time() - t0:.0f} s. {len(task.examples)} held-out prompts "
            f"(eval task {task.name!r}), system prompt {system!r}; reward = {names}; greedy, and the mean of "
            f"{args.samples} answers sampled at temperature {obj['temperature']}, {obj['max_new_tokens']} new tokens. "
            f"Differences against the first run, prompt by prompt: mean [95% paired bootstrap] (prompts "
            f"better/worse).\n\n| run | greedy | sampled | greedy diff | sampled diff |\n|---|---:|---:|---|---|\n"
            + "\n".join(rows) + "\n")
    common.record(text, append=not args.quick)


if __name__ == "__main__":
    main()
