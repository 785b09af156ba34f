"""`python -m pipeline.techniques [NAME ...] [--markdown]`: list the registered techniques, each with
its family, paper, outputs (kind and shape), needs, how it runs and its options with their defaults;
`--markdown` prints the README's reference table instead. Exit code 2 for an unknown name."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from pipeline.techniques.catalog import catalog, describe, markdown, text


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.techniques", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help="techniques to list (default: all of them)")
    parser.add_argument("--markdown", action="store_true", help="print the README's reference table")
    args = parser.parse_args(argv)
    try:
        entries = [describe(name) for name in args.names] if args.names else catalog()
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown(entries) if args.markdown else text(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
