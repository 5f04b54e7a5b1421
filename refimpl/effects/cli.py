"""``python -m refimpl effects``: run, list or check the effects table from the command line."""

from __future__ import annotations

import argparse
import sys

from refimpl import runtime
from refimpl.effects import check, run
from refimpl.effects.registry import NOT_A_ROW, ROWS, select_rows


def list_rows() -> str:
    """The registry as text: every row with its family, methods, settings and needs; then the
    taxonomy's implemented methods that are not rows, with the reason."""
    lines = []
    for row in ROWS:
        needs = [f"calibration: {row.calibration}" if row.calibration else "",
                 f"training: {row.training}" if row.training else "", f"kernel: {row.kernel}"]
        lines.append(f"{row.id:<32} {row.family:<26} {row.method}\n    {row.settings}\n    "
                     + "; ".join(n for n in needs if n))
    lines.append("\nnot rows:")
    lines += [f"  {method_id:<28} {reason}" for method_id, reason in NOT_A_ROW.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m refimpl effects --model NAME --out DIR [--methods a,b] [--device D] [--train]
    [--threads N] [--list] [--check TABLE.csv]``."""
    parser = argparse.ArgumentParser(prog="python -m refimpl effects", description="every method applied to one model and measured: one table")
    parser.add_argument("--model", default="smollm2-135m", help="shipped alias, local folder or hub id")
    parser.add_argument("--out", help="folder for <model>.csv, .md and .json (required unless --list or --check)")
    parser.add_argument("--methods", help="comma-separated row ids, taxonomy ids or families (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--train", action="store_true", help="train what a row needs and the cache lacks")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    parser.add_argument("--check", metavar="TABLE", help="recompute a sample of TABLE's rows (--methods: which) "
                        "and compare; exit status 1 if they differ")
    args = parser.parse_args(argv)
    if args.list:
        print(list_rows())
        return 0
    command = [sys.argv[0]] + list(argv) if argv is not None else None
    try:
        runtime.resolve_device(args.device)
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive int, got {args.threads}")
        if args.check:
            rows = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
            checks = check.check_table(args.check, rows=rows, device=args.device)
            print(check.format_checks(checks))
            return 0 if all(c.ok for c in checks) else 1
        if not args.out:
            parser.error("--out is required (a folder for the table)")
        select_rows(args.methods)
        run.check_out(args.out)
    except ValueError as exc:
        parser.error(str(exc))
    run.run_effects(args.out, args.model, args.methods, args.device, args.train, threads=args.threads, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
