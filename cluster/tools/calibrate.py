"""`tierserve calibrate`: write a KV calibration file for gtq-* and fractional tq-* codecs (the offline half of a
two-phase codec; the engine loads the file at start-up through `EngineConfig.kv_calibration`)."""

from __future__ import annotations

import argparse
import sys

WINDOW_TOKENS = 512


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from cluster.tools.eval_kv import calibration_windows
    from workers.kv.calibration import calibrate
    from workers.model.loader import load_model

    loaded = load_model(args.model, dtype=torch.float32, device="cpu")
    if args.text:
        token_ids = loaded.tokenizer.encode(open(args.text, encoding="utf-8").read())
        windows = [token_ids[i:i + WINDOW_TOKENS]
                   for i in range(0, len(token_ids) - WINDOW_TOKENS + 1, WINDOW_TOKENS)][: args.windows]
        if not windows:
            print(f"error: --text {args.text} has fewer than {WINDOW_TOKENS} tokens", file=sys.stderr)
            return 2
    else:
        windows = calibration_windows(loaded.tokenizer, num_windows=args.windows)
    calibration = calibrate(loaded.model, windows)
    calibration.save(args.out)
    print(f"wrote {args.out}: {calibration.num_tokens} tokens, digest {calibration.digest()}")
    return 0
