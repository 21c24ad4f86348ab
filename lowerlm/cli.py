"""The ``lowerlm`` command line.

Rules every command keeps:

- A user error (a bad flag, prompt, model or output path) prints one line, ``lowerlm: error: …``, naming what was
  wrong and what to do, and exits with code 2; never a traceback.
- Everything that can be checked is checked before the expensive work (loading a model takes 5–30 s, compiling
  30–230 s): each flag alone by its argparse ``type=`` function, flags together and prompts at the start of the
  command, and what depends on the model against an HF folder's ``config.json`` before loading it (a GGUF's
  config only exists once it is loaded, so those checks come right after loading, still before compiling).
- Output is written under a temporary name and renamed into place: an error or Ctrl-C leaves nothing half-written.
- Ctrl-C prints one line and exits with 130; a closed stdout (``lowerlm dump-ir | head``) exits quietly with 141,
  as Unix tools killed by SIGPIPE do.
- Long steps show progress on stderr when it is a terminal (``lowerlm.progress``; ``--quiet`` turns it off).
  Libraries' own warnings and progress bars are off unless Python's ``-W``/``PYTHONWARNINGS`` asks for them;
  lowerlm's warnings and notes print as one line each.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path

from lowerlm.cli_checks import (
    DEFAULT_MODEL,
    EXIT_INTERRUPTED,
    EXIT_SIGPIPE,
    EXIT_USER_ERROR,
    _after,
    _at_least,
    _check_layer,
    _check_max_seq_len,
    _check_prompt_ids,
    _context_limit,
    _existing_ancestor,
    _export_out,
    _figure_out,
    _hf_config,
    _ir_text,
    _loaded_config,
    _model,
    _need_tokenizer,
    _Parser,
    _seed,
    _sparsities,
    _sparsity,
    _temperature,
    _top_p,
    _Version,
)
from lowerlm.codegen.program import BACKENDS, DEFAULT_MAX_SEQ_LEN  # the registry; it imports no torch


# ---- libraries: quiet -------------------------------------------------------------------------------------------
def _route_warnings(progress) -> None:
    """lowerlm's warnings as one line each (``lowerlm: warning: …``, no source line); other libraries' warnings
    off, unless Python's -W or PYTHONWARNINGS asks for them. transformers' logging and the libraries' progress bars
    are turned off through their environment variables, before any of them is imported."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split()) or category.__name__
        progress.line("lowerlm: warning: " + (text[len("lowerlm: "):] if text.startswith("lowerlm: ") else text))

    warnings.showwarning = show
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", message="lowerlm")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader uses tqdm directly, past its own switch
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_onnxruntime() -> None:
    """ONNX Runtime logs graph warnings (initializers, unused inputs) to stderr from C++: errors only."""
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(3)


def _load(model: str, progress, check) -> tuple:
    """(the loaded model, its config as a dict), with ``check(config)`` run as early as the config exists: an HF
    folder's config.json before loading, a GGUF's (known only once it is loaded) right after, still before any
    compile."""
    import lowerlm

    cfg = _hf_config(model)
    if cfg is not None:
        check(cfg)
    progress(f"loading {model}")  # a GGUF's first load says it converts it
    loaded = lowerlm.load(model, progress=progress)
    if cfg is None:
        cfg = _loaded_config(loaded)
        check(cfg)
    return loaded, cfg


# ---- commands -----------------------------------------------------------------------------------------------------
def _cmd_passes(args, progress) -> int:
    import shutil
    import textwrap

    from lowerlm.passes import PASS_DOCS, PIPELINE, TAILS

    width = shutil.get_terminal_size((0, 0)).columns if sys.stdout.isatty() else 0
    # upcast runs when a bf16/f16 model is computed in f32, arm when calibration data is given; then the tail of
    # the backend compiled for
    rows = [(name, "default" if fn is not None else "dtype" if name == "upcast" else "data") for name, fn in PIPELINE]
    rows += [(name, backend) for backend, tail in TAILS.items() for name, _ in tail]
    for name, kind in rows:
        head = f"{name:24s} {kind:7s}  "
        doc = PASS_DOCS[name]
        if width > len(head) + 30:  # a terminal: wrapped under the description's column
            print(textwrap.fill(doc, width - 1, initial_indent=head, subsequent_indent=" " * len(head)))
        else:  # a pipe or a file: one line per pass, whole
            print(head + doc)
    return 0


