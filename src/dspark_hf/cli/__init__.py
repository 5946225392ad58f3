"""`dspark-hf` command line.

Subcommands live in a registry (`COMMANDS`); add one with [`register_command`]:

    def add_arguments(parser): parser.add_argument("--foo")
    def run(args): ...
    register_command("my-command", "What it does.", add_arguments, run)

Every subcommand accepts `--config FILE` (JSON, or YAML when PyYAML is installed): its keys are the option names
(`max_new_tokens` or `max-new-tokens`) and set defaults that explicit command-line flags override.

The built-in subcommands are the modules of this package (one each, with `NAME`, `HELP`, `add_arguments` and
`run`); each parses its options, calls the library and prints or writes the result.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cache_features, calibrate, demo, draft_vocab, prepare_data, profile, serve, train
from . import eval as eval_command  # bound under another name: `eval` would shadow the builtin

__all__ = [
    "COMMANDS",
    "Command",
    "build_parser",
    "load_config",
    "main",
    "register_command",
    "run_command",
]


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]


COMMANDS: dict[str, Command] = {}


def register_command(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], Any],
) -> None:
    """Adds (or replaces) a `dspark-hf <name>` subcommand."""
    COMMANDS[name] = Command(name, help, add_arguments, run)


for _module in (prepare_data, cache_features, draft_vocab, train, demo, eval_command, calibrate, profile, serve):
    register_command(_module.NAME, _module.HELP, _module.add_arguments, _module.run)


def load_config(path: str | os.PathLike) -> dict:
    """A flat option mapping from a JSON or YAML file (YAML needs PyYAML)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:  # pragma: no cover
            raise SystemExit(
                f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON."
            ) from error
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path} must hold a mapping of option names to values.")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspark-hf", description="DSpark speculative decoding for transformers."
    )
    parser.add_argument(
        "--debug", action="store_true", help="On an error, show the full Python traceback instead of one line."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser._dspark_subparsers = {}
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        sub.add_argument(
            "--config", help="JSON/YAML file of option defaults (command-line flags override it)."
        )
        command.add_arguments(sub)
        sub.set_defaults(_command=command)
        parser._dspark_subparsers[command.name] = sub
    return parser


def _apply_config(sub: argparse.ArgumentParser, config: dict) -> None:
    dests = {action.dest for action in sub._actions}
    defaults = {}
    for key, value in config.items():
        dest = key.replace("-", "_")
        if dest not in dests or dest in ("help", "config"):
            raise SystemExit(f"--config: unknown option {key!r} for this command.")
        defaults[dest] = value
    sub.set_defaults(**defaults)


def run_command(argv: list[str] | None = None) -> Any:
    """Parses `argv` like `dspark-hf` and returns the subcommand's result (e.g. the trainer of `train`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return None
    if args.config:
        _apply_config(parser._dspark_subparsers[args.command], load_config(args.config))
        args = parser.parse_args(argv)
    return args._command.run(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dspark-hf` console script; returns the exit status (results: [`run_command`]).

    A subcommand that returns an `int` sets the exit status; any other result means success. An error is printed as
    one line naming the command and the problem, with exit status 1 (130 when interrupted); `dspark-hf --debug ...`
    lets the traceback through instead.
    """
    arguments = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in arguments[: next((i for i, a in enumerate(arguments) if a in COMMANDS), len(arguments))]
    try:
        result = run_command(arguments)
    except KeyboardInterrupt:
        print("dspark-hf: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback, unless --debug
        if debug:
            raise
        command = next((a for a in arguments if a in COMMANDS), None)
        where = f"dspark-hf {command}" if command else "dspark-hf"
        print(f"{where}: error: {_describe(error)} (run with `dspark-hf --debug ...` for the traceback)", file=sys.stderr)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _describe(error: BaseException) -> str:
    """`error` as one line: its message, or its type when the message is empty; a missing file names its path."""
    if isinstance(error, FileNotFoundError) and error.filename:
        return f"no such file or directory: {error.filename}"
    message = " ".join(str(error).split())
    return message if message else type(error).__name__
