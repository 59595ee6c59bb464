"""`skillstream report`: a real smoke run rendered in headless Chromium (no network, no console
errors, heatmap and results.json values on the page, screenshot saved), sections present exactly
when a run has their data, comparison of runs, and bad input."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from skillstream.monitor.metrics_log import MetricsLog
from skillstream.report.html import page as html_page, write_report
from skillstream.report.rundata import fmt, load_run
from skillstream.report.sections import samples as samples_section, training_samples

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("SKILLSTREAM_ARTIFACTS", "/tmp/skillstream-artifacts"))
OPTIONAL = ["experts", "routing", "curriculum", "alerts", "objective"]


def make_run(path: Path, *, rich: bool = True, name: str = "dylora_moe", finished: bool = True,
             avg_shift: float = 0.0, seed: int = 0) -> Path:
    """A run directory by hand, in the formats later issues add: three tasks in three stages and,
    when `rich`, an expert pool, novelty decisions, routing, curriculum weights, DPO/plugin metrics
    and alerts. Logs are written with the engine's own MetricsLog so the format is the real one."""
    path.mkdir(parents=True)
    tasks = ["sst2", "rte", "boolq"]
    cfg = {"name": name, "description": "hand-made run for the report tests", "seed": seed,
           "train": {"steps": 6, "log_every": 1}, "objective": {"name": "dpo"} if rich else {"name": "lm"},
           "plugins": [{"name": "ewc"}, {"name": "replay"}] if rich else [],
           "stages": [{"name": t} for t in tasks]}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = MetricsLog(path)
    for si, stage in enumerate(tasks):
        for step in range(1, 7):
            rec = {"step": step, "stage": stage, "loss": 2.0 - 0.1 * step + 0.3 * si, "lr": 1e-4 * (7 - step) / 6,
                   "grad_norm": 1.0 + 0.05 * step, "tokens_per_s": 900.0 + step}
            if rich:
                w = (si + step / 6) / 3
                rec.update({"rewards/margins": 0.1 * step, "rewards/accuracies": 0.5 + 0.05 * step,
                            "objective/kl": 0.01 * step, "neuromod/gain": 1.0 + 0.1 * math.sin(step),
                            "curriculum/weight/sst2": 1 - w, "curriculum/weight/rte": w,
                            "router/share/e0": 1 - w, "router/share/e1": w,
                            **{f"firing_rate/{i}": 0.1 * (i + 1) for i in range(4)}})
            log.log(rec)
    if rich:
        log.alert(4, "warning", "loss_spike", "loss rose 3x in 5 steps", stage="rte")
        log.alert(2, "error", "grad_nan", "gradient norm was NaN; step skipped", stage="boolq")
        log.alert(5, "info", "new_expert", "spawned expert e1", stage="boolq")
    if not finished:
        return path
    initial = [0.50, 0.48, 0.55]
    matrix = [[0.88 + avg_shift, 0.52, 0.56], [0.85, 0.71 + avg_shift, 0.58], [0.83, 0.69, 0.77 + avg_shift]]
    sample = {"prompt": "Review: <script>alert(1)</script> & more", "output": "Good", "references": ["Good"]}
    details = [[{"score": v, "metric": "accuracy", "samples": [sample]} for v in row] for row in matrix]
    results = {"tasks": tasks, "metric": {t: "accuracy" for t in tasks}, "initial": initial, "matrix": matrix,
               "avg_acc": sum(matrix[-1]) / 3,
               "bwt": ((matrix[2][0] - matrix[0][0]) + (matrix[2][1] - matrix[1][1])) / 2,
               "fwt": ((matrix[0][1] - initial[1]) + (matrix[1][2] - initial[2])) / 2,
               "forgetting": [0.05, 0.02, None],
               "initial_details": [{"score": v, "metric": "accuracy", "samples": [{**sample, "output": "\n\n"}]}
                                   for v in initial],
               "details": details,
               "stages": [{"name": t, "steps": 6, "seconds": 12.5, "tokens": 6000, "tokens_per_s": 480.0,
                           "examples": 48, "truncated": 0} for t in tasks],
               "experts": ["default"], "seconds": 37.5, "truncated": 0}
    if rich:
        results["experts"] = [{"name": "e0", "params": 1_179_648, "maturity": 0.93, "tasks": "sst2"},
                              {"name": "e1", "params": 1_179_648, "maturity": 0.41, "tasks": "rte, boolq"}]
        results["routing"] = {"task_agnostic_accuracy": 0.97}
        results["novelty"] = [{"chunk": i, "entropy": 0.2 + 0.3 * (i == 3), "similarity": 0.9 - 0.5 * (i == 3),
                               "decision": "new expert" if i == 3 else "existing", "expert": "e1" if i >= 3 else "e0"}
                              for i in range(6)]
    (path / "results.json").write_text(json.dumps(results))
    return path


