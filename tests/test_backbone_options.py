"""Backbone options: model.dtype, model.attn_implementation, model.quantization and
train.gradient_checkpointing — what each does to a tiny run, and the one line a value this machine
or this model cannot honour stops with."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers.utils import is_flash_attn_2_available

import skillstream
from conftest import run_cli
from skillstream.config import load_recipe
from skillstream.errors import UserError
from skillstream.model_setup import backbone_options, bf16_enabled
from skillstream.models.backbone import load_backbone
from skillstream.plugins import Plugin

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

# a short tiny run: 6 steps, no checkpoint but the stage's last, 2 evaluation examples
SHORT = {"report_to": [], "train.steps": 6, "train.batch_size": 2, "train.log_every": 1, "train.checkpoint_every": 100,
         "data.train.0.limit": 12, "data.eval.0.limit": 2, "data.eval.0.max_new_tokens": 4}
PROBE = torch.tensor([[1, 20, 300, 4000, 7, 8, 9, 10]])


def tiny(**model_keys) -> dict:
    return {"model": {"name": "tiny", **model_keys}}


class Probe(Plugin):
    """Looks at the model as the run trains it: whether checkpointing is on, how often the first decoder
    layer's attention starts per micro-batch (twice when the layer's activations are recomputed; a
    pre-hook, since the recomputation stops once it has what the backward pass needs), and the logits
    on PROBE at the end of the stage (what the saved adapters must reproduce)."""
    name = "probe"

    def __init__(self):
        self.checkpointing, self.layer_calls, self.logits, self._hook = None, 0, None, None

    def before_stage(self, ctx):
        self.checkpointing = ctx.model.is_activation_checkpointing
        attention = ctx.model.get_base_model().model.layers[0].self_attn
        self._hook = attention.register_forward_pre_hook(lambda *a: setattr(self, "layer_calls", self.layer_calls + 1))

    def after_stage(self, ctx):
        self._hook.remove()
        was_training = ctx.model.training
        ctx.model.eval()
        with torch.no_grad():
            self.logits = ctx.model(input_ids=PROBE).logits.float()
        ctx.model.train(was_training)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- model.dtype ------------------------------------------------------------------------------------

def test_float32_stays_the_default_and_auto_follows_the_runs_precision():
    assert load_recipe({"name": "mine", "data": {"train": [{"source": "nl2bash"}]}}).model.dtype == "float32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16_here = torch.bfloat16 if bf16_enabled("auto", device) else torch.float32
    auto = backbone_options(load_recipe("quickstart", tiny(dtype="auto")))["dtype"]
    assert auto == bf16_here
    # every bundled recipe on a pretrained backbone loads its frozen weights with auto
    for recipe in ("quickstart", "dylora_moe", "adaptive_learner", "muse", "destruct"):
        assert backbone_options(load_recipe(recipe))["dtype"] == bf16_here, recipe
    # train.bf16: false keeps the whole run float32, the weights included
    assert backbone_options(load_recipe("quickstart", {"train.bf16": False}))["dtype"] == torch.float32
    # weights that train (lora: null) and models built by our own code (BDH) stay float32 under auto
    full = load_recipe("quickstart", {"model": {"name": "tiny", "dtype": "auto", "freeze_backbone": False}, "lora": None})
    assert backbone_options(full)["dtype"] == torch.float32
    assert backbone_options(load_recipe("quickstart", {"model": {"name": "bdh", "dtype": "auto"}}))["dtype"] == torch.float32


def test_a_bf16_backbone_trains_float32_adapters_that_load_back_into_a_bf16_backbone(tmp_path):
    probe = Probe()
    run = skillstream.train("quickstart", out=tmp_path / "run", show_progress=False, plugins=[probe],
                            overrides={**SHORT, **tiny(dtype="bfloat16")})
    assert all(torch.isfinite(torch.tensor(losses(run.run_dir))))
    saved = run.run_dir / "experts" / "default"
    assert {t.dtype for t in load_file(str(saved / "adapter_model.safetensors")).values()} == {torch.float32}

    # the PEFT way: the same adapter into a bf16 backbone answers as the run's model did
    backbone, _ = load_backbone("tiny", seed=0, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(backbone, str(saved)).eval()
    lora_a = model.get_base_model().model.layers[0].self_attn.q_proj
    assert lora_a.base_layer.weight.dtype == torch.bfloat16 and lora_a.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=PROBE).logits.float(), probe.logits, rtol=0, atol=1e-3)
        # (and the adapter is what makes them agree: the bf16 backbone alone is further off than that)
        with model.disable_adapter():
            assert (model(input_ids=PROBE).logits.float() - probe.logits).abs().max() > 1e-2

    # skillstream.load reads model.dtype from the run's config.yaml: the backbone it gives is bf16 too
    loaded = skillstream.load(run.run_dir)
    assert loaded.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_bf16_skill_stream_keeps_its_router_and_experts_float32(tmp_path):
    run = skillstream.train("dylora_moe", out=tmp_path / "run", smoke=True, show_progress=False,
                            overrides={**tiny(dtype="bfloat16"), "report_to": []})
    assert {t.dtype for t in load_file(str(run.run_dir / "router" / "router.safetensors")).values()} == {torch.float32}
    experts = sorted((run.run_dir / "experts").glob("expert_*"))
    assert experts
    backbone, _ = load_backbone("tiny", seed=0, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(backbone, str(experts[0]))
    for path in experts:
        assert {t.dtype for t in load_file(str(path / "adapter_model.safetensors")).values()} == {torch.float32}
        model.load_adapter(str(path), adapter_name=path.name)  # each expert into the one bf16 backbone
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16
    assert {q_proj.lora_A[name].weight.dtype for name in q_proj.lora_A} == {torch.float32}


def test_bf16_weights_that_would_train_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"^model\.dtype: bfloat16 with model\.freeze_backbone: false"):
        skillstream.train("quickstart", out=tmp_path / "run", overrides={
            **tiny(dtype="bfloat16", freeze_backbone=False), "lora": None, "report_to": []})
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_gpu_without_bf16_arithmetic_stops_with_one_line(monkeypatch):
    # No GPU here: torch's answers on a Tesla T4 (compute capability 7.5, bf16 only emulated) stand in for one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(UserError, match=r"^model\.dtype: bfloat16 needs a GPU with bf16 arithmetic .*Tesla T4 has none"):
        load_backbone("tiny", dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"^train\.bf16: true needs a GPU with bf16 arithmetic .*Tesla T4 has none"):
        backbone_options(load_recipe("quickstart", {**tiny(), "train.bf16": True}))
    # auto picks what the GPU computes: float32 weights, no bf16 autocast
    assert backbone_options(load_recipe("quickstart", tiny(dtype="auto")))["dtype"] == torch.float32
    assert not bf16_enabled("auto", "cuda")


# -- model.attn_implementation --------------------------------------------------------------------

def test_eager_attention_is_used_when_asked_and_agrees_with_sdpa():
    eager, _ = load_backbone("tiny", seed=0, attn_implementation="eager")
    sdpa, _ = load_backbone("tiny", seed=0)
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=PROBE).logits, sdpa(input_ids=PROBE).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn is installed here")
def test_flash_attention_without_flash_attn_stops_with_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^model\.attn_implementation: flash_attention_2 needs the flash-attn package"):
        skillstream.train("quickstart", out=tmp_path / "run",
                          overrides={**tiny(attn_implementation="flash_attention_2"), "report_to": []})
    assert not (tmp_path / "run").exists()


def test_bdh_refuses_the_hugging_face_options_by_name():
    with pytest.raises(UserError, match=r"^model\.attn_implementation: applies to Hugging Face models; model 'bdh'"):
        load_backbone("bdh", attn_implementation="eager")
    with pytest.raises(UserError, match=r"^model\.dtype: applies to Hugging Face models"):
        load_backbone("bdh", dtype=torch.bfloat16)
    with pytest.raises(UserError, match=r"^train\.gradient_checkpointing: model 'bdh' \(BDHForCausalLM\) does not"):
        load_backbone("bdh", gradient_checkpointing=True, args={"n_layer": 1, "n_embd": 32, "n_head": 2, "mlp_internal_dim_multiplier": 4})


# -- train.gradient_checkpointing -----------------------------------------------------------------

def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_loss_curve(tmp_path):
    off, on = Probe(), Probe()
    plain = skillstream.train("quickstart", out=tmp_path / "off", show_progress=False, plugins=[off],
                              overrides={**SHORT, **tiny()})
    checkpointed = skillstream.train("quickstart", out=tmp_path / "on", show_progress=False, plugins=[on],
                                     overrides={**SHORT, **tiny(), "train.gradient_checkpointing": True})
    assert (off.checkpointing, on.checkpointing) == (False, True)
    # 6 micro-batches: a decoder layer runs once per micro-batch, and again in the backward pass when
    # its activations were not kept (LoRA dropout draws the same masks: checkpoint restores the RNG)
    assert (off.layer_calls, on.layer_calls) == (6, 12)
    torch.testing.assert_close(losses(checkpointed.run_dir), losses(plain.run_dir), rtol=1e-5, atol=0)


def test_bf16_smollm2_with_gradient_checkpointing_gives_the_same_loss_curve(tmp_path):
    """At real size: SmolLM2-135M in bf16 weights, 3 steps of batch 2. The recomputed forward repeats the
    same bf16 operations, so the curves agree to rounding: asserted within 1e-5 relative (measured here:
    identical). What checkpointing saves in memory and costs in time: bench/memory.py, bench/RESULTS.md."""
    keys = {"model": {"name": "smollm2-135m", "dtype": "bfloat16"}, "report_to": [], "data.eval": [],
            "train.steps": 3, "train.batch_size": 2, "train.log_every": 1, "train.checkpoint_every": 100,
            "data.max_length": 96, "data.train.0.limit": 6}
    off, on = Probe(), Probe()
    plain = skillstream.train("quickstart", out=tmp_path / "off", show_progress=False, plugins=[off], overrides=keys)
    checkpointed = skillstream.train("quickstart", out=tmp_path / "on", show_progress=False, plugins=[on],
                                     overrides={**keys, "train.gradient_checkpointing": True})
    assert (off.checkpointing, on.checkpointing) == (False, True) and (off.layer_calls, on.layer_calls) == (3, 6)
    assert len(losses(plain.run_dir)) == 3
    torch.testing.assert_close(losses(checkpointed.run_dir), losses(plain.run_dir), rtol=1e-5, atol=0)


def test_gradient_checkpointing_is_set_once_per_run():
    recipe = load_recipe({"name": "two", "model": "tiny", "stages": [
        {"name": "a"}, {"name": "b", "train": {"gradient_checkpointing": True}}]})
    with pytest.raises(UserError, match=r"^stages\[\]\.train\.gradient_checkpointing: set once per run"):
        backbone_options(recipe)


# -- model.quantization -----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_quantized_recipe_stops_with_one_line_on_a_machine_without_cuda(tmp_path):
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"),
                  "--set", "model={name: tiny, quantization: {bits: 4}}", "--set", "report_to=[]", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("error: model.quantization: 4-bit loading needs a CUDA GPU and bitsandbytes "
                               "(this machine has no CUDA)"), lines[0]
    assert not (tmp_path / "run").exists()


def test_quantization_takes_4_or_8_bits_and_a_frozen_backbone():
    with pytest.raises(UserError, match=r"model\.quantization\.bits: "):
        load_recipe("quickstart", {"model": {"name": "tiny", "quantization": {"bits": 3}}})
    full = load_recipe("quickstart", {"model": {"name": "tiny", "quantization": {"bits": 4}, "freeze_backbone": False},
                                      "lora": None})
    with pytest.raises(UserError, match=r"^model\.quantization: quantized weights cannot train"):
        backbone_options(full)
