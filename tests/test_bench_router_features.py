"""bench/router_features --quick: the feature table is produced from the router's own reader."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_prints_a_row_per_pooling_and_depth_and_per_depth_set():
    proc = subprocess.run([sys.executable, "bench/router_features.py", "--quick", "--depths", "0.5,1.0",
                           "--concat", "0.5+1.0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "never the test split" in proc.stdout  # depths are chosen on held-out training prompts
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| mean |") or ln.startswith("| last |")]
    assert len(rows) == 2 * (2 * 2 + 1)  # printed as measured, then in the recorded table
    assert sum(row.startswith("| last | 0.5+1.0 |") for row in rows) == 2  # the two depths read at once
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| pooling |"))
    assert header.split("|")[5:9] == [" joint bash ", " joint call ", " joint choose ", " joint decline "]
    assert header.split("|")[9:13] == [" stream bash ", " stream call ", " stream choose ", " stream decline "]
    for row in rows:
        accuracies = [float(c) for c in row.strip("|").split("|")[2:]]
        assert all(0.0 <= a <= 1.0 for a in accuracies)


def test_validation_prompts_come_from_the_training_split_after_the_training_prompts():
    sys.path.insert(0, str(ROOT / "bench"))
    from router_features import skill_prompts
    from skillstream.config import load_recipe
    from skillstream.data.examples import load_examples

    def request(ex):  # NL2Bash: the prompt; BFCL: the conversation
        return ex.prompt or repr(ex.messages)

    cfg, skills = skill_prompts("dylora_moe", "tiny", 6, 3)
    assert list(skills) == [st.name for st in load_recipe("dylora_moe").resolved_stages()]
    for st in cfg.resolved_stages():
        train, validation = skills[st.name]
        pool = load_examples(st.data.train[0].model_copy(update={"limit": 9}))
        assert [request(e) for e in train] == [request(e) for e in pool[:6]]
        assert [request(e) for e in validation] == [request(e) for e in pool[6:9]]
        test = {request(e) for e in load_examples(next(t for t in st.data.eval if t.name == st.name))}
        assert not test & {request(e) for e in train + validation}
