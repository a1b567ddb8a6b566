"""Moving a stream to another decode replica when its replica dies mid-stream (DESIGN §4 failure rules).

The new replica gets the prompt with the tokens the client already has forced: they are computed one decode step
each, through the same kernels as on the lost replica, so a greedy (or seeded) stream continues with exactly the
tokens an undisturbed run gives. Re-prefilling prompt + tokens in one pass is faster but rounds differently and can
flip a near-tie (measured: docs/kv-handoff.md); it is used only past `migration_replay_max_tokens`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError

from cluster.records import DecodeRequest
from workers.outputs import RequestOutput

# A replica that vanished mid-stream (killed, OOM, node lost): the request itself is fine, move it.
REPLICA_LOST = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)


def resume_request(request: DecodeRequest, generated: list[int], replay_max_tokens: int
                   ) -> tuple[DecodeRequest, int]:
    """The request to send a (new) decode replica, and how many of its first tokens the client already has."""
    if not generated:
        return request, 0
    if len(generated) <= replay_max_tokens:
        forced = dataclasses.replace(request.params, forced_token_ids=tuple(generated))
        return dataclasses.replace(request, params=forced), len(generated)
    return dataclasses.replace(
        request, prompt_token_ids=request.prompt_token_ids + generated,
        params=dataclasses.replace(request.params, max_tokens=request.params.max_tokens - len(generated))), 0


@dataclass
class Replay:
    """A migrated stream's first outputs re-decode tokens the client already has (teacher-forced): drop them, and
    once they end send the text the client has not seen yet (what the lost replica held back: a partial character,
    a possible stop string), computed on the replayed text as a whole so outputs of any size split right."""

    num_tokens: int
    text_sent: str
    text_replayed: str = ""

    def __post_init__(self) -> None:
        self.done = self.num_tokens == 0

    def strip(self, output: RequestOutput) -> RequestOutput | None:
        if self.done:
            return output
        skipped = min(self.num_tokens, len(output.new_token_ids))
        self.num_tokens -= skipped
        self.text_replayed += output.new_text
        if self.num_tokens > 0 and not output.finished:
            return None
        self.done = True
        text = self.text_replayed[len(self.text_sent):] if self.text_replayed.startswith(self.text_sent) else ""
        return dataclasses.replace(output, new_token_ids=output.new_token_ids[skipped:], new_text=text,
                                   logprobs=output.logprobs[skipped:])