def _stages(args, progress) -> list:
    """(header, module) for the import and after each pass of the default pipeline and the backend's tail."""
    from lowerlm.codegen.program import fusing_backend
    from lowerlm.ir import parse_module
    from lowerlm.passes import dump_header, run_pipeline

    shard = (args.rank, args.tp) if args.tp > 1 else None

    def passes_of(module) -> list:
        records: list = []
        run_pipeline(module, dump=set(), on_pass=records.append, backend=fusing_backend(args.backend), tp=shard)
        return [("// imported", module)] + [(dump_header(r), r.module) for r in records]

    if args.ir:
        from lowerlm.errors import InputError, LowerlmError
        from lowerlm.ir import verify_module

        path, text = args.ir
        try:
            module = verify_module(parse_module(text))
        except LowerlmError as e:  # the file named, with the line:col the parser gives
            raise InputError(f"IR file '{path}': {e}") from None
        return passes_of(module)
    import lowerlm

    if args.backend in ("onnx", "auto"):
        _quiet_onnxruntime()
    model, _ = _load(args.model, progress, lambda cfg: None)
    if shard is not None:  # one rank's passes, without a process group: the IR only, no program built
        from lowerlm.frontend.trace import trace_model

        return passes_of(trace_model(model, progress=progress))
    cm = lowerlm.compile_model(model, backend=args.backend, progress=progress, tokenizer=False)
    stages = cm.stages()
    if args.backend == "auto":  # AutoProgram: which backend runs each partition
        lines = [f"//   {line}" for line in cm.program.describe()]
        stages.append(("// backend plan (auto)\n" + "\n".join(lines), None))
    return stages


def _cmd_dump_ir(args, progress) -> int:
    from lowerlm.codegen.program import fusing_backend
    from lowerlm.errors import InputError
    from lowerlm.ir import print_module
    from lowerlm.ir.nx import to_dot
    from lowerlm.passes import TAILS

    tail = TAILS[fusing_backend(args.backend)]
    owners = [b for b, passes in TAILS.items() if args.after in dict(passes)]
    if owners and args.after not in dict(tail):  # before any loading: it would print nothing
        raise InputError(f"--after {args.after}: that pass is in the {' and '.join(owners)} backend's tail, not "
                         f"{args.backend}'s; add --backend {owners[0]}")
    if args.rank >= args.tp:  # before any loading
        raise InputError(f"--rank {args.rank} is not one of the {args.tp} ranks of --tp {args.tp}; give --rank 0 to "
                         f"{args.tp - 1}")
    stages = _stages(args, progress)
    progress.done()

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


def _token_prompts(args) -> list | None:
    """--token-ids prompts as lists of ints (None without --token-ids)."""
    from lowerlm.errors import InputError

    if not args.token_ids:
        return None
    prompts = []
    for i, p in enumerate(args.prompt):
        try:
            ids = [int(t) for t in p.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"--token-ids prompt {i} ('{p}') must be integers separated by commas or spaces, like "
                             "1,2,3") from None
        if not ids:
            raise InputError(f"the prompt is empty (prompt {i}); give at least one token id")
        negative = [t for t in ids if t < 0]
        if negative:
            raise InputError(f"token id {negative[0]} in prompt {i} is negative; token ids count from 0")
        prompts.append(ids)
    return prompts


def _check_generate_flags(args) -> None:
    """What the flags say together: each is checked alone by its type."""
    from lowerlm.errors import InputError

    if any(not p.strip() for p in args.prompt) and not args.token_ids:
        raise InputError("the prompt is empty; give the text to generate from")
    if len(args.prompt) > args.max_batch:
        raise InputError(f"{len(args.prompt)} prompts are more than --max-batch {args.max_batch}; pass --max-batch "
                         f"{len(args.prompt)}")
    if args.temperature == 0:
        ignored = [flag for flag, value, off in (("--top-k", args.top_k, 0), ("--top-p", args.top_p, 1.0),
                                                 ("--seed", args.seed, 0)) if value != off]
        if ignored:
            raise InputError(f"{', '.join(ignored)} shape sampling, but --temperature 0 (the default) is greedy and "
                             "would ignore them; add --temperature T > 0 (1: the model's own distribution)")
    if args.compare_eager and args.temperature != 0:
        raise InputError("--compare-eager compares greedy tokens with transformers' greedy generate; drop "
                         "--temperature")
    if args.raw and args.token_ids:
        raise InputError("--raw sends text without the chat template, but --token-ids prompts are not text; drop "
                         "--raw")
    if args.weight_bits is not None and args.backend not in ("onnx", "auto"):
        raise InputError(f"--weight-bits quantizes weights for the ONNX backend; --backend {args.backend} runs the "
                         "model's own precision (use --backend onnx or auto)")