def report(run_dirs, cwd, *extra):
    """Through the CLI, as a user would run it."""
    res = run_cli("report", *map(str, run_dirs), *extra, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res


def render(run_dirs) -> str:
    """In process: the same writer without a Python start-up per test."""
    return write_report(run_dirs).read_text()


def section_ids(page: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)"', page))


def assert_self_contained(page: str) -> None:
    """Nothing fetched from anywhere: inline PNGs only, no scripts, no stylesheets by reference."""
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<script" not in page and "<link" not in page and "url(" not in page


def chromium(args: list[str], url: str, tmp: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with every network path shut: no DNS, no QUIC, no background fetches."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", "--window-size=1280,2000", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    # the page has no scripts, so any console message at all means something went wrong
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    return res


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason="/usr/bin/chromium missing: apt-get install -y chromium (.ci/run does)")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("report-smoke")
    res = run_cli("train", "quickstart", "--smoke", "--set", "model=tiny", "--set", "report_to=[]",
                  "--set", "train.sample_every=2", cwd=cwd)  # samples.jsonl: generations during training
    assert res.returncode == 0, res.stderr
    return cwd, cwd / "runs" / "quickstart"


@needs_chromium
def test_real_run_report_renders_in_headless_chromium(smoke_run, tmp_path):
    cwd, run = smoke_run
    res = report([run], cwd)
    out = run / "report.html"
    assert res.stdout.strip() == f"wrote {out}"
    page = out.read_text()
    assert_self_contained(page)
    results = json.loads((run / "results.json").read_text())
    dom = chromium(["--dump-dom"], out.resolve().as_uri(), tmp_path).stdout
    assert '<img class="plot heatmap"' in dom
    for key in ("avg_acc", "bwt", "fwt"):
        assert f'data-metric="{key}">{fmt(results[key])}</div>' in dom
    final_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final_loss["stage"] in dom and "nl2bash" in dom
    # a plain run: one adapter, no router, no curriculum, no alerts -> those sections are left out;
    # the LM objective's own signals (lm/token_accuracy, lm/entropy) are data the run has, so they show
    assert section_ids(dom) & set(OPTIONAL) == {"objective"}
    assert "lm/token_accuracy" in dom
    assert {"summary", "tasks", "training", "samples", "training-samples", "config"} <= section_ids(dom)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and f"The newest of {len(samples)} generations in samples.jsonl" in dom
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report-smoke.png"
    shot.unlink(missing_ok=True)
    chromium([f"--screenshot={shot}"], out.resolve().as_uri(), tmp_path)
    assert shot.stat().st_size > 10_000
    # the sample generations (at evaluation, and during training from samples.jsonl) on a page of their
    # own, rendered by the report's own page and sections, so the screenshot shows them whole
    alone = tmp_path / "samples.html"
    data = load_run(run)
    alone.write_text(html_page("skillstream report: samples", [str(run)], [samples_section(data), training_samples(data)], []))
    shot = ARTIFACTS / "report-smoke-samples.png"
    shot.unlink(missing_ok=True)
    chromium([f"--screenshot={shot}"], alone.resolve().as_uri(), tmp_path)
    assert shot.stat().st_size > 10_000
    shutil.copy(out, ARTIFACTS / "report-smoke.html")


def test_sections_appear_when_the_run_has_their_data(tmp_path):
    run = make_run(tmp_path / "rich")
    page = render([run])
    assert set(OPTIONAL) <= section_ids(page)
    assert_self_contained(page)
    for text in ("e0", "e1", "1,179,648", "0.9300", "new expert", "task_agnostic_accuracy",
                 "loss_spike", "gradient norm was NaN", "rewards", "neuromod", "firing_rate", "objective/kl"):
        assert text in page, text
    assert 'class="sev-error"' in page
    results = json.loads((run / "results.json").read_text())
    assert f'data-metric="bwt">{fmt(results["bwt"])}</div>' in page
    # model text is escaped: a prompt with markup shows as text and cannot run
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page and "<script>" not in page
    if CHROMIUM.exists():
        chromium(["--dump-dom"], (run / "report.html").resolve().as_uri(), tmp_path)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        chromium([f"--screenshot={ARTIFACTS / 'report-rich.png'}"], (run / "report.html").resolve().as_uri(), tmp_path)


def test_the_summary_says_what_each_stage_taught_its_task(tmp_path):
    run = make_run(tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    results["learned"] = [{"difference": 0.38, "ci95": [0.2, 0.55], "n": 40, "excludes_zero": True},
                          {"difference": 0.05, "ci95": [-0.1, 0.2], "n": 40, "excludes_zero": False}]
    (run / "results.json").write_text(json.dumps(results))
    page = render([run])
    assert "after its own stage − before" in page
    assert "0.3800 [0.2000, 0.5500] excludes 0" in page and "0.0500 [-0.1000, 0.2000] includes 0" in page


def test_plain_run_leaves_optional_sections_out(tmp_path):
    run = make_run(tmp_path / "plain", rich=False)
    page = render([run])
    assert section_ids(page) & set(OPTIONAL) == set()
    assert {"summary", "tasks", "training", "samples", "config"} <= section_ids(page)


def test_run_in_progress_shows_training_but_no_results(tmp_path):
    run = make_run(tmp_path / "live", rich=False, finished=False)
    ids = section_ids(render([run]))
    assert "training" in ids and "summary" not in ids and "samples" not in ids


def test_comparison_of_two_runs(tmp_path):
    a = make_run(tmp_path / "a", name="ewc")
    b = make_run(tmp_path / "b", rich=False, name="replay", avg_shift=-0.1)
    assert write_report([a, b]) == a / "report-compare.html"
    page = (a / "report-compare.html").read_text()
    assert_self_contained(page)
    rows = re.findall(r"<tr><td>(ewc|replay)</td><td>[^<]*</td><td>([0-9.]+)</td>", page)
    expected = {n: fmt(json.loads((d / "results.json").read_text())["avg_acc"]) for n, d in (("ewc", a), ("replay", b))}
    assert dict(rows) == expected and expected["ewc"] != expected["replay"]
    assert "dpo + ewc + replay" in page                       # method column from objective and plugins
    assert "loss of each run (overlaid)" in page


def test_same_recipe_twice_is_told_apart_by_folder(tmp_path):
    a = make_run(tmp_path / "seed0", rich=False, name="quickstart")
    b = make_run(tmp_path / "seed1", rich=False, name="quickstart")
    page = render([a, b])
    assert "quickstart (seed0)" in page and "quickstart (seed1)" in page


def test_runs_of_one_recipe_at_several_seeds_get_their_mean_and_spread(tmp_path):
    shifts = {0: 0.0, 1: -0.06, 2: 0.03}
    seeds = [make_run(tmp_path / f"seed{s}", rich=False, name="quickstart", seed=s, avg_shift=d) for s, d in shifts.items()]
    again = make_run(tmp_path / "seed1-again", rich=False, name="quickstart", seed=1, avg_shift=-0.06)
    other = make_run(tmp_path / "ewc", name="ewc")                    # another recipe: not a seed of these
    res = report([*seeds, again, other], tmp_path)
    avg = [json.loads((d / "results.json").read_text())["avg_acc"] for d in seeds]
    mean, sd = sum(avg) / 3, (sum((a - sum(avg) / 3) ** 2 for a in avg) / 2) ** 0.5
    expected = f"AvgAcc: {mean:.3f} ± {sd:.3f} ({min(avg):.3f}..{max(avg):.3f})"
    assert "quickstart: mean ± sample sd (min..max) over seeds 0, 1, 2" in res.stdout
    assert expected in res.stdout and "ewc" not in res.stdout
    assert "boolq: after its own stage" not in res.stdout              # no `learned` in these runs: left out
    assert f"same seed as an earlier run: {again}" in res.stdout       # a repeat is not one more seed
    page = (seeds[0] / "report-compare.html").read_text()
    assert 'id="seeds"' in page and f"{mean:.3f} ± {sd:.3f}" in page
    assert 'id="seeds"' not in render([seeds[0], other])               # one seed per recipe: no such section


def test_not_a_run_is_one_line_and_status_2(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    for target in (tmp_path / "not-a-run", tmp_path / "missing"):
        res = run_cli("report", str(target), cwd=tmp_path)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(target) in lines[0], res.stderr
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.yaml").write_text("name: x\n")
    res = run_cli("report", str(only_config), cwd=tmp_path)
    assert res.returncode == 2 and "metrics.jsonl" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_truncated_last_line_is_skipped_and_reported(tmp_path):
    run = make_run(tmp_path / "killed", rich=False, finished=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "stage": "boolq", "lo')          # killed mid-write
    out = tmp_path / "elsewhere" / "killed.html"
    res = report([run], tmp_path, "--out", str(out))
    assert res.stdout.strip() == f"wrote {out}"
    assert res.stderr.strip() == f"warning: {run / 'metrics.jsonl'}: the last line was cut off (a run killed mid-write); it was skipped"
    page = out.read_text()
    assert "the last line was cut off" in page and "training" in section_ids(page)


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    run = make_run(tmp_path / "corrupt", rich=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = "{not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    res = run_cli("report", str(run), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {run / 'metrics.jsonl'} line 2: not valid JSON"
