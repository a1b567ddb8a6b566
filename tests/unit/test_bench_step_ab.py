"""`tierserve bench engine --against REV`: the old tree is exported, the two trees alternate, ratios are new/old;
the worker times the steps it says it times (on the tiny engine)."""

import subprocess

import pytest

from cluster.tools import bench_step_ab
from cluster.tools.step_timing_worker import time_shape
from tests.unit.test_engine import make_engine


def test_export_tree_writes_the_old_commits_engine_and_kernels(tmp_path):
    bench_step_ab.export_tree("HEAD", tmp_path)
    head_engine = subprocess.run(["git", "show", "HEAD:workers/engine.py"], cwd=bench_step_ab.REPO_ROOT,
                                 check=True, capture_output=True, text=True).stdout
    assert (tmp_path / "workers" / "engine.py").read_text() == head_engine
    assert (tmp_path / "kernels" / "paged_attention.py").exists() and not (tmp_path / "cluster").exists()


def test_trees_alternate_and_ratios_are_new_over_old(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_step_ab, "export_tree", lambda rev, into: None)

    def fake_time_tree(tree, repeats):
        label = "new" if tree == bench_step_ab.REPO_ROOT else "old"
        calls.append(label)
        return {"decode b=8": 0.011 if label == "new" else 0.010, "prefill": 0.2}

    monkeypatch.setattr(bench_step_ab, "time_tree", fake_time_tree)
    result = bench_step_ab.run_step_ab("HEAD", rounds=3, repeats=1)
    assert calls == ["old", "new"] * 3
    assert result.ratio["decode b=8"] == pytest.approx(1.1) and result.ratio["prefill"] == pytest.approx(1.0)
    assert result.runs["old"]["decode b=8"] == [0.010] * 3
    table = bench_step_ab.format_table(result)
    assert "decode b=8" in table and "1.100" in table
    with pytest.raises(ValueError, match="--rounds"):
        bench_step_ab.run_step_ab("HEAD", rounds=0, repeats=1)


@pytest.mark.parametrize("decode_steps", [0, 3])
def test_worker_times_the_prefill_or_the_decode_steps(tiny_loaded, monkeypatch, decode_steps):
    engine = make_engine(tiny_loaded, max_num_batched_tokens=16)
    timed = []
    real_step = engine.step

    def counting_step():
        outputs = real_step()
        timed.append(len(outputs))
        return outputs

    monkeypatch.setattr(engine, "step", counting_step)
    seconds = time_shape(engine, tiny_loaded.config.vocab_size, count=2, prompt_len=20, decode_steps=decode_steps,
                         repeats=1, seed=0)
    assert seconds > 0 and not engine.has_unfinished() and engine.pool.num_used_blocks == 0
    # 2 prompts of 20 tokens at 16 tokens per step: 3 prefill steps, then decode_steps decode steps.
    assert len(timed) == 3 + decode_steps
