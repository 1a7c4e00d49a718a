"""The `peftkit` command: parse arguments, call one function, turn user errors into exit code 2."""

from __future__ import annotations

import logging
import sys

from peftkit.cli.parser import build_parser
from peftkit.errors import PeftkitError


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftkit` console script and `python -m peftkit`."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # Overrides may come anywhere on the line (`peftkit eval CONF --adapter RUN key=value`): argparse leaves
    # those after an option unparsed, so they are taken here; anything else unknown is still an error.
    takes_overrides = hasattr(args, "overrides")
    stray = [u for u in unknown if not (takes_overrides and "=" in u and not u.startswith("-"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    logging.basicConfig(level=logging.INFO, format="[peftkit] %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except PeftkitError as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130
