"""One dataclass config per job; its command line is derived from it.

Each field becomes a flag (`per_class` → `--per-class`); the field's type gives
the parser, its default the default, and its `help` metadata the help text.
`__post_init__` of the config validates values and raises `UserError`, so a bad
flag gets one clear line and exit status 2 from `run_job`, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from typing import Any, Callable, TypeVar

from skindual.errors import UserError, user_error_in

C = TypeVar("C")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (and, through `choices=`, its allowed values)."""
    metadata = {"help": help, **kwargs}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(cfg: Any, at_least_one: tuple[str, ...] = ()) -> None:
    """The checks job configs share, also when built in code rather than from flags: each field in
    `at_least_one` is ≥ 1, and each field declared with ``choices=`` holds one of them."""
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(cfg, f.name) not in choices:
            raise UserError(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r}: choose one of "
                            f"{', '.join(map(str, choices))}")


def _parser_for(tp: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(value parser, is_bool) for a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parser_for(args[0]) if len(args) == 1 else (str, False)
    if tp is bool:
        return None, True
    if tp in (int, float, str):
        return tp, False
    return str, False


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the job's docstring (its usage examples) kept as written."""


def build_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parse, is_bool = _parser_for(hints[f.name])
        help_text = f.metadata.get("help", "")
        if is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=parse, default=default, help=help_text, choices=f.metadata.get("choices"),
                                metavar=f.metadata.get("metavar"))
    return parser


def parse_config(config_cls: type[C], argv: list[str] | None, description: str) -> C:
    args = build_parser(config_cls, description).parse_args(argv)
    return config_cls(**vars(args))


def run_job(main: Callable[[C], Any], config_cls: type[C], description: str, argv: list[str] | None = None) -> int:
    """Parse the config, run `main(config)`; a `UserError` (also one raised on a Ray worker) becomes one line on
    stderr and exit status 2."""
    logging.basicConfig(level=os.environ.get("SKINDUAL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(config_cls, argv, description)
        main(config)
    except Exception as exc:  # noqa: BLE001 - a user's mistake is one line, wherever it was raised; the rest re-raises
        err = user_error_in(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

