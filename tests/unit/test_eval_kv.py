"""`tierserve eval kv` / `eval memory` end to end on a tiny checkpoint: table, JSON, PNG, measured bytes."""

import json
import os
import subprocess
import sys

import torch

from tests.checkpoints import make_tiny_hf_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_eval_kv_reports_measured_bytes_quality_and_a_plot(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "llama", "llama")
    out = tmp_path / "kv.json"
    result = run_cli("eval", "kv", "--model", str(model_dir), "--json", str(out), "--presets", "int8,tq-k4v4,gtq-3.0",
                     "--windows", "1", "--window-tokens", "96", "--prompts", "2", "--greedy-tokens", "8",
                     "--needle-lengths", "200", "--needle-depths", "0.5")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    rows = {row["codec"].split("@")[0]: row for row in report["results"]}
    assert list(rows) == ["float16", "int8", "tq-k4v4", "gtq-3.0"]
    # The tiny model: 2 layers, 2 KV heads, head dim 16. fp16 = 2 * 2 * 2 * 16 * 2 bytes per token;
    # tq-k4v4 = per layer, side and head 8 code bytes + one fp16 scale.
    assert rows["float16"]["bytes_per_token"] == 256 and rows["float16"]["ratio_vs_fp16"] == 1.0
    assert rows["tq-k4v4"]["bytes_per_token"] == 2 * 2 * 2 * (8 + 2)
    assert rows["tq-k4v4"]["ratio_vs_fp16"] == 256 / 80
    assert rows["float16"]["greedy_agreement"] == 1.0 and rows["float16"]["perplexity_increase_pct"] == 0.0
    for row in rows.values():
        assert row["perplexity"] > 1.0 and 0.0 <= row["greedy_agreement"] <= 1.0
        assert set(row["needle_accuracy"]) == {"200"}
    assert "tq-k4v4" in result.stdout and "dppl%" in result.stdout  # the table
    assert (tmp_path / "kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "kv-calibration.pt").exists()  # gtq calibrated in the same run


def test_eval_memory_uses_the_codecs_byte_accounting(tmp_path):
    from cluster.tools.kv_memory import SHAPES, bytes_per_token
    from workers.kv.presets import make_codec

    out = tmp_path / "memory.json"
    result = run_cli("eval", "memory", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = {row["codec"]: row for row in json.loads(out.read_text())["rows"]}
    llama = SHAPES[1]
    assert rows["float16"][llama.name]["bytes_per_token"] == 32 * 2 * 8 * 128 * 2  # 128 KiB per token
    codec = make_codec("tq-k4v3", model_dtype=torch.float16, num_layers=32, num_kv_heads=8, head_dim=128)
    assert rows["tq-k4v3"][llama.name]["bytes_per_token"] == sum(codec.bytes_per_token(i) for i in range(32))
    assert bytes_per_token(llama, "gtq-3.0") < rows["float16"][llama.name]["bytes_per_token"] / 4
