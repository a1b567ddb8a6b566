"""Shared fixtures. Triton runs interpreted on CPU, so the variable must be set before triton is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.checkpoints import make_tiny_hf_checkpoint  # noqa: E402


@pytest.fixture
def two_threads():
    """torch (and the native kernels, which run on its OpenMP threads) on 2 threads for the test: the threaded
    split of every kernel runs on any machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def real_model():
    """The default SmolLM2-135M GGUF loaded once in fp32 (shared by every real-model test)."""
    from workers.model.loader import load_model

    return load_model(None, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def hf_oracle():
    """transformers' fp32 model + tokenizer on the same GGUF file (the correctness oracle)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.model.loader import default_model_path

    path = default_model_path()
    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llama_dir):
    from workers.model.loader import load_model

    return load_model(str(tiny_llama_dir), dtype=torch.float32, device="cpu")
