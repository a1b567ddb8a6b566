"""CLI error paths: clear messages and exit status 2, never a traceback."""

import os
import subprocess
import sys

from tests.checkpoints import make_tiny_hf_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def test_missing_model_file(tmp_path):
    result = run_cli("run", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert result.returncode == 2
    assert "model path not found" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_model_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    result = run_cli("run", "hi", "--model", str(junk))
    assert result.returncode == 2
    assert "not a valid GGUF" in result.stderr and "Traceback" not in result.stderr


def test_unsupported_architecture(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "gpt2", "unsupported")
    result = run_cli("run", "hi", "--model", str(model_dir))
    assert result.returncode == 2
    assert "unsupported architecture 'GPT2LMHeadModel'" in result.stderr


def test_prompt_longer_than_context(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "llama", "llama")
    result = run_cli("run", "the " * 400, "--model", str(model_dir), "--max-model-len", "64")
    assert result.returncode == 2
    assert "prompt: prompt has" in result.stderr and "context window is 64" in result.stderr


def test_bad_sampling_value_names_the_field(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "llama", "llama")
    result = run_cli("run", "hi", "--model", str(model_dir), "--top-p", "1.5")
    assert result.returncode == 2
    assert "top_p" in result.stderr


def test_run_streams_text_on_a_tiny_model(tmp_path):
    model_dir = make_tiny_hf_checkpoint(tmp_path / "llama", "llama")
    result = run_cli("run", "the tea", "--model", str(model_dir), "--max-tokens", "8", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    import json

    payload = json.loads(result.stdout)
    assert len(payload["token_ids"]) == 8 and payload["finish_reason"] == "length"


def test_config_show_and_validate(tmp_path):
    shown = run_cli("config", "show")
    assert shown.returncode == 0 and "decode_tiers:" in shown.stdout
    good = tmp_path / "good.yaml"
    good.write_text(shown.stdout)
    assert run_cli("config", "validate", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpc_port: 70000\n")
    result = run_cli("config", "validate", str(bad))
    assert result.returncode == 2 and "grpc_port" in result.stderr


def test_bench_engine_prints_the_table_and_writes_json(tmp_path):
    import json

    model_dir = make_tiny_hf_checkpoint(tmp_path / "llama", "llama")
    out = tmp_path / "bench.json"
    result = run_cli("bench", "engine", "--model", str(model_dir), "--prompt-len", "16", "--decode-tokens", "4",
                     "--concurrency", "1,2,3", "--rounds", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "decode tok/s, 2 streams (vs HF batch 2)" in result.stdout and "best of: torch" in result.stdout
    assert "decode tok/s, 3 streams (vs HF batch 3)" in result.stdout  # transformers runs every concurrency
    payload = json.loads(out.read_text())
    assert payload["matmul_roofline_gflops"] == max(payload["matmul_gflops_by_kernel"].values()) > 0
    assert payload["aggregate_decode_tok_s"]["2"] > 0 and payload["ratios"]["single_stream_vs_hf"] > 0
    assert len(payload["runs"]["decode_tok_s_2"]) == len(payload["runs"]["hf_decode_tok_s_2"]) == 2
