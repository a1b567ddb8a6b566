"""The prefill -> decode KV handoff: one protocol (reserve -> prefill -> transfer -> commit / release).

decode.py: the decode replica's side (DecodeHandoff); prefill.py: the prefill replica's side (PrefillHandoff)
and an in-process prefill client; local.py: the same steps between two plain Engines, no network (evals);
records.py: what crosses between them.
"""
