"""`tierserve eval longctx` end to end on a tiny checkpoint: every policy x budget, the compound codec, measured
memory, teacher-forced perplexity, the needle grid, table, JSON and heatmap."""

import json

from tests.checkpoints import make_tiny_hf_checkpoint
from tests.unit.test_eval_kv import run_cli


def test_eval_longctx_reports_memory_perplexity_and_needles_per_policy(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "llama", "llama")
    out = tmp_path / "results" / "longctx.json"
    result = run_cli("eval", "longctx", "--model", str(model_dir), "--json", str(out), "--needle-lengths", "200,300",
                     "--needle-depths", "0.2,0.8", "--ppl-windows", "1", "--ppl-context", "150",
                     "--ppl-continuation", "24", "--budgets", "0.5,0.25", "--compound-codecs", "tq-k4v4")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {row["label"]: row for row in report["results"]}
    assert list(rows) == ["full cache", "streaming@0.5", "h2o@0.5", "snapkv@0.5", "value_aware@0.5",
                          "streaming@0.25", "h2o@0.25", "snapkv@0.25", "value_aware@0.25",
                          "value_aware@0.5+tq-k4v4", "value_aware@0.25+tq-k4v4"]
    full = rows["full cache"]
    assert full["memory_ratio_vs_fp16_full"] == 1.0 and full["perplexity_increase_pct"] == 0.0
    for label, row in rows.items():
        assert set(row["needle"]) == {"200@0.2", "200@0.8", "300@0.2", "300@0.8"}
        assert set(row["needle_accuracy"]) == {"200", "300"} and row["perplexity"] > 1.0
        assert len(row["window_perplexity"]) == 1 and abs(row["window_perplexity"][0] - row["perplexity"]) < 1e-6
        if label != "full cache":
            assert row["kv_bytes_held"] < full["kv_bytes_held"]
    # Memory is measured from the blocks held: a smaller budget holds less, and the codec multiplies the ratio.
    assert rows["streaming@0.25"]["memory_ratio_vs_fp16_full"] > rows["streaming@0.5"]["memory_ratio_vs_fp16_full"] > 1.5
    assert rows["value_aware@0.25+tq-k4v4"]["memory_ratio_vs_fp16_full"] > \
        2 * rows["value_aware@0.25"]["memory_ratio_vs_fp16_full"]
    # Value weights cost memory beside the pages, and the report counts them.
    assert rows["value_aware@0.5"]["kv_bytes_held"] > rows["h2o@0.5"]["kv_bytes_held"]
    assert "value_aware@0.25+tq-k4v4" in result.stdout and "dppl%" in result.stdout
    assert (tmp_path / "results" / "longctx.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
