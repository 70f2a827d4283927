"""The `lcmkit` command line: the subcommands (one module each in lcmkit.app, holding its options dataclass,
`add_parser` and `run`), and the mapping of errors to one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Callable

from lcmkit.app import bench, cache, demo, distill, export, generate, info, presets, push, serve, toy
from lcmkit.app import eval as evaluate
from lcmkit.app.flags import Parser
from lcmkit.errors import ConfigError
from lcmkit.outputs.hub import PushError

EXIT_USAGE = 2
EXIT_FAULT = 1
COMMANDS = (distill, cache, serve, presets, push, generate, export, info, evaluate, bench, demo, toy)
"""The command modules, in the order `lcmkit --help` lists them."""
EXIT_TERMINATED = 128 + 15
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Terminated(KeyboardInterrupt):
    """SIGTERM (what job schedulers and `kill` send), raised like Ctrl-C so that every cleanup runs: the run lock
    is released and a distill run stays resumable from its last checkpoint."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def join_negative_numbers(argv: list[str]) -> list[str]:
    """`--learning-rate -1e-4` -> `--learning-rate=-1e-4`: argparse takes a token like -1e-4 for an option, so a
    negative value would never reach the validator that says what is wrong with it."""
    out: list[str] = []
    for token in argv:
        if out and NEGATIVE_NUMBER.match(token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def build_parser() -> Parser:
    from lcmkit import __version__

    parser = Parser(prog="lcmkit", description="Latent Consistency Distillation for SD / SDXL")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    parser.add_argument("--version", action="version", version=f"lcmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _quiet_libraries(verbose: bool) -> None:
    """Our own progress bars and one-line errors only: no loading bars or advisory warnings from the libraries."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    if verbose:
        return
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:  # `lcmkit presets | head`: end quietly like other CLI tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(join_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="lcmkit: %(message)s")
    _quiet_libraries(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return func(args)
    except ConfigError as e:
        print(f"lcmkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PushError as e:
        print(f"lcmkit: error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("lcmkit: stopped by SIGTERM (a distill run continues from its last checkpoint with --resume latest)",
              file=sys.stderr)  # fmt: skip
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("lcmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # faults raised inside the run: one line each (-v shows the traceback)
        from lcmkit.data import DataError
        from lcmkit.errors import os_error_text
        from lcmkit.train.session import PeerFailed, TrainingError

        if isinstance(e, PeerFailed):  # the process that failed has said why
            return EXIT_FAULT
        if isinstance(e, (DataError, TrainingError, OSError)) and not args.verbose:
            text = os_error_text(e) if isinstance(e, OSError) else str(e)
            print(f"lcmkit: error: {text}", file=sys.stderr)
            return EXIT_USAGE if isinstance(e, DataError) else EXIT_FAULT
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
