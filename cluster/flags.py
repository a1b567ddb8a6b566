"""Command-line flags derived from the configuration models: one source for every default.

A flag is named after its field (`max_num_seqs` -> `--max-num-seqs`, `kv_eviction.policy` ->
`--kv-eviction-policy`), takes its help and shown default from the field, its choices from a Literal; booleans get
`--x/--no-x`. A flag left off the command line stays None and is not passed on, so the model's own default applies
(and a value from a YAML file is not overridden by a flag's default). Older, shorter names stay as aliases.
Fields that are lists or mappings (tiers, per-tier overrides) are YAML only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cluster.config import ServeConfig
from workers.config import EngineConfig
from workers.sampling_params import SamplingParams

ENGINE_ALIASES = {"num_threads": ("--threads",), "enable_prefix_caching": ("--prefix-caching",),
                  "kv_eviction.policy": ("--kv-eviction",), "kv_eviction.budget": ("--kv-budget",),
                  "kv_eviction.budget_blocks": ("--kv-budget-blocks",)}
# role: the deployment sets it (prefill, decode or unified; `run` is unified); expert_parallel: only an
# expert-parallel decode tier reads it (YAML, per tier)
ENGINE_SKIP = frozenset({"role", "expert_parallel"})
SERVE_SKIP = frozenset({"engine", "prefill", "decode_tiers"})  # nested per-tier settings: YAML only
# The command line's one departure from SamplingParams' defaults: a run is reproducible (greedy) unless
# --temperature is given.
CLI_SAMPLING_DEFAULTS = {"temperature": 0.0}
RUN_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "logprobs")


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]  # the field's path in the model: ("kv_eviction", "policy")
    info: FieldInfo
    kind: Any  # the field's type without None

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def dest(self) -> str:
        return "_".join(self.path)

    @property
    def option(self) -> str:
        return "--" + "-".join(self.path).replace("_", "-")


def without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(",") if item.strip())


def _parser(kind: Any) -> Callable[[str], Any] | None:
    """How a flag's text becomes the field's value; None: not a flag (lists, mappings)."""
    if typing.get_origin(kind) is Literal:
        return type(typing.get_args(kind)[0])
    if kind in (int, float, str, bool):
        return kind
    if typing.get_origin(kind) is tuple and typing.get_args(kind) == (int, Ellipsis):
        return _int_list
    return None


def model_flags(model: type[BaseModel], skip: frozenset[str] = frozenset(), prefix: tuple[str, ...] = ()
                ) -> list[Flag]:
    flags = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        kind = without_none(info.annotation)
        if ".".join(path) in skip:
            continue
        if is_model(kind):
            flags += model_flags(kind, skip, path)
        elif _parser(kind) is not None:
            flags.append(Flag(path, info, kind))
    return flags


def format_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value) or "none"
    return str(value)


def _help(description: str | None, default: Any) -> str:
    text = f"{description} (default: {format_default(default)})" if description else \
        f"default: {format_default(default)}"
    return text.replace("%", "%%")  # argparse formats help with %


def add_flags(group: argparse._ActionsContainer, flags: list[Flag],
              aliases: dict[str, tuple[str, ...]] | None = None) -> None:
    for flag in flags:
        names = (flag.option, *(aliases or {}).get(flag.name, ()))
        help_text = _help(flag.info.description, flag.info.get_default(call_default_factory=True))
        if flag.kind is bool:
            group.add_argument(*names, dest=flag.dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            continue
        choices = typing.get_args(flag.kind) if typing.get_origin(flag.kind) is Literal else None
        metavar = "N,N,..." if _parser(flag.kind) is _int_list else None
        group.add_argument(*names, dest=flag.dest, type=_parser(flag.kind), choices=choices, default=None,
                           metavar=metavar, help=help_text)


def given_values(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """The values given on the command line, nested as the model's fields are."""
    values: dict[str, Any] = {}
    for flag in flags:
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        node = values
        for key in flag.path[:-1]:
            node = node.setdefault(key, {})
        node[flag.path[-1]] = value
    return values


# ---- the commands' option groups --------------------------------------------------------------------------
def engine_flags(only: frozenset[str] | None = None) -> list[Flag]:
    flags = model_flags(EngineConfig, ENGINE_SKIP)
    return [flag for flag in flags if only is None or flag.name in only]


def add_engine_options(parser: argparse.ArgumentParser, only: frozenset[str] | None = None) -> None:
    add_flags(parser.add_argument_group("engine"), engine_flags(only), ENGINE_ALIASES)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.model_validate(given_values(args, engine_flags()))


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    add_flags(parser.add_argument_group("serve config (overrides --config)"), model_flags(ServeConfig, SERVE_SKIP))


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return given_values(args, model_flags(ServeConfig, SERVE_SKIP))


def add_sampling_options(parser: argparse.ArgumentParser, names: tuple[str, ...] = RUN_SAMPLING) -> None:
    group = parser.add_argument_group("sampling")
    hints = typing.get_type_hints(SamplingParams)
    for field in dataclasses.fields(SamplingParams):
        if field.name not in names:
            continue
        option = "--" + field.name.replace("_", "-")
        default = CLI_SAMPLING_DEFAULTS.get(field.name, field.default)
        help_text = _help(field.metadata.get("description"), default)
        if field.name == "stop":
            group.add_argument(option, action="append", default=[], help=field.metadata["description"])
        elif hints[field.name] is bool:
            group.add_argument(option, action="store_true", help=help_text)
        else:
            group.add_argument(option, type=without_none(hints[field.name]), default=default, help=help_text)


def sampling_params(args: argparse.Namespace, names: tuple[str, ...] = RUN_SAMPLING) -> SamplingParams:
    values = {name: getattr(args, name) for name in names}
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    return SamplingParams(**values)
