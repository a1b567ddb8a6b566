"""Speculative decoding (issue 16 builds it here): drafters behind one `Drafter` interface (n-gram, draft model,
EAGLE-3/3.1, MTP, block/JetSpec) and the verifier.

Where it plugs in: a drafter proposes tokens for a running request between steps; the scheduler puts them in
`ScheduledRequest.draft_token_ids` (workers/step.py) and allocates their slots like any other new tokens (the
"num_computed_tokens catches up" rule covers them); the runner scores them in the same forward pass; the
verifier (rejection sampling, workers/sampler.py) accepts a prefix; Scheduler.update appends the accepted
tokens and rolls num_computed_tokens back past the rejected ones.
"""
