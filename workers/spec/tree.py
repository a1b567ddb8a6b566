"""Draft trees: several guesses for the next tokens verified in one pass, sharing their common prefixes.

A tree is the drafts in topological order plus a parent per draft: ``parents[i]`` is the index of draft i's
parent draft, or ROOT (-1) for a child of the request's last known token. A chain is the special case
parents = (-1, 0, 1, ...), written as the empty tuple everywhere (the common case costs nothing).

In the verify pass the known token is row 0 and draft i is row i + 1, in slot start + 1 + i, at RoPE position
start + 1 + depth(i). Each row sees the held prefix and its own ancestors: the tail mask (kernels/tree_mask.py)
clears the other tree slots. After verification the accepted path's K/V moves down to the slots a chain would
have used (start + 1, start + 2, ...), so the sequence stays contiguous and nothing else needs to know there
was a tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kernels.tree_mask import ALL_VISIBLE, TAIL_BITS

ROOT = -1
# Rows of one tree (the known token and its drafts) must fit the 64 bits of a tail mask.
MAX_TREE_DRAFTS = TAIL_BITS - 1


def chain_parents(num_drafts: int) -> tuple[int, ...]:
    return tuple(range(-1, num_drafts - 1))


def is_chain(parents: Sequence[int]) -> bool:
    return all(parent == index - 1 for index, parent in enumerate(parents))


def check_parents(parents: Sequence[int], num_drafts: int) -> None:
    if len(parents) != num_drafts:
        raise ValueError(f"draft tree: {len(parents)} parents for {num_drafts} drafts")
    if num_drafts > MAX_TREE_DRAFTS:
        raise ValueError(f"draft tree: {num_drafts} drafts; a tree holds at most {MAX_TREE_DRAFTS}")
    for index, parent in enumerate(parents):
        if not ROOT <= parent < index:
            raise ValueError(f"draft tree: draft {index}'s parent {parent} is not an earlier draft or ROOT")


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of each draft: 1 for a child of the known token."""
    result: list[int] = []
    for parent in parents:
        result.append(1 if parent == ROOT else result[parent] + 1)
    return result


def tail_masks(parents: Sequence[int]) -> list[int]:
    """The verify rows' tail masks (row 0, the known token, then one per draft), as signed int64 values."""
    masks = [ALL_VISIBLE]  # the known token sees everything before it
    visible_rows: list[int] = []  # per draft: a bitset of the tree rows it sees (bit r: row r; row 0 is the root)
    for index, parent in enumerate(parents):
        row = index + 1
        rows = (1 if parent == ROOT else visible_rows[parent]) | 1 << row
        visible_rows.append(rows)
        mask = -(1 << (row + 1))  # bits past `row` are tokens before the tree: visible
        for tree_row in range(row + 1):
            if rows >> tree_row & 1:
                mask |= 1 << (row - tree_row)  # tree row r is (row - r) tokens behind this one
        masks.append((mask + (1 << 63)) % (1 << 64) - (1 << 63))  # as a signed int64
    return masks


# A node's value shrinks by this per level below the first: a continuation that held once is less sure to hold
# the further it runs, so a second guess for the next token can beat a fourth token of the first guess.
DEPTH_DECAY = 0.8


@dataclass(frozen=True)
class TreeBuilder:
    """Builds a tree best-first from candidate continuations: each candidate is a token sequence with a weight
    (how likely it is, e.g. how many times it followed the context); a node is worth the total weight of the
    candidates through it times DEPTH_DECAY per level, and the most valuable nodes are kept (never worth more
    than its parent, so a node is always kept with its ancestors)."""

    max_drafts: int

    def build(self, candidates: Sequence[tuple[Sequence[int], float]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """-> (draft token ids, parents), topological (breadth of value first); ((), ()) for no candidates."""
        # a trie: node id -> (token, parent node id, weight); children keyed by (parent, token)
        tokens: list[int] = []
        parents: list[int] = []
        weights: list[float] = []
        index: dict[tuple[int, int], int] = {}
        for sequence, weight in candidates:
            parent = ROOT
            for token in sequence:
                node = index.get((parent, token))
                if node is None:
                    node = index[(parent, token)] = len(tokens)
                    tokens.append(int(token))
                    parents.append(parent)
                    weights.append(0.0)
                weights[node] += weight
                parent = node
        if not tokens:
            return (), ()
        node_depths = [_depth(parents, node) for node in range(len(tokens))]
        values = [weight * DEPTH_DECAY ** (depth - 1) for weight, depth in zip(weights, node_depths)]
        # A child is never worth more than its parent and sorts after it on a tie (a later node id), so the most
        # valuable nodes are a tree.
        chosen = sorted(range(len(tokens)), key=lambda node: (-values[node], node))[:self.max_drafts]
        chosen_set = set(chosen)
        chosen = [node for node in chosen if parents[node] == ROOT or parents[node] in chosen_set]
        order = sorted(chosen, key=lambda node: (node_depths[node], -values[node], node))
        position = {node: slot for slot, node in enumerate(order)}
        return (tuple(tokens[node] for node in order),
                tuple(ROOT if parents[node] == ROOT else position[parents[node]] for node in order))


def _depth(parents: list[int], node: int) -> int:
    depth = 0
    while node != ROOT:
        node = parents[node]
        depth += 1
    return depth
