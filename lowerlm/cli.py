"""The ``lowerlm`` command line. Errors a user can fix print one line and exit with code 2."""

from __future__ import annotations

import argparse
import sys


def _cmd_passes(args) -> int:
    from lowerlm.passes import PASS_DOCS, PIPELINE

    default = {name for name, _ in PIPELINE}
    for name, doc in PASS_DOCS.items():
        print(f"{name:24s} {'default' if name in default else '       '}  {doc}")
    return 0


def _cmd_dump_ir(args) -> int:
    from lowerlm.errors import LowerlmError
    from lowerlm.ir import parse_module, print_module
    from lowerlm.ir.nx import to_dot
    from lowerlm.passes import PASSES, dump_header, run_pipeline

    if args.after not in ("all", "none") and args.after not in PASSES:
        raise LowerlmError(f"unknown pass '{args.after}'; known passes: {', '.join(PASSES)}")
    try:
        with open(args.ir, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise LowerlmError(f"cannot read IR file '{args.ir}': {e.strerror}") from None
    module = parse_module(text)

    def show(title: str, m) -> None:
        print(title)
        if args.format == "dot":
            for g in m.graphs:
                print(to_dot(g), end="")
        else:
            print(print_module(m), end="")

    if args.after in ("all", "none"):
        show("// imported", module)

    def on_pass(record) -> None:
        if args.after in ("all", record.name):
            show(dump_header(record), record.module)

    run_pipeline(module, passes="none" if args.after == "none" else "default", dump=set(), on_pass=on_pass)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowerlm", description="Lower PyTorch language models to fast kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list the passes, in pipeline order").set_defaults(fn=_cmd_passes)
    d = sub.add_parser("dump-ir", help="print the IR after each pass (or one named pass)")
    d.add_argument("--ir", required=True, help="a file of IR text to run the pipeline on")
    d.add_argument("--after", default="all", help="'all', 'none' (as imported) or a pass name")
    d.add_argument("--format", choices=("text", "dot"), default="text")
    d.set_defaults(fn=_cmd_dump_ir)
    return p


def main(argv: list[str] | None = None) -> int:
    from lowerlm.errors import LowerlmError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except LowerlmError as e:
        print(f"lowerlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