def _generate_rank(rank: int, world: int, argv: list) -> None:
    """One rank of ``generate --tp``: the same command in a process of the group; rank 0 alone writes."""
    if rank:
        sys.stdout = open(os.devnull, "w")
        argv = ["--quiet", *argv]
    code = main(argv)
    if code:
        raise SystemExit(code)


def _cmd_generate(args, progress) -> int:
    import time

    import lowerlm
    from lowerlm.errors import InputError

    _check_generate_flags(args)
    token_prompts = _token_prompts(args)
    if args.tp > 1:
        import torch.distributed as dist

        from lowerlm.runtime.distributed import init_from_env, launch

        if not (dist.is_available() and dist.is_initialized()) and not init_from_env(args.tp):
            launch(_generate_rank, args.tp, args.argv)  # each rank runs this command; rank 0 writes the text
            return 0

    def check(cfg):
        _check_max_seq_len(args.max_seq_len, cfg, args.model)
        if token_prompts is not None:
            _check_prompt_ids(token_prompts, cfg, args.max_seq_len)
        else:
            _need_tokenizer(args.model, ": give token ids with --token-ids instead of text")

    if args.backend in ("onnx", "auto"):
        _quiet_onnxruntime()
    model, cfg = _load(args.model, progress, check)
    from lowerlm.runtime.text import encode, load_tokenizer

    progress("loading the tokenizer")
    tokenizer = load_tokenizer(model)
    if token_prompts is not None:
        prompts = token_prompts
    else:
        if tokenizer is None:
            raise InputError(f"{args.model} has no tokenizer: give token ids with --token-ids instead of text")
        prompts = [encode(tokenizer, p, chat=not args.raw) for p in args.prompt]
        _check_prompt_ids(prompts, cfg, args.max_seq_len)
    cm = lowerlm.compile_model(model, backend=args.backend, max_seq_len=args.max_seq_len, weight_bits=args.weight_bits,
                               max_batch=args.max_batch, progress=progress, tp=args.tp,
                               tokenizer=tokenizer if tokenizer is not None else False)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    progress("preparing the backend's programs")
    cm.program.prepare()  # what a program builds on first use (ONNX sessions) is built before the clock starts
    progress.done()
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
    print(f"-- {count} tokens in {seconds:.2f} s: {count / seconds:.1f} tokens/s (lowerlm, {backend} backend)",
          flush=True)
    _note_sequence_limit(cm, prompts, outputs, args, cfg, progress)
    if args.compare_eager:
        _compare_eager(model, prompts, outputs, args, progress)
    return 0


def _note_sequence_limit(cm, prompts, outputs, args, cfg, progress) -> None:
    """A note on stderr for each sequence that ended at the cache's end before --max-new-tokens."""
    reasons = cm.generator.finish_reasons
    for i, reason in enumerate(reasons):
        if reason != "max_seq_len":
            continue
        need = len(prompts[i]) + args.max_new_tokens - 1  # the last new token is never written to the cache
        limit = _context_limit(cfg)
        how = (f"pass --max-seq-len {need} or more for all {args.max_new_tokens}" if limit is None or need <= limit
               else f"the model holds at most {limit} positions: shorten the prompt")
        which = "" if len(prompts) == 1 else f"prompt {i}: "
        progress.line(f"lowerlm: note: {which}generation stopped after {len(outputs[i])} of --max-new-tokens "
                      f"{args.max_new_tokens} tokens at the sequence limit --max-seq-len {cm.max_seq_len} (prompt "
                      f"{len(prompts[i])} tokens); {how}")


def _compare_eager(model, prompts, outputs, args, progress) -> None:
    """The same greedy generation with transformers' eager generate, timed, and whether the tokens agree."""
    import time

    import torch

    for prompt, ours in zip(prompts, outputs):
        progress("transformers' eager generate, for comparison")
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
        progress.done()
        theirs = out[0, len(prompt):].tolist()
        same = "identical tokens" if theirs == ours[:len(theirs)] and len(theirs) == len(ours) else \
            "tokens DIFFER"
        print(f"-- {len(theirs)} tokens in {seconds:.2f} s: {len(theirs) / seconds:.1f} tokens/s "
              f"(transformers eager); {same}")


