"""Generative replay: the model writes pseudo-examples of past tasks, kept when it labels them consistently.

When stage k > 0 begins, for every classification task trained in an earlier stage (its instruction
and options, read from that stage's training source; never its stored examples), the current model
samples `per_task` new inputs from a prompt made of the instruction and the options alone (the
i-th sample is asked for an input whose answer is option i mod n, to spread the classes; the
request is worded unlike the task prompt and the reply begun with "Example text:", since a model
trained on the task answers its own prompt format with a bare label). Each
input is then labelled twice by the same model, with the task's own evaluation prompt:

- option scoring: the option with the highest log-likelihood (`score_options`);
- greedy generation: the model's free answer, if it equals an option after normalisation.

Only inputs on which both labels agree are kept (empty inputs, inputs that merely repeat an
option, and duplicates within a task are dropped first); they are tokenized with the stage's
objective like real data. During the stage a seeded share `alpha` of every micro-batch is
replaced by kept pseudo-examples (as `replay` does with stored ones).

Sampling is seeded from (seed, stage, task) inside a forked RNG, so the run's own RNG streams are
untouched; batch draws depend on (seed, stage, draw count, process). The pool (token ids), the
draw counter and the per-task counts are plugin state, saved in checkpoints: a run resumed inside
a stage reuses the pool instead of generating again with the partly trained model.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.examples import Example, is_task_folder, load_examples
from ..data.render import Tokenized
from ..errors import UserError
from ..evaluation.generation import generate
from ..evaluation.option_scoring import score_options
from ..evaluation.runner import normalize_text
from ..models.modes import eval_mode
from ..plugins import Plugin, StepContext

PREFIX = "generative_replay"


def past_tasks(recipe, stage_index: int) -> list[dict]:
    """[{'task', 'instruction', 'options'}] of the classification sources of stages before `stage_index`."""
    from ..data.builtin import builtin_source

    out = []
    for si, (name, data, _, _) in enumerate(recipe.resolved_stages()[:stage_index]):
        cls = [s for s in data.train if not s.build and not builtin_source(s.source)
               and (is_task_folder(Path(s.source)) or s.format == "classification")]
        for j, src in enumerate(cls):
            first = load_examples(src)[0]  # instruction and options only; the rows themselves are not used
            out.append({"task": name if len(cls) == 1 else f"{name}/{j}", "instruction": first.instruction,
                        "options": list(first.options)})
    return out


def clean_input(text: str) -> str:
    """The first non-empty line of a sample, without surrounding spaces and quotes."""
    for line in text.splitlines():
        line = line.strip().strip("\"'").strip()
        if line:
            return line
    return ""


def _seed(*parts) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


class GenerativeReplay(Plugin):
    name = PREFIX

    def __init__(self, per_task: int = 32, alpha: float = 0.2, temperature: float = 1.0, max_new_tokens: int = 48,
                 top_p: float = 1.0, label_max_new_tokens: int | None = None, batch_size: int | None = None,
                 hint: bool = True, seed: int = 0, **context):
        if not 0 <= alpha < 1:
            raise UserError(f"generative_replay.alpha {alpha}: expected a share in [0, 1)")
        self.recipe, self.tok, self.renderer = context.get("recipe"), context.get("tokenizer"), context.get("renderer")
        batch_size = batch_size or (self.recipe.data.eval_batch_size if self.recipe is not None else 8)
        if per_task < 0 or max_new_tokens < 1 or batch_size < 1 or temperature < 0:
            raise UserError("generative_replay: per_task >= 0, max_new_tokens >= 1, batch_size >= 1 and "
                            f"temperature >= 0 expected (got {per_task}, {max_new_tokens}, {batch_size}, {temperature})")
        self.per_task, self.alpha, self.temperature, self.top_p = per_task, alpha, temperature, top_p
        self.max_new_tokens, self.label_max_new_tokens, self.batch_size, self.hint = \
            max_new_tokens, label_max_new_tokens, batch_size, hint
        self.seed = self.recipe.seed if self.recipe is not None else seed
        self.stage_index = -1                       # the stage the pool was generated for
        self.items: list[tuple[str, Tokenized]] = []  # (task, pseudo-example)
        self.candidates: list[dict] = []            # this stage's labelled inputs: text, both labels, kept
        self.stats: dict[str, dict[str, dict]] = {}  # stage -> task -> counts
        self.draws = 0

    # -- generation and the consistency filter ------------------------------------------------
    def generation_prompt(self, instruction: str, options: list[str], hint: str | None) -> str:
        """Phrased unlike the task's own prompt, with the answer begun: a model trained on the task
        answers its prompt format with a label, which would echo an option instead of writing an input."""
        user = f"Write one short example text for this task: \"{instruction}\" (possible answers: {', '.join(options)})."
        user += f" The correct answer for your text should be {hint}." if hint else ""
        return self.renderer.chat([{"role": "user", "content": user}], add_generation_prompt=True) + "Example text:"

    def sample_inputs(self, model, task: dict, seed: int) -> list[str]:
        """`per_task` seeded samples of new inputs for one task (texts as the model wrote them)."""
        opts = task["options"]
        prompts = [self.generation_prompt(task["instruction"], opts, opts[i % len(opts)] if self.hint else None)
                   for i in range(self.per_task)]
        dev = model.device
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            return generate(model, self.tok, prompts, self.max_new_tokens, self.batch_size,
                            temperature=self.temperature, top_p=self.top_p)

    def _example(self, task: dict, text: str, label: str = "") -> Example:
        return Example("classification", prompt=text, completion=label, options=task["options"], references=[label],
                       instruction=task["instruction"], where=f"{PREFIX}:{task['task']}")

    def label_by_scoring(self, model, task: dict, texts: list[str]) -> list[str]:
        """The option with the highest log-likelihood after the task's evaluation prompt."""
        exs = [self._example(task, t) for t in texts]
        if not exs:
            return []
        opt_ids = [self.tok(self.renderer.answer_text(exs[0], o), add_special_tokens=False)["input_ids"]
                   for o in task["options"]]
        out = []
        for i in range(0, len(exs), self.batch_size):
            prompts = [self.tok(self.renderer.prompt_text(ex), add_special_tokens=True)["input_ids"]
                       for ex in exs[i:i + self.batch_size]]
            best = score_options(model, prompts, opt_ids, self.tok.pad_token_id).argmax(-1)
            out += [task["options"][b] for b in best.tolist()]
        return out

    def label_by_generation(self, model, task: dict, texts: list[str]) -> list[str | None]:
        """The greedy answer if it equals an option after normalisation (the exact-match protocol), else None."""
        if not texts:
            return []
        budget = self.label_max_new_tokens or max(
            8, 2 + max(len(self.tok(o, add_special_tokens=False)["input_ids"]) for o in task["options"]))
        outs = generate(model, self.tok, [self.renderer.prompt_text(self._example(task, t)) for t in texts],
                        budget, self.batch_size)
        by_norm = {normalize_text(o): o for o in task["options"]}
        return [by_norm.get(normalize_text(o)) for o in outs]

    def pseudo_examples(self, model, task: dict, seed: int) -> tuple[list[Example], dict, list[dict]]:
        """(kept examples, counts, candidates) for one task: sample, drop empty/echo/duplicate inputs,
        label the rest twice and keep those whose labels agree."""
        raw = self.sample_inputs(model, task, seed)
        counts = {"generated": len(raw), "empty": 0, "echo": 0, "duplicate": 0}
        options = {normalize_text(o) for o in task["options"]}
        texts, seen = [], set()
        for r in raw:
            t = clean_input(r)
            key = normalize_text(t)
            if not key:
                counts["empty"] += 1
            elif key in options:
                counts["echo"] += 1
            elif key in seen:
                counts["duplicate"] += 1
            else:
                seen.add(key)
                texts.append(t)
        scored = self.label_by_scoring(model, task, texts)
        written = self.label_by_generation(model, task, texts)
        kept = [self._example(task, t, s) for t, s, w in zip(texts, scored, written) if w is not None and s == w]
        candidates = [{"task": task["task"], "input": t, "scored": s, "written": w, "kept": w is not None and s == w}
                      for t, s, w in zip(texts, scored, written)]
        counts.update(labelled=len(texts), answered=sum(w is not None for w in written), kept=len(kept),
                      agreement=round(len(kept) / len(texts), 4) if texts else None,
                      classes={o: sum(ex.completion == o for ex in kept) for o in task["options"]})
        return kept, counts, candidates

    def generate_pool(self, model, tasks: list[dict], stage_index: int, objective) -> tuple[list, list, dict]:
        items, candidates, stats = [], [], {}
        with eval_mode(model):
            for ti, task in enumerate(tasks):
                kept, counts, labelled = self.pseudo_examples(model, task, _seed(self.seed, PREFIX, stage_index, ti))
                stats[task["task"]] = counts
                candidates += labelled
                items += [(task["task"], objective.tokenize(ex, self.renderer)) for ex in kept]
        return items, candidates, stats

    # -- hooks -------------------------------------------------------------------------------
    def before_stage(self, ctx: StepContext) -> None:
        if ctx.stage_index == self.stage_index:  # resumed inside this stage: the checkpoint holds its pool
            return
        self.stage_index, self.draws, self.items, self.candidates = ctx.stage_index, 0, [], []
        if ctx.stage_index == 0 or self.per_task == 0 or self.alpha == 0:
            return
        if self.recipe is None or self.tok is None or self.renderer is None:
            raise UserError("generative_replay needs the run's recipe, tokenizer and renderer (name it in the recipe's "
                            "plugins, or pass recipe=, tokenizer=, renderer=)")
        tasks = past_tasks(self.recipe, ctx.stage_index)
        if not tasks:
            return
        acc = ctx.accelerator
        model = acc.unwrap_model(ctx.model) if acc is not None else getattr(ctx.model, "module", ctx.model)
        objective = ctx.objective
        if acc is not None and acc.num_processes > 1:  # written once, by the main process, and shared
            from accelerate.utils import broadcast_object_list
            payload = [self.generate_pool(model, tasks, ctx.stage_index, objective) if acc.is_main_process else None]
            broadcast_object_list(payload)
            self.items, self.candidates, stats = payload[0]
        else:
            self.items, self.candidates, stats = self.generate_pool(model, tasks, ctx.stage_index, objective)
        self.stats[ctx.stage] = stats
        if acc is None or acc.is_main_process:
            shown = "; ".join(f"{t} {c['kept']}/{c['generated']} kept (agreement "
                              f"{'-' if c['agreement'] is None else format(c['agreement'], '.2f')})"
                              for t, c in stats.items())
            print(f"stage {ctx.stage!r}: generative replay: {shown}", flush=True)

    def transform_items(self, ctx: StepContext, items: list) -> list:
        k = round(self.alpha * len(items))
        if not self.items or k == 0:
            return items
        rank = ctx.accelerator.process_index if ctx is not None and ctx.accelerator is not None else 0
        rng = random.Random(f"{self.seed}:{PREFIX}:{self.stage_index}:{self.draws}:{rank}")
        self.draws += 1
        pool = [item for _, item in self.items]
        picks = rng.sample(pool, k) if len(pool) >= k else [rng.choice(pool) for _ in range(k)]
        return items[: len(items) - k] + picks

    def after_step(self, ctx, metrics):
        stats = self.stats.get(ctx.stage, {})
        labelled = sum(c["labelled"] for c in stats.values())
        out = {f"{PREFIX}/pool": len(self.items)}
        if stats:
            out[f"{PREFIX}/generated"] = sum(c["generated"] for c in stats.values())
            out[f"{PREFIX}/agreement"] = len(self.items) / labelled if labelled else 0.0
        return out

    def state_dict(self) -> dict:
        return {"stage_index": self.stage_index, "draws": self.draws, "stats": self.stats,
                "candidates": self.candidates,
                "items": [{"task": t, **asdict(item)} for t, item in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.stage_index, self.draws = state.get("stage_index", -1), state.get("draws", 0)
        self.stats, self.candidates = state.get("stats", {}), state.get("candidates", [])
        self.items = [(d.pop("task"), Tokenized(**d)) for d in (dict(x) for x in state.get("items", []))]
