"""The llama.cpp baseline for `bench spec --llama-server PATH`: llama-server on the same GGUF (and, with a draft
model, its own draft-model speculation, `-md`), greedy, single stream, the same prompts.

Its decode rate is what it reports itself (`timings.predicted_per_second`: tokens after the first, over their
time), the same quantity `bench spec` measures for ours. Run one server at a time on this machine's threads.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaServerResult:
    family: str
    draft: bool  # with -md (its speculation) or plain
    decode_tok_s: float  # median over the prompts
    draft_acceptance: float | None  # accepted / drafted, when it drafted
    error: str | None = None  # the server would not start or answer: the rest of the bench still reports


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    def __init__(self, binary: str, model_path: str, draft_path: str | None, threads: int, no_repack: bool,
                 context: int = 4096):
        self.port = _free_port()
        command = [binary, "-m", model_path, "--port", str(self.port), "-t", str(threads), "-c", str(context),
                   "-np", "1", "--no-webui"]
        if draft_path:  # its own defaults for how many to draft: what its users run (the flags' names change)
            command += ["-md", draft_path]
        if no_repack:
            command += ["--no-repack"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.process.returncode}): "
                                   f"{self.process.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError("llama-server did not become ready")

    def complete(self, prompt: str, max_tokens: int) -> dict:
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "top_k": 1,
                           "cache_prompt": False, "ignore_eos": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=1800) as response:
            return json.loads(response.read())

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_llama_baseline(binary: str, model_path: str, draft_path: str | None, prompts_by_family: dict[str, list[str]],
                       max_tokens: int, threads: int, no_repack: bool) -> list[LlamaServerResult]:
    import statistics

    results = []
    for draft in ([False, True] if draft_path else [False]):
        try:
            server = LlamaServer(binary, model_path, draft_path if draft else None, threads, no_repack)
        except (RuntimeError, TimeoutError, OSError) as exc:
            results.extend(LlamaServerResult(family, draft, 0.0, None, error=str(exc)[-500:])
                           for family in prompts_by_family)
            continue
        try:
            server.complete(next(iter(prompts_by_family.values()))[0], 8)  # warm-up
            for family, prompts in prompts_by_family.items():
                rates, drafted, accepted = [], 0, 0
                for prompt in prompts:
                    timings = server.complete(prompt, max_tokens).get("timings", {})
                    rates.append(float(timings.get("predicted_per_second", 0.0)))
                    drafted += int(timings.get("draft_n", 0) or 0)
                    accepted += int(timings.get("draft_n_accepted", 0) or 0)
                results.append(LlamaServerResult(family, draft, statistics.median(rates),
                                                 accepted / drafted if drafted else None))
        finally:
            server.close()
    return results
