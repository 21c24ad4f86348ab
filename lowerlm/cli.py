"""The ``lowerlm`` command line. Errors a user can fix print one line and exit with code 2."""

from __future__ import annotations

import argparse
import difflib
import sys


def _progress(msg: str) -> None:
    print(f"lowerlm: {msg}", file=sys.stderr, flush=True)


def _cmd_passes(args) -> int:
    from lowerlm.passes import PASS_DOCS, PIPELINE

    for name, fn in PIPELINE:
        # upcast runs when a bf16/f16 model is computed in f32, arm when calibration data is given
        kind = "default" if fn is not None else "dtype  " if name == "upcast" else "data   "
        print(f"{name:24s} {kind}  {PASS_DOCS[name]}")
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
    cm = lowerlm.compile_model(model, backend=args.backend, progress=_progress)
    stages = cm.stages()
    if hasattr(cm.program, "plan") and args.backend == "auto":
        lines = [f"//   {line}" for line in cm.program.describe()]
        stages.append(("// backend plan (auto)\n" + "\n".join(lines), None))
    return stages


def _cmd_dump_ir(args) -> int:
    from lowerlm.errors import LowerlmError
    from lowerlm.ir import print_module
    from lowerlm.ir.nx import to_dot
    from lowerlm.passes import PASSES

    if args.after == "arm":
        raise LowerlmError("arm runs only with calibration data, which dump-ir does not take; use "
                           "lowerlm.compile_model(model, arm=lowerlm.calibrate(model)).dump(after='arm')")
    if args.after not in ("all", "none") and args.after not in PASSES:
        raise LowerlmError(f"unknown pass '{args.after}'; known passes: {', '.join(PASSES)} (see `lowerlm passes`)")
    stages = _stages(args)

    def text(module) -> str:
        if args.format == "dot":
            return "".join(to_dot(g) for g in module.graphs)
        return print_module(module)

    for i, (header, module) in enumerate(stages):
        if module is None:  # a report, not an IR stage
            print(header)
            continue
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


def _cmd_generate(args) -> int:
    import time

    import lowerlm
    from lowerlm.errors import InputError

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if any(not p.strip() for p in args.prompt):
        raise InputError("the prompt is empty")
    if len(args.prompt) > args.max_batch:
        raise InputError(f"{len(args.prompt)} prompts are more than --max-batch {args.max_batch}")
    model = lowerlm.load(args.model, progress=_progress)
    cm = lowerlm.compile_model(model, backend=args.backend, max_seq_len=args.max_seq_len, weight_bits=args.weight_bits,
                               max_batch=args.max_batch, progress=_progress)
    if args.token_ids:
        try:
            prompts = [[int(t) for t in p.replace(",", " ").split()] for p in args.prompt]
        except ValueError:
            raise InputError("--token-ids prompts must be integers separated by commas or spaces") from None
    else:
        from lowerlm.runtime.text import encode

        prompts = [encode(cm.tokenizer, p, chat=not args.raw) for p in args.prompt]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if hasattr(cm.program, "prepare"):
        cm.program.prepare()  # sessions and kernels are built before the clock starts
    start = time.perf_counter()
    count = 0
    if len(prompts) == 1 and cm.tokenizer is not None:
        from lowerlm.runtime.text import StreamDecoder

        decoder = StreamDecoder(cm.tokenizer)
        tokens = []
        for (token,) in cm.generate_ids(prompts, args.max_new_tokens, **sampling):
            count += 1
            tokens.append(token)
            print(decoder.push(token), end="", flush=True)
        print()
        outputs = [tokens]
    else:
        steps = list(cm.generate_ids(prompts, args.max_new_tokens, **sampling))
        outputs = [[s[i] for s in steps if s[i] is not None] for i in range(len(prompts))]
        count = sum(map(len, outputs))
        for i, toks in enumerate(outputs):
            text = cm.tokenizer.decode(toks, skip_special_tokens=True) if cm.tokenizer is not None else toks
            print(f"[{i}] {text}")
    seconds = time.perf_counter() - start
    backend = f"auto: {cm.program.backend}" if args.backend == "auto" else args.backend
    print(f"-- {count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s (lowerlm, {backend} backend)")
    if args.compare_eager:
        _compare_eager(model, prompts, outputs, args)
    return 0


