"""Real English text that ships with Python (DESIGN §7), for oracle and quality tests."""

from __future__ import annotations


def pydoc_passages(count: int, min_chars: int = 1500) -> list[str]:
    """Deterministic passages from the language reference (pydoc_data.topics), each >= min_chars."""
    from pydoc_data.topics import topics

    passages = []
    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= min_chars:
            passages.append(text)
        if len(passages) == count:
            break
    return passages


PLAIN_PROMPTS = [
    "The capital of France is",
    "In Python, a list comprehension is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
]

CHAT_PROMPTS = [
    "What is the boiling point of water at sea level?",
    "Write a haiku about autumn leaves.",
]