def _cmd_arm_hist(args, progress) -> int:
    from lowerlm.arm_report import arm_hist

    def check(cfg):
        _check_layer(args.layer, cfg, args.model)
        _need_tokenizer(args.model, ", and arm-hist measures activations over text: save the model's tokenizer in "
                        "its folder (tokenizer.save_pretrained)")

    model, _ = _load(args.model, progress, check)
    stats = arm_hist(model, args.layer, args.out, args.sparsity, progress=progress)
    progress.done()
    print(f"layer {args.layer}: skew of a {stats['skew_a']:.3f}, skew of a_hat {stats['skew_a_hat']:.3f}; "
          f"tau {stats['tau']:.4g}, mass of a_hat within +-tau {stats['mass_within_tau']:.3f}; wrote {args.out}")
    return 0


def _cmd_arm_eval(args, progress) -> int:
    _need_tokenizer(args.model, ", and arm-eval scores held-out text: save the model's tokenizer in its folder "
                    "(tokenizer.save_pretrained)")
    from lowerlm.arm_report import arm_eval, format_rows

    model, _ = _load(args.model, progress, lambda cfg: None)
    rows = arm_eval(model, args.sparsities, args.max_tokens, progress=progress)
    progress.done()
    print(format_rows(rows))
    return 0


def _cmd_export_onnx(args, progress) -> int:
    import shutil
    import tempfile

    import lowerlm

    _quiet_onnxruntime()
    model, cfg = _load(args.model, progress, lambda cfg: _check_max_seq_len(args.max_seq_len, cfg, args.model))
    # by default the caches hold 2048 positions, or all the model has if fewer
    max_seq_len = args.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, _context_limit(cfg) or DEFAULT_MAX_SEQ_LEN)
    cm = lowerlm.compile_model(model, backend="onnx", max_seq_len=max_seq_len, progress=progress, tokenizer=False)
    from lowerlm.codegen.onnx.export import export

    out = args.out.absolute()
    progress(f"writing the ONNX models to {args.out}")
    # written beside the nearest existing folder and renamed into place: never a half-written export
    tmp = Path(tempfile.mkdtemp(dir=_existing_ancestor(out.parent), prefix=f".{out.name}.tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is for secrets; the export gets the usual mode
        index = export(cm.program, tmp, cm.max_seq_len, cm.vocab_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if out.exists():  # empty, or a previous export (checked at the start): moved aside, then removed
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress.done()
    print(f"wrote {', '.join(g.name + '.onnx' for g in cm.ir.graphs)} and {index.name} to {args.out}")
    return 0


# ---- parser and main ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowerlm", description="Lower PyTorch language models to fast kernels.")
    p.add_argument("--version", action=_Version, help="lowerlm's version and its libraries'")
    quiet = dict(action="store_true", default=argparse.SUPPRESS, help="no progress on stderr (it is shown only "
                 "when stderr is a terminal); warnings and errors still print")
    p.add_argument("-q", "--quiet", **quiet)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands (`lowerlm COMMAND --help` for each)")

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("-q", "--quiet", **quiet)
        c.set_defaults(fn=fn)
        return c

    def model_flag(c, **kw):
        c.add_argument("--model", default=DEFAULT_MODEL, type=_model,
                       help=f"'{DEFAULT_MODEL}' (default), a .gguf file or an HF model folder", **kw)

    command("passes", _cmd_passes, "list the passes, in pipeline order")
    d = command("dump-ir", _cmd_dump_ir, "print the IR as imported and after each pass (or one named pass)")
    src = d.add_mutually_exclusive_group()
    model_flag(src)
    src.add_argument("--ir", type=_ir_text, help="a file of IR text to run the pipeline on instead of a model")
    d.add_argument("--after", default="all", type=_after, help="'all', 'none' (as imported) or a pass name")
    d.add_argument("--format", choices=("text", "dot"), default="text")
    d.add_argument("--diff", action="store_true", help="show each stage as a diff against the one before")
    d.add_argument("--tp", type=_at_least(1), default=1, help="tensor parallelism: the passes of one rank's shard "
                   "out of this many (tensor_parallel, fuse_allreduce_norm)")
    d.add_argument("--rank", type=_at_least(0), default=0, help="with --tp: which rank's shard (default 0)")
    d.add_argument("--backend", default="reference", choices=BACKENDS, help="the backend whose pass tail runs after "
                   "the pipeline, and with --model the one to compile for (default reference: no tail; 'auto' also "
                   "prints which backend runs each graph)")
    g = command("generate", _cmd_generate, "generate text with a compiled model, streaming it")
    g.add_argument("prompt", nargs="+", help="the prompt (several make a batch)")
    model_flag(g)
    g.add_argument("--backend", default="auto", choices=BACKENDS, help="'auto' (default: ONNX Runtime on a CPU, "
                   "Triton on a GPU, the ops they lack on the reference backend), 'onnx', 'triton' or 'reference' "
                   "(plain torch, the oracle)")
    g.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    g.add_argument("--tp", type=_at_least(1), default=1, help="tensor parallelism: run N ranks (processes over "
                   "torch.distributed), each holding a shard of the weights; rank 0 writes the text")
    g.add_argument("--temperature", type=_temperature, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=_at_least(0, " (0: off)"), default=0, help="0: off")
    g.add_argument("--top-p", type=_top_p, default=1.0, help="1: off")
    g.add_argument("--seed", type=_seed, default=0)
    g.add_argument("--max-seq-len", type=_at_least(2), default=None,
                   help=f"longest prompt + generated tokens (default {DEFAULT_MAX_SEQ_LEN}, or a learned position "
                   "table's rows)")
    g.add_argument("--max-batch", type=_at_least(1), default=1)
    g.add_argument("--weight-bits", type=int, choices=(4, 8), default=None,
                   help="ONNX backend: quantized projection weights (faster on a CPU, not bit-exact)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--token-ids", action="store_true", help="prompts are token ids separated by commas")
    g.add_argument("--compare-eager", action="store_true",
                   help="also run transformers' eager greedy generate: tokens/s and token agreement")
    h = command("arm-hist", _cmd_arm_hist, "histogram of one MLP's activation before and after ARM redistribution")
    model_flag(h)
    h.add_argument("--layer", type=_at_least(0), required=True)
    h.add_argument("--out", type=_figure_out, required=True, help="the image to write (.png, .svg or .pdf)")
    h.add_argument("--sparsity", type=_sparsity, default=0.5, help="share of activations zeroed, in [0, 1)")
    e = command("arm-eval", _cmd_arm_eval, "held-out perplexity and KL: ARM vs plain thresholding at equal bytes")
    model_flag(e)
    e.add_argument("--sparsities", type=_sparsities, default=[0.3, 0.4, 0.5, 0.6, 0.7],
                   help="sparsities to compare, separated by commas (default 0.3,0.4,0.5,0.6,0.7)")
    e.add_argument("--max-tokens", type=_at_least(2), default=1024, help="held-out tokens to score")
    x = command("export-onnx", _cmd_export_onnx, "standalone ONNX models (prefill, decode) and a JSON of their I/O")
    model_flag(x)
    x.add_argument("--out", type=_export_out, required=True,
                   help="the folder to write (new, empty, or a previous export, which is replaced)")
    x.add_argument("--max-seq-len", type=_at_least(2), default=None, help="positions the exported caches hold "
                   f"(default {DEFAULT_MAX_SEQ_LEN}, or the model's max_position_embeddings if fewer)")
    return p


def _stdout_gone() -> None:
    """stdout's reader left: point stdout at /dev/null so the interpreter's last flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    import errno

    from lowerlm.progress import Progress

    progress = Progress(enabled=False)
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what a rank of --tp runs again
        progress = Progress.for_terminal(quiet=getattr(args, "quiet", False))
        _route_warnings(progress)
        code = args.fn(args, progress)
        progress.done()
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        progress.line("lowerlm: error: interrupted (Ctrl-C); steps already finished are cached, so running the "
                      "command again resumes after them")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_SIGPIPE
    except MemoryError:
        progress.line("lowerlm: error: out of memory; try a smaller --max-seq-len or --max-batch, or a smaller model")
        return EXIT_USER_ERROR
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        where = f" ({e.filename})" if e.filename else ""
        progress.line(f"lowerlm: error: {e.strerror}{where}; free space or fix permissions, or set "
                      "LOWERLM_CACHE_DIR to another folder for the caches")
        return EXIT_USER_ERROR
    except Exception as e:
        # lowerlm.errors is imported only here: it imports all of lowerlm.ir (a tenth of a second), which a flag
        # refused by argparse never needs
        from lowerlm.errors import LowerlmError

        if not isinstance(e, LowerlmError):
            raise  # a bug: its traceback is what a report needs
        progress.line(f"lowerlm: error: {' '.join(str(e).split())}")
        return EXIT_USER_ERROR
    finally:
        progress.done()


if __name__ == "__main__":
    sys.exit(main())
