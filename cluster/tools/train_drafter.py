"""`tierserve train-drafter eagle3`: train an EAGLE-3 head for a target on local text (workers/spec/eagle3_train.py).

The text: files given with --text, else what ships with Python (the language reference in pydoc_data.topics and
the sources of stdlib modules the `bench spec` prompts do not use). The head goes to --out (default: the cache
directory the eagle3 drafter looks in for this model), with a resumable training state beside it.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from workers.spec.eagle3_train import TrainConfig

# Stdlib modules whose source is training text (none of them is a `bench spec` prompt source).
TRAINING_MODULES = ("argparse", "csv", "dataclasses", "difflib", "fractions", "heapq", "ipaddress", "statistics",
                    "string", "tokenize", "calendar", "configparser", "gettext", "locale")


def default_texts() -> list[str]:
    import importlib

    from pydoc_data.topics import topics

    from cluster.tools.spec_prompts import _passages

    held_out = set(_passages())  # the passages `bench spec` summarises are not training text
    texts = [topics[name] for name in sorted(topics) if topics[name].strip()[:1600] not in held_out]
    texts += [inspect.getsource(importlib.import_module(name)) for name in TRAINING_MODULES]
    return texts


def self_distilled_windows(loaded, count: int, seq_len: int, max_tokens: int = 256) -> list[list[int]]:
    """The target's own greedy answers to chat prompts over training sources (prompt + answer, first seq_len
    tokens): what the head will see when it drafts (EAGLE trains on the target's regenerated responses)."""
    import importlib

    from pydoc_data.topics import topics

    from workers.config import EngineConfig
    from workers.engine import Engine
    from workers.sampling_params import SamplingParams

    sources = []
    for name in TRAINING_MODULES:
        module = importlib.import_module(name)
        for _, function in inspect.getmembers(module, inspect.isfunction):
            if function.__module__ == name and 300 < len(inspect.getsource(function)) < 1500:
                sources.append(("Explain what this Python function does, then rewrite it with type hints and "
                                "comments.\n\n```python\n" + inspect.getsource(function) + "```"))
    passages = [text for name, text in sorted(topics.items()) if 600 <= len(text)][16:]
    sources += ["Summarise the following text.\n\n" + text[:1500] for text in passages]
    contents = [sources[(i * 7919) % len(sources)] for i in range(count)]  # spread over both kinds
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": c}])) for c in contents]
    # Its own copy of the model: an engine repacks its model's linears for decode, which would slow the long
    # prefill passes of the feature extraction that follows.
    engine = Engine(EngineConfig(model=loaded.path, max_num_seqs=32, freeze_gc_heap=False))
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    windows = []
    for start in range(0, len(prompts), 32):
        batch = prompts[start:start + 32]
        for prompt, completion in zip(batch, engine.generate(batch, params)):
            sequence = prompt + completion.token_ids
            if len(sequence) >= seq_len:
                windows.append(sequence[-seq_len:])  # the answer, with as much of the prompt as fits
        print(f"[train-drafter] self-distilled {min(start + 32, len(prompts))}/{len(prompts)} answers",
              file=sys.stderr)
    return windows


def token_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None) -> list[list[int]]:
    """Consecutive seq_len-token windows over the texts (each text tokenized whole; a short tail is dropped)."""
    windows = []
    for text in texts:
        token_ids = tokenizer.encode(text)
        windows += [token_ids[i:i + seq_len] for i in range(0, len(token_ids) - seq_len + 1, seq_len)]
        if max_windows is not None and len(windows) >= max_windows:
            return windows[:max_windows]
    return windows


def cmd_train_drafter(args: argparse.Namespace) -> int:
    import torch

    from workers.model.loader import load_model
    from workers.spec.eagle3 import default_head_dir
    from workers.spec.eagle3_train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    texts = []
    for path in args.text or ():
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    texts = texts or default_texts()
    config = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, ttt_steps=args.ttt_steps, lr=args.lr,
                         max_steps=args.steps, max_minutes=args.minutes, draft_vocab_size=args.draft_vocab,
                         seed=args.seed)
    windows = token_windows(loaded.tokenizer, texts, config.seq_len, args.max_windows)
    if args.self_distill:
        windows += self_distilled_windows(loaded, args.self_distill, config.seq_len)
    if not windows:
        print(f"error: the text has fewer than {config.seq_len} tokens", file=sys.stderr)
        return 2
    out_dir = args.out or default_head_dir(loaded.path)
    print(f"[train-drafter] {len(windows)} windows of {config.seq_len} tokens -> {out_dir}", file=sys.stderr)
    train(loaded, windows, out_dir, config)
    print(out_dir)
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("train-drafter", help="train a speculative-decoding drafter (EAGLE-3 head) on local text")
    parser.add_argument("kind", choices=["eagle3"])
    parser.add_argument("--model", default=None, help="target: GGUF file, HF directory or registry name "
                                                      "(default: SmolLM2-135M)")
    parser.add_argument("--text", action="append", help="UTF-8 training text (repeatable; default: Python's docs "
                                                        "and stdlib sources)")
    parser.add_argument("--out", default=None, help="head directory (default: the eagle3 drafter's cache for the "
                                                    "model); rerun with the same one to resume")
    defaults = TrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.max_steps, help="optimizer steps")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long (resumable)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per training window")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per step")
    parser.add_argument("--ttt-steps", type=int, default=defaults.ttt_steps, help="unrolled draft steps")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (cosine decay)")
    parser.add_argument("--draft-vocab", type=int, default=defaults.draft_vocab_size, help="draft vocabulary size")
    parser.add_argument("--max-windows", type=int, default=None, help="use at most this many windows")
    parser.add_argument("--self-distill", type=int, default=0, metavar="N",
                        help="also train on the target's own answers to N chat prompts over the training sources")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.set_defaults(func=cmd_train_drafter)
