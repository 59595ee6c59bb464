"""bench/routing --quick, run in this process (tiny model): the report's structure and the equal-work check."""
from __future__ import annotations

import pytest
import torch
from repo_scripts import load_script


@pytest.fixture(scope="module")
def routing():
    return load_script("bench/routing.py")


@pytest.fixture(scope="module")
def quick(routing):
    before = routing.RESULTS_MD.read_text()
    out = routing.main(["--quick", "--gen-tokens", "3", "--reps", "1", "--gen-reps", "1", "--batches", "1"], runner=routing.run_inline)
    assert routing.RESULTS_MD.read_text() == before  # --quick records nothing
    return out


def test_quick_run_measures_every_mode_and_memory(routing, quick):
    summary, results = quick["summary"], quick["results"]
    assert set(summary) == set(routing.MODES)
    for mode in routing.MODES:
        m = summary[mode]
        assert m["forward"] > 0 and m["generate"] > 0
        assert m["forward_n"] == quick["spec"]["reps"] * quick["spec"]["rounds"]
        run = results["throughput"][mode][0]
        assert run["mode"] == mode and run["prompt_tokens"] > 0 and run["gen_new_tokens"] == 3 * run["gen_batch"]
    assert summary["single"]["forward_ratio"] == 1.0
    mem = results["memory"]
    assert mem["backbone_tensors_shared"] and mem["lora_bytes_all_equal"] and mem["experts"] == 8
    # tiny: 2 layers x r=16 x (q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64) fp32
    assert mem["lora_bytes_per_expert"] == 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192) * 4
    assert set(mem["rss_bytes"]) == {"0", "1", "2", "4", "8"}
    report = quick["report"]
    for label in routing.LABELS.values():
        assert label in report
    assert "≥ 0.9x" in report and "≥ 0.5x" in report and "growth per added expert" in report


def test_routed_outputs_equal_the_single_adapter_outputs(quick):
    v = quick["results"]["verify"]
    assert v["ok"], v["checks"]
    names = set(v["checks"])
    assert {"peft_top1 logits, batch 0", "mix_top1 logits, batch 0", "peft_top1 generated tokens",
            "mix_top1 generated tokens", "mix_dense row 0 vs PEFT cat merge"} <= names
    assert v["expert_vs_expert_max_abs_logit_diff"] > 1e-3  # non-zero B: the experts really differ


def test_equal_work_check_catches_a_wrong_routing(routing):
    single = {k: torch.full((4, 3), float(k)) for k in range(2)}
    route = torch.tensor([0, 0, 1, 1])
    routed = torch.stack([single[k][i] for i, k in enumerate(route.tolist())])
    assert routing.routed_rows_match(single, routed, route) == (True, 0.0)
    ok, diff = routing.routed_rows_match(single, routed, route.flip(0))
    assert not ok and diff == 1.0


def test_quick_scale_run_measures_routing_novelty_and_adapter_names_serving_at_each_count(routing):
    before = routing.RESULTS_MD.read_text()
    out = routing.main(["--quick", "--scale", "2,40", "--gen-tokens", "2", "--reps", "1", "--gen-reps", "1",
                        "--batches", "1", "--lookup-calls", "3"], runner=routing.run_inline)
    assert routing.RESULTS_MD.read_text() == before  # --quick records nothing
    assert out["counts"] == [2, 40]
    small, large = out["scale"][2]["selection"][0], out["scale"][40]["selection"][0]
    assert small["index"] == "exact" and small["candidates"] == 2          # below experts.index.exact_below
    assert large["index"] == "hnsw" and large["candidates"] == 8           # the index's nearest 8 of 40
    assert all(v and min(v) > 0 for v in large["parts"].values()) and large["lookup_each"] > 0
    serving = out["scale"][40]["serving"][0]
    assert serving["experts"] == 40 and serving["gen_new_tokens"] == 2 * serving["gen_batch"]
    assert serving["equal_work"]["ok"] and serving["equal_work"]["experts_in_batch"] == 8  # 8 rows, 8 different experts
    assert all(v and min(v) > 0 for v in serving["forward_tokens_per_s"].values())
    assert "Cost at 40 experts / cost at 2" in out["report"] and "Serving 40 adapters through PEFT's `adapter_names`" in out["report"]
