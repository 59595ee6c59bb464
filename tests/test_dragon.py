"""Dragon Hatching: the byte tokenizer and BDH causal-LM wrapper, the curriculum's tasks and
metrics, the monitor's alerts, best/final checkpoints, and a spiking BDH that learns."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from skillstream.config import SourceConfig
from skillstream.data.batching import collate
from skillstream.data.examples import load_examples
from skillstream.data.render import Renderer
from skillstream.models.bdh_lm import build_bdh, build_spiking_bdh
from skillstream.models.byte_tokenizer import EOS_ID, PAD_ID, ByteTokenizer
from skillstream.monitor.alerts import Monitor
from skillstream.plugins import StepContext

TINY = dict(n_layer=2, n_embd=32, n_head=4, mlp_internal_dim_multiplier=8, dropout=0.0)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """These models are tiny: on a shared 2-core machine one thread is several times faster than two
    (measured: a spiking BDH training step 3.3 s vs 12 s under load), so use one, and restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the CLI subprocess
    yield
    torch.set_num_threads(n)


# -- tokenizer and model wrapper -------------------------------------------------------------------
def test_byte_tokenizer_round_trips_utf8_pads_and_never_trains_on_padding():
    tok = ByteTokenizer()
    text = "naïve café ✓ `ls -la`"
    assert tok.decode(tok(text)["input_ids"]) == text and len(tok) == 256
    tok.padding_side = "left"
    enc = tok(["ab", "abcd"], return_tensors="pt", padding=True)
    assert enc["input_ids"].tolist() == [[PAD_ID, PAD_ID, 97, 98], [97, 98, 99, 100]]
    assert enc["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert tok.batch_decode(torch.tensor([[97, EOS_ID, PAD_ID]]), skip_special_tokens=True) == ["a"]
    # rendered examples: the answer ends with EOS, the prompt and padding carry label -100
    r = Renderer(tok, 256)
    ex = load_examples(SourceConfig(source="arithmetic", split="test", limit=2))
    items = [r.tokenize(e) for e in ex]
    batch = collate(items, tok.pad_token_id)
    for i, it in enumerate(items):
        learned = [t for t, l in zip(it.input_ids, it.labels) if l != -100]
        assert tok.decode(learned).startswith(ex[i].completion + tok.eos_token)
        assert (batch["labels"][i, len(it.input_ids):] == -100).all()


def test_padding_never_enters_the_loss_and_generation_ignores_left_padding():
    model, tok = build_spiking_bdh(seed=3, **TINY)
    model.eval()
    ids = torch.tensor([list(b"hello world, hello bytes")])
    base = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    padded = torch.cat([ids, torch.full((1, 7), 65)], 1)  # garbage after the text, masked out
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 7, dtype=torch.long)], 1)
    labels = padded.masked_fill(mask == 0, -100)
    other = model(input_ids=padded, attention_mask=mask, labels=labels)
    assert torch.allclose(base.loss, other.loss, atol=1e-6)
    # batched, left-padded generation on the carried state == each prompt alone == re-reading
    prompts = ["user: hi\nassistant: ", "x", "The assert statement"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    batched = model.generate(**enc, max_new_tokens=12)[:, enc["input_ids"].shape[1]:]
    reread = model.generate(**enc, max_new_tokens=12, use_state=False)[:, enc["input_ids"].shape[1]:]
    assert torch.equal(batched, reread)
    for i, p in enumerate(prompts):
        alone = model.generate(**tok([p], return_tensors="pt"), max_new_tokens=12)[0, len(p.encode()):]
        n = alone.numel()
        assert torch.equal(alone, batched[i, :n]) and (batched[i, n:] == PAD_ID).all()


def test_generation_stops_a_row_at_eos_and_pads_after_it():
    model, _ = build_bdh(seed=0, **TINY)
    prompts = torch.tensor([[97, 98, 99], [120, 121, 122]])
    free = model.generate(prompts, max_new_tokens=10, eos_token_id=-1)[:, 3:]  # no EOS: 10 bytes each
    assert free.shape == (2, 10)
    eos = int(free[0, 2])  # pretend row 0's third byte is EOS
    out = model.generate(prompts, max_new_tokens=10, eos_token_id=eos)[:, 3:]
    first = next(i for i, t in enumerate(free[0].tolist()) if t == eos)
    assert out[0, :first + 1].tolist() == free[0, :first + 1].tolist() and (out[0, first + 1:] == PAD_ID).all()
    hit = [i for i, t in enumerate(free[1].tolist()) if t == eos]
    n = hit[0] + 1 if hit else 10
    assert out[1, :n].tolist() == free[1, :n].tolist()


# -- tasks and metrics ------------------------------------------------------------------------------
def test_task_splits_are_fixed_and_disjoint():
    for source in ("pydoc_text", "arithmetic"):
        splits = {s: [e.text or e.prompt for e in load_examples(SourceConfig(source=source, split=s))]
                  for s in ("train", "validation", "test")}
        assert splits["test"] == [e.text or e.prompt for e in load_examples(SourceConfig(source=source, split="test"))]
        for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
            assert not set(splits[a]) & set(splits[b]), (source, a, b)
    calls = {s: {e.meta["id"] for e in load_examples(SourceConfig(source="bfcl_calls", split=s))} for s in ("train", "test")}
    assert calls["train"] and calls["test"] and not calls["train"] & calls["test"]


def test_arithmetic_worked_steps_are_correct_and_the_answer_is_verifiable():
    from skillstream.evaluation.task_metrics import final_answer, score_final_answers
    exs = load_examples(SourceConfig(source="arithmetic", split="train", limit=300))
    for ex in exs:
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (-?\d+)\.", ex.completion):
            assert eval(f"{a} {op} {b}") == int(c), ex.completion  # noqa: S307 (digits and one operator)
        assert final_answer(ex.completion) == ex.references[0]
    outs = [ex.completion for ex in exs[:10]]
    assert score_final_answers(outs, exs[:10])["exact_match"] == 1.0
    wrong = [re.sub(r"Answer: (-?\d+)", lambda m: f"Answer: {int(m.group(1)) + 1}", o) for o in outs]
    assert score_final_answers(wrong, exs[:10])["exact_match"] == 0.0


@pytest.mark.parametrize("source", ["bfcl_calls", "bfcl_tools"])
def test_function_call_targets_pass_the_bfcl_ast_checker_and_broken_ones_fail(source):
    from skillstream.evaluation.task_metrics import score_function_calls
    exs = load_examples(SourceConfig(source=source, split="test"))
    gold = score_function_calls([e.completion for e in exs], exs)
    # one live_simple answer key allows no value for a required parameter; every other target passes
    assert gold["ast_accuracy"] >= 0.99 and gold["function_format"] == 1.0 and gold["argument_accuracy"] >= 0.99
    broken = [e.completion.replace('"arguments": {', '"arguments": {"zz_unknown": 1, ', 1) for e in exs]
    bad = score_function_calls(broken, exs)
    assert bad["ast_accuracy"] == 0.0 and bad["function_format"] >= 0.99  # "{}" + ", " is not JSON
    prose = score_function_calls(["I would call a function."] * len(exs), exs)
    assert prose["function_format"] == 0.0 and prose["ast_accuracy"] == 0.0
    short = load_examples(SourceConfig(source=f"{source}:420", split="test"))
    assert 0 < len(short) < len(exs) and all(len(e.prompt) + len(e.completion) <= 420 for e in short)


def test_bash_format_and_command_validity():
    from skillstream.evaluation.bash import extract_command
    from skillstream.evaluation.task_metrics import bash_extras
    exs = load_examples(SourceConfig(source="nl2bash_fenced", split="test"))
    outs = [e.completion for e in exs]
    gold = bash_extras(outs, [extract_command(o) for o in outs])
    assert gold["bash_format"] == 1.0 and gold["command_validity"] >= 0.95
    junk = ["find . -name 'x", "flurbl --all", "ls |"]
    assert bash_extras(junk, junk) == {"bash_format": 0.0, "command_validity": 0.0}


# -- monitor ----------------------------------------------------------------------------------------
class _Log:
    def __init__(self):
        self.alerts = []


def _ctx(log: _Log) -> StepContext:
    return StepContext(model=None, stage="s", stage_index=0, step=1, total_steps=10,
                       alert=lambda sev, kind, msg: log.alerts.append((sev, kind)))


def test_each_alert_fires_on_its_case_and_a_healthy_step_raises_none():
    cases = {
        "nan_loss": dict(loss=float("nan")), "nan_grad": dict(grad_norm=float("inf")),
        "loss_high": dict(loss=12.0), "grad_explosion": dict(grad_norm=150.0),
        "dead_layer": dict(rates=[0.1, 0.0, 0.12]), "saturation": dict(rates=[0.1, 0.7]),
    }
    severity = {"nan_loss": "critical", "nan_grad": "critical", "loss_high": "critical", "dead_layer": "critical",
                "grad_explosion": "warning", "saturation": "warning"}
    for kind, case in cases.items():
        log, mon = _Log(), Monitor()
        for _ in range(10):  # a healthy history first: nothing raised
            mon.check(_ctx(log), 3.0, 1.0, [0.1, 0.09, 0.11])
        assert log.alerts == []
        args = {"loss": 3.0, "grad_norm": 1.0, "rates": [0.1, 0.1, 0.1], **case}
        mon.check(_ctx(log), args["loss"], args["grad_norm"], args["rates"])
        also = [("warning", "loss_spike")] if kind == "loss_high" else []  # 12 is 4x the recent 3.0 too
        assert log.alerts == [(severity[kind], kind)] + also, kind
    log, mon = _Log(), Monitor(spike_factor=2.0)  # a spike relative to the recent losses
    for _ in range(10):
        mon.check(_ctx(log), 2.0, 1.0, None)
    mon.check(_ctx(log), 4.5, 1.0, None)
    assert log.alerts == [("warning", "loss_spike")]
    log, mon = _Log(), Monitor(plateau_window=5)  # flat loss for two windows: plateau
    for _ in range(10):
        mon.check(_ctx(log), 2.0, 1.0, None)
    assert log.alerts == [("warning", "loss_plateau")]
    log, mon = _Log(), Monitor(plateau_window=5)
    for i in range(10):
        mon.check(_ctx(log), 3.0 - 0.1 * i, 1.0, None)
    assert log.alerts == []
    # an exactly-zero rate is critical even though a rate of 0.001 is merely low (not an alert)
    log, mon = _Log(), Monitor()
    mon.check(_ctx(log), 3.0, 1.0, [0.001, 0.001])
    assert log.alerts == []


def _recipe(model_args: dict, steps: int, stop: bool = False, **train) -> dict:
    text = {"source": "pydoc_text", "limit": 160}
    return {
        "name": "dragon_test", "seed": 0, "lora": None, "report_to": [],
        "model": {"name": "bdh-spiking", "freeze_backbone": False, "args": {**TINY, **model_args}},
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "schedule": "constant", "warmup_steps": 5,
                  "bf16": False, "log_every": 1, "checkpoint_every": 10, **train},
        "plugins": [{"name": "monitor", "on_critical": "stop" if stop else "continue", "rate_weight": 1.0},
                    {"name": "best_final", "every": 10,
                     "sources": [{"name": "text_val", "source": "pydoc_text", "split": "validation", "limit": 16}]}],
        "data": {"max_length": 128, "train": [text],
                 "eval": [{"name": "text", "source": "pydoc_text", "split": "test", "metric": "perplexity", "limit": 16}]},
    }


