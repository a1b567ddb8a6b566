"""`tierserve` command line. Heavy imports happen inside each command so `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
import time

from cluster.flags import add_engine_options, add_sampling_options, engine_config, sampling_params
from cluster.serve_cmd import add_parsers as add_serve_parsers
from cluster.tools.commands import add_parsers as add_tool_parsers

USAGE_ERRORS = (FileNotFoundError, ValueError)  # missing/corrupt model, unsupported arch, bad request


def cmd_run(args: argparse.Namespace) -> int:
    from workers.engine import Engine

    params = sampling_params(args)
    started = time.perf_counter()
    engine = Engine(engine_config(args))
    print(f"[tierserve] loaded {engine.loaded.path} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    engine.add_request("cli", prompt=prompt, params=params)
    token_ids: list[int] = []
    logprobs = []
    text = ""
    finish_reason = None
    first_token_at = None
    started = time.perf_counter()
    while engine.has_unfinished():
        for output in engine.step():
            if first_token_at is None and output.new_token_ids:
                first_token_at = time.perf_counter()
            token_ids.extend(output.new_token_ids)
            logprobs.extend(output.logprobs)
            text += output.new_text
            if not args.json:
                sys.stdout.write(output.new_text)
                sys.stdout.flush()
            if output.finished:
                finish_reason = output.finish_reason.value
    elapsed = time.perf_counter() - started
    if args.json:
        json.dump({"text": text, "token_ids": token_ids, "finish_reason": finish_reason,
                   "logprobs": [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in logprobs]},
                  sys.stdout)
    sys.stdout.write("\n")
    decode_rate = (len(token_ids) - 1) / (elapsed - (first_token_at - started)) if len(token_ids) > 1 else 0.0
    print(f"[tierserve] {len(token_ids)} tokens, finish={finish_reason}, TTFT {(first_token_at - started) * 1e3:.0f} ms, "
          f"decode {decode_rate:.1f} tok/s", file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from cluster.config import ServeConfig

    try:
        config = ServeConfig.from_yaml(args.file) if args.file else ServeConfig()
    except ValidationError as exc:
        print(f"tierserve: invalid config {args.file}:\n{exc}", file=sys.stderr)
        return 2
    if args.action == "show":
        sys.stdout.write(config.to_yaml())
    else:
        print(f"{args.file or 'defaults'}: OK ({config.mode}, decode tiers: "
              f"{', '.join(t.name for t in config.decode_tiers)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierserve", description="Disaggregated LLM serving (see README)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate in-process (no Ray), streaming to stdout")
    run.add_argument("prompt")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--system", default=None, help="system message (with --chat)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_engine_options(run)
    add_sampling_options(run)
    run.set_defaults(func=cmd_run)

    add_tool_parsers(sub)
    add_serve_parsers(sub)

    config = sub.add_parser("config", help="show the effective serve config, or validate a YAML file")
    config.add_argument("action", choices=["show", "validate"])
    config.add_argument("file", nargs="?", default=None)
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USAGE_ERRORS as exc:
        print(f"tierserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