def _compare_eager(model, prompts, outputs, args) -> None:
    """The same greedy generation with transformers' eager generate, timed, and whether the tokens agree."""
    import time

    import torch

    for prompt, ours in zip(prompts, outputs):
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
        theirs = out[0, len(prompt):].tolist()
        same = "identical tokens" if theirs == ours[:len(theirs)] and len(theirs) == len(ours) else \
            "tokens DIFFER"
        print(f"-- {len(theirs)} tokens in {seconds:.2f} s: {len(theirs) / seconds:.1f} tokens/s "
              f"(transformers eager); {same}")


def _cmd_arm_hist(args) -> int:
    import lowerlm
    from lowerlm.arm_report import arm_hist

    model = lowerlm.load(args.model, progress=_progress)
    stats = arm_hist(model, args.layer, args.out, args.sparsity)
    print(f"layer {args.layer}: skew of a {stats['skew_a']:.3f}, skew of a_hat {stats['skew_a_hat']:.3f}; "
          f"tau {stats['tau']:.4g}, mass of a_hat within +-tau {stats['mass_within_tau']:.3f}; wrote {args.out}")
    return 0


def _cmd_arm_eval(args) -> int:
    import lowerlm
    from lowerlm.arm_report import arm_eval, format_rows

    model = lowerlm.load(args.model, progress=_progress)
    sparsities = [float(p) for p in args.sparsities.split(",")]
    print(format_rows(arm_eval(model, sparsities, args.max_tokens)))
    return 0


def _cmd_export_onnx(args) -> int:
    import lowerlm
    from lowerlm.codegen.onnx.export import export

    model = lowerlm.load(args.model, progress=_progress)
    cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=args.max_seq_len, progress=_progress)
    index = export(cm.program, args.out, args.max_seq_len, cm.vocab_size)
    print(f"wrote {', '.join(g.name + '.onnx' for g in cm.ir.graphs)} and {index.name} to {args.out}")
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
    d.add_argument("--backend", default="reference", help="with --model: the backend to compile for ('auto' "
                   "also prints which backend runs each graph)")
    d.set_defaults(fn=_cmd_dump_ir)
    g = sub.add_parser("generate", help="generate text with a compiled model, streaming it")
    g.add_argument("prompt", nargs="+", help="the prompt (several make a batch)")
    g.add_argument("--model", default="smollm2", help="'smollm2' (default), a .gguf file or an HF model folder")
    g.add_argument("--backend", default="auto", help="'auto' (default: ONNX Runtime on a CPU, Triton on a GPU, the "
                   "ops they lack on the reference backend), 'onnx', 'triton' or 'reference' (plain torch, the oracle)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1: off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + generated tokens (default 2048, or a learned position table's rows)")
    g.add_argument("--max-batch", type=int, default=1)
    g.add_argument("--weight-bits", type=int, choices=(4, 8), default=None,
                   help="ONNX backend: quantized projection weights (faster on a CPU, not bit-exact)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--token-ids", action="store_true", help="prompts are token ids separated by commas")
    g.add_argument("--compare-eager", action="store_true",
                   help="also run transformers' eager greedy generate: tokens/s and token agreement")
    g.set_defaults(fn=_cmd_generate)
    h = sub.add_parser("arm-hist", help="histogram of one MLP's activation before and after ARM redistribution")
    h.add_argument("--model", default="smollm2")
    h.add_argument("--layer", type=int, required=True)
    h.add_argument("--out", required=True, help="the PNG to write")
    h.add_argument("--sparsity", type=float, default=0.5)
    h.set_defaults(fn=_cmd_arm_hist)
    e = sub.add_parser("arm-eval", help="held-out perplexity and KL: ARM vs plain thresholding at equal bytes")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7")
    e.add_argument("--max-tokens", type=int, default=1024, help="held-out tokens to score")
    e.set_defaults(fn=_cmd_arm_eval)
    x = sub.add_parser("export-onnx", help="standalone ONNX models (prefill, decode) and a JSON of their I/O")
    x.add_argument("--model", default="smollm2")
    x.add_argument("--out", required=True, help="the folder to write")
    x.add_argument("--max-seq-len", type=int, default=2048)
    x.set_defaults(fn=_cmd_export_onnx)
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