def _alerts(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "alerts.jsonl").read_text().splitlines()]


def test_a_dead_network_raises_the_dead_layer_alert_and_stops_the_run(tmp_path):
    from skillstream.errors import UserError
    from skillstream.run import train
    # the public fork's situation: the threshold far above any input current, no neuron ever fires
    with pytest.raises(UserError, match="critical alert"):
        train(_recipe({"threshold": 100.0}, steps=4, stop=True), out=tmp_path / "dead", show_progress=False)
    alerts = _alerts(tmp_path / "dead")
    assert [(a["severity"], a["kind"], a["step"]) for a in alerts] == [("critical", "dead_layer", 1)]
    assert "layer(s) [0, 1]" in alerts[0]["message"]


def test_spiking_bdh_learns_from_real_text_with_no_alert_and_best_final_checkpoints(tmp_path):
    from safetensors.torch import load_file

    from skillstream.models.bdh import BDH  # noqa: F401  (the wrapped model)
    from skillstream.run import train
    run = train(_recipe({}, steps=60), out=tmp_path / "live", show_progress=False)
    d = run.run_dir
    assert _alerts(d) == []
    metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    rates = [[m[f"firing_rate/{i}"] for i in range(2)] for m in metrics]
    assert all(0.0 < r < 0.5 for row in rates for r in row)
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert first > 5.0 and last < first - 2.0  # from ~uniform over 256 bytes (5.55 nats)
    # held-out English: below the cross-entropy of a unigram byte model fit on the same training text
    from collections import Counter
    train_text = "".join(e.text + "\x04" for e in load_examples(SourceConfig(source="pydoc_text", limit=160))).encode()
    test_text = "".join(e.text + "\x04" for e in load_examples(SourceConfig(source="pydoc_text", split="test", limit=16))).encode()
    counts = Counter(train_text)
    unigram = -sum(math.log((counts[b] + 1) / (len(train_text) + 256)) for b in test_text) / len(test_text)
    ppl0, ppl1 = run.results["initial"][0], run.results["matrix"][-1][0]
    assert math.log(ppl0) > 5.4 and math.log(ppl1) < unigram - 0.15, (math.log(ppl1), unigram)
    val = [json.loads(x) for x in (d / "validation.jsonl").read_text().splitlines()]
    best = json.loads((d / "checkpoints" / "best" / "best.json").read_text())
    assert best["val/loss"] == min(v["val/loss"] for v in val) < val[0]["val/loss"] + 1e-9
    for which in ("best", "final"):
        w = load_file(str(d / "checkpoints" / which / "model.safetensors"))
        assert "bdh.encoder" in w
    assert list((d / "checkpoints").glob("ckpt-*"))
    final = load_file(str(d / "checkpoints" / "final" / "model.safetensors"))
    saved = load_file(str(d / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], saved[k]) for k in saved)
