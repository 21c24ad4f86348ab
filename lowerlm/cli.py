"""The ``lowerlm`` command line. Errors a user can fix print one line and exit with code 2."""

from __future__ import annotations

import argparse
import difflib
import sys


def _progress(msg: str) -> None:
    print(f"lowerlm: {msg}", file=sys.stderr, flush=True)


def _cmd_passes(args) -> int:
    from lowerlm.passes import PASS_DOCS, PIPELINE

    default = {name for name, _ in PIPELINE}
    for name, doc in PASS_DOCS.items():
        print(f"{name:24s} {'default' if name in default else '       '}  {doc}")
    return 0


def _stages(args) -> list:
    """(header, module) for the import and after each pass of the default pipeline."""
    from lowerlm.errors import LowerlmError
    from lowerlm.ir import parse_module
    from lowerlm.passes import dump_header, run_pipeline

    if args.ir:
        try:
            with open(args.ir, encoding="utf-8") as f:
                module = parse_module(f.read())
        except OSError as e:
            raise LowerlmError(f"cannot read IR file '{args.ir}': {e.strerror}") from None
        records: list = []
        run_pipeline(module, dump=set(), on_pass=records.append)
        return [("// imported", module)] + [(dump_header(r), r.module) for r in records]
    import lowerlm

    model = lowerlm.load(args.model, progress=_progress)
    return lowerlm.compile_model(model, progress=_progress).stages()


def _cmd_dump_ir(args) -> int:
    from lowerlm.errors import LowerlmError
    from lowerlm.ir import print_module
    from lowerlm.ir.nx import to_dot
    from lowerlm.passes import PASSES

    if args.after not in ("all", "none") and args.after not in PASSES:
        raise LowerlmError(f"unknown pass '{args.after}'; known passes: {', '.join(PASSES)} (see `lowerlm passes`)")
    stages = _stages(args)

    def text(module) -> str:
        if args.format == "dot":
            return "".join(to_dot(g) for g in module.graphs)
        return print_module(module)

    for i, (header, module) in enumerate(stages):
        name = header.split()[2] if header.startswith("// after") else "none"
        if args.after != "all" and name != args.after:
            continue
        print(header)
        if args.diff and i > 0:
            before = text(stages[i - 1][1]).splitlines(keepends=True)
            sys.stdout.writelines(difflib.unified_diff(before, text(module).splitlines(keepends=True),
                                                       stages[i - 1][0][3:], header[3:]))
        else:
            print(text(module), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowerlm", description="Lower PyTorch language models to fast kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("passes", help="list the passes, in pipeline order").set_defaults(fn=_cmd_passes)
    d = sub.add_parser("dump-ir", help="print the IR as imported and after each pass (or one named pass)")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf file or an HF model folder")
    src.add_argument("--ir", help="a file of IR text to run the pipeline on instead of a model")
    d.add_argument("--after", default="all", help="'all', 'none' (as imported) or a pass name")
    d.add_argument("--format", choices=("text", "dot"), default="text")
    d.add_argument("--diff", action="store_true", help="show each stage as a diff against the one before")
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
