"""``python -m refimpl <command> ...``: the package's command-line tools.

Commands: ``effects`` (the effects table, :mod:`refimpl.effects`) and ``bench`` (the GPU benchmarks,
:mod:`refimpl.bench`). ``python -m refimpl <command> --help`` describes each.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"effects": ("refimpl.effects.cli", "every method applied to one model and measured: one table"),
            "bench": ("refimpl.bench.run", "GPU benchmarks of kernels and decoding against the bandwidth roofline")}


def usage() -> str:
    lines = ["usage: python -m refimpl <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``argv[0]``'s command with the rest of ``argv`` (default: ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"{usage()}\n\nunknown command {command!r}: choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    result = importlib.import_module(COMMANDS[command][0]).main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
