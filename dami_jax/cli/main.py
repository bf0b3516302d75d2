"""The ``dami-jax`` entry point: the parser (each group of commands in a module of its own) and
how errors, Ctrl-C and exit codes reach the user."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable

from dami_jax import __version__
from dami_jax.cli import dami, generate, serve, tailorkv
from dami_jax.cli.common import Formatter, Interrupted, Parser
from dami_jax.errors import InputError, MissingExtraError
from dami_jax.evals.records import StaleResultsError

GROUPS = (generate, dami, tailorkv, serve)  # the order of --help


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each group's module registers its commands."""
    parser = Parser(
        prog="dami-jax", formatter_class=Formatter, epilog="'dami-jax COMMAND --help' describes each command.",
        description="Dynamic model interpolation (DAMI) and tailored KV caches (TailorKV) for reasoning LLMs, in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"dami-jax {__version__}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks (also DAMI_JAX_DEBUG=1)")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also DAMI_JAX_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, help: str, run: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[debug], formatter_class=Formatter)
        p.set_defaults(run=run)
        return p

    for group in GROUPS:
        group.register(command)
    return parser


# --------------------------------------------------------------------------- entry point


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("DAMI_JAX_DEBUG", "") not in ("", "0")
    try:
        args.run(args)
    except (Interrupted, KeyboardInterrupt) as e:
        kept = str(e) if isinstance(e, Interrupted) else "nothing was saved"
        print(f"dami-jax: interrupted; {kept}", file=sys.stderr)
        return 130
    except StaleResultsError as e:
        if debug:
            traceback.print_exc()
        print(f"dami-jax: error: {e.folder} holds results made with other settings ({e.listed}); "
              "use another --out, or add --fresh to move them aside", file=sys.stderr)  # fmt: skip
        return 2
    except (InputError, MissingExtraError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"dami-jax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    """The ``dami-jax`` script. After Ctrl-C it exits without interpreter teardown: XLA's worker
    threads may still be inside a computation, and tearing Python down under them can crash."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
