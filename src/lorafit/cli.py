"""Command-line interface (placeholder until the CLI issue lands)."""

from __future__ import annotations

import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    print(f"lorafit {__version__}\nusage: python -m lorafit  (the train/plan/merge/inspect commands are coming)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
