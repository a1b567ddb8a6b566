"""`tierserve bench moe` end to end on a tiny MoE checkpoint: one process against a 2-rank group, free and dMoE
routing, built and REAP-pruned; the table and JSON carry every configuration and the group's traffic."""

import json

from cluster.cli import main
from tests.checkpoints import make_tiny_hf_checkpoint


def test_bench_moe_compares_one_process_with_the_group(tmp_path, capsys):
    model = make_tiny_hf_checkpoint(tmp_path / "moe", "qwen3_moe")
    out = tmp_path / "bench.json"
    assert main(["bench", "moe", "--model", str(model), "--prompt-len", "24", "--decode-tokens", "6",
                 "--moe-streams", "4", "--moe-block-size", "8", "--num-threads", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["routing"], r["ranks"]) for r in rows] == [
        (model_label, routing, ranks) for model_label in ("built", "REAP 50%") for routing in ("free", "dmoe")
        for ranks in (1, 2)]
    for row in rows:
        assert row["output_tokens"] == 4 * 6 and row["tokens_per_s"] > 0
        assert 0 < row["distinct_experts_per_block"] <= 8
    group_rows = [r for r in rows if r["ranks"] == 2]
    assert all(r["all_to_all_bytes_per_token"] > 0 and r["vs_single"] > 0 for r in group_rows)
    # dMoE restricts each block to a coreset: fewer distinct experts than free routing, same model and ranks
    free, dmoe = rows[0], rows[2]
    assert dmoe["distinct_experts_per_block"] < free["distinct_experts_per_block"]
    table = capsys.readouterr().out
    assert "bench moe:" in table and "a2a B/tok" in table and "REAP 50%" in table
