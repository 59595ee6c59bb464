"""The size ladder: `model:` takes any causal LM of the Llama, Qwen2/3, Gemma, Mistral and Phi families,
named by a local folder written with `save_pretrained` (or a hub id, loaded the same way).

Each family here is a random 2-layer, 64-wide model built from `AutoConfig.for_model` and saved with
the bundled SmolLM2 tokenizer; nothing is downloaded. Every family trains quickstart (smoke sizes), its
LoRA adapter covers every linear layer of its decoder (fused projections such as Phi-3's qkv_proj
included), and the saved adapter loads with `PeftModel.from_pretrained` into the family's backbone and
answers as `skillstream.load` does. Every bundled recipe but dragon_hatching (its own BDH model) runs on
one non-Llama family, Phi, whose tokenizer has no chat template (as phi-2's has none): the plain
`role: content` rendering stands in for it. Measured here (2 CPU cores shared with other jobs):
quickstart on the 9 families took 28 s, the other four recipes on Phi 95 s; the full family x recipe
matrix would take about 9 x 95 s, some 14 minutes, so the suite runs this cut of it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import skillstream
from conftest import run_cli
from skillstream.data.render import Renderer
from skillstream.models.backbone import load_tokenizer, smollm2_tokenizer_dir

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

# model_type -> whether its tokenizer keeps a chat template (phi-2 ships none: the plain fallback)
FAMILIES = {"llama": True, "qwen2": True, "qwen3": True, "gemma": True, "gemma2": True, "gemma3_text": True,
            "mistral": True, "phi": False, "phi3": True}
RECIPES = ["quickstart", "dylora_moe", "adaptive_learner", "muse", "destruct"]  # dragon_hatching: its own BDH model
NON_LLAMA = "phi"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
PROBE = torch.tensor([[1, 20, 300, 4000, 7, 8, 9, 10]])


def random_checkpoint(model_type: str, folder: Path, chat_template: bool) -> Path:
    """A randomly initialised `model_type` causal LM of tiny size, saved as a user's checkpoint folder is."""
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    if not chat_template:
        tok.chat_template = None
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: random_checkpoint(family, root / family, template) for family, template in FAMILIES.items()}


def smoke(recipe: str, folder: Path, out: Path):
    return skillstream.train(recipe, out=out, smoke=True, show_progress=False,
                             overrides={"model": str(folder), "report_to": []})


def linear_layers(model) -> set[str]:
    """The decoder's linear layers, which `target_modules: all-linear` adapts (the LM head is left out)."""
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_trains_quickstart_with_lora_on_every_linear_layer(family, checkpoints, tmp_path):
    folder = checkpoints[family]
    run = smoke("quickstart", folder, tmp_path / "run")
    assert losses(run.run_dir) and all(torch.isfinite(torch.tensor(losses(run.run_dir))))

    saved = run.run_dir / "experts" / "default"
    backbone = AutoModelForCausalLM.from_pretrained(folder)
    adapted = {key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
               for key in load_file(str(saved / "adapter_model.safetensors")) if key.endswith(".lora_A.weight")}
    assert adapted == linear_layers(backbone), adapted ^ linear_layers(backbone)

    # the adapter a user takes away loads the PEFT way and answers as skillstream.load does
    peft = PeftModel.from_pretrained(backbone, str(saved)).eval()
    ours = skillstream.load(run.run_dir).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=PROBE).logits, ours(input_ids=PROBE).logits, rtol=0, atol=1e-5)


def test_a_tokenizer_without_a_chat_template_is_rendered_plain(checkpoints):
    plain = Renderer(load_tokenizer(str(checkpoints[NON_LLAMA])), max_length=64, system_prompt="Be brief.")
    templated = Renderer(load_tokenizer(str(checkpoints["qwen3"])), max_length=64, system_prompt="Be brief.")
    messages = [{"role": "user", "content": "list files"}]
    assert plain.chat(messages, add_generation_prompt=True) == "system: Be brief.\nuser: list files\nassistant: "
    assert templated.chat(messages, add_generation_prompt=True).startswith("<|im_start|>system\nBe brief.")


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "quickstart"])
def test_every_recipe_runs_on_a_non_llama_family(recipe, checkpoints, tmp_path):
    run = smoke(recipe, checkpoints[NON_LLAMA], tmp_path / "run")
    results = json.loads((run.run_dir / "results.json").read_text())
    assert results["stages"] and all(torch.isfinite(torch.tensor(losses(run.run_dir))))
    assert (run.run_dir / "experts").is_dir()


def test_a_checkpoint_folder_is_named_on_the_command_line(checkpoints, tmp_path):
    res = run_cli("train", "quickstart", "--smoke", "--out", str(tmp_path / "run"),
                  "--set", f"model={checkpoints['mistral']}", "--set", "report_to=[]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "experts" / "default" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(checkpoints["mistral"])
