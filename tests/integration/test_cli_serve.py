"""The README path: `tierserve serve` brings up the disaggregated app on an embedded Ray, and
`tierserve generate` streams a reply over gRPC (both as real subprocesses, real port)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.local_serve import free_port

pytestmark = pytest.mark.slow


def test_serve_then_generate_streams_over_grpc(tmp_path):
    port = free_port()
    config = tmp_path / "serve.yaml"
    # The default config, with smaller KV pools so three engines fit comfortably beside the test run.
    config.write_text("engine:\n  kv_cache_memory_mb: 128\n")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--config", str(config),
                               "--grpc-port", str(port), "--http-port", str(free_port())],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "gRPC listening" not in (tmp_path / "serve.log").read_text():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not come up in 240 s"
            time.sleep(1)
        result = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "Hello", "--chat", "--json",
                                 "--target", f"127.0.0.1:{port}", "--max-tokens", "16"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["text"] and reply["tier"] == "default"
        assert reply["usage"]["completion_tokens"] == len(reply["token_ids"]) >= 1
        bad = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "", "--target", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "prompt" in bad.stderr
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
