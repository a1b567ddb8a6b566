"""Speculative decoding: a drafter proposes, the target verifies k drafts in one pass, the output is plain decoding's.

    drafter.py        the Drafter interface (propose / forget), DraftRequest, Draft, PromptFeatures
    ngram.py          prompt lookup (no weights)
    draft_model.py    a smaller same-vocabulary model with its own paged KV, mirrors rolled back by length
    eagle3.py         the EAGLE-3 head (vLLM / SGLang checkpoint layout; EAGLE 3.1 options)
    eagle3_drafter.py drafting with the head over the target's captured states
    eagle3_train.py   the training-time-test trainer (`tierserve train-drafter eagle3`)
    prompt_features.py the prefill tier's capture of what an EAGLE-3 decode tier reads of the prompt
    verify.py         greedy acceptance and rejection sampling (the target distribution is kept)
    policy.py         how many drafts: batch back-off, per-request acceptance
    speculator.py     the step hook: propose before schedule, statistics after the step

Where it plugs in: the Speculator leaves drafts on each decoding Sequence; the scheduler schedules them with the
decode (budget and pool permitting) as `ScheduledRequest.draft_token_ids`; the runner computes them as k + 1
decode rows (causal by construction: every row's K/V is written before any row attends) and verifies them;
Scheduler.update advances num_computed_tokens past the accepted drafts only: the rejected slots are overwritten
by the next step and never published to the prefix cache.
"""
