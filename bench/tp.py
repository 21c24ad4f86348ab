"""Tensor parallelism on this CPU: SmolLM2-135M-Instruct (real weights, f32, greedy) decoded by one rank on the whole
machine, one rank on one thread, and two ranks (tp=2) on one thread each, interleaved.

    python bench/tp.py [--backend auto] [--new-tokens 64] [--rounds 3]
    python bench/tp.py --smoke    # a tiny random-weight Llama; by default 8 new tokens, 1 round, the reference backend

Prints, per peer: decode ms/token ((time for N tokens - time for 1) / (N - 1), so the prefill is not in it; rank 0's
clock), its ratio to tp=1 on the whole machine (above 1: slower), the time spent in collectives per decode token and
how many there are per token (torch.distributed's all_reduce, all_gather_into_tensor and all_gather wrapped with a
timer in every rank before compiling: the wait for the slower rank is part of that time), and the time to first token
(generating 1 token: the prefill and the first draw); then each rank's load and compile time, and whether every peer
produced tp=1's greedy tokens (a MISMATCH line and exit 1 if not). The same chat prompt, N new tokens each time (no
stop token). Each peer runs in its own processes (runtime/distributed.py's ``launch``: one per rank, in a gloo group),
started and compiled one peer after another and kept for every round, idle while another peer is timed (and warmed
again, untimed, before its own timings); rounds are interleaved and the medians reported. A line under the table
gives every round's rank-0 decode time and, as a cross-check, the decode time from the N-token run's own clock (first
to last token): a slow 1-token run shows there as a disagreement. In a rank, ONNX Runtime's sessions run the rank's
thread count (codegen/onnx/program.py), as torch does.
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from cpu import PROMPT, _timed  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather")
_spent: dict = {}  # in a rank: collective name -> [seconds, calls]


def _timed_collective(name: str, fn):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[name][0] += time.perf_counter() - start
            _spent[name][1] += 1
    return timed


def install_collective_timer() -> None:
    """Wrap torch.distributed's collectives (those this torch has) so that ``_spent`` sums their wall time and calls;
    the IR's allreduce (ir/compute.py) looks ``all_reduce`` up on the module at each call."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            _spent[name] = [0.0, 0]
            setattr(dist, name, _timed_collective(name, fn))


def smoke_model():
    """A tiny random-weight Llama: hidden 32, 2 layers, 4 heads (2 kv heads), intermediate 64, vocab 64."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _snapshot() -> dict:
    return {name: tuple(v) for name, v in _spent.items()}


def _rank(rank: int, world: int, spec: dict, threads: int, commands: list, results) -> None:
    """One rank of one peer under ``launch``: import, then on "compile" load, compile and warm up (the greedy tokens),
    then one timing per "time" command until "stop"; every message to ``results`` is (rank, dict)."""
    import torch.distributed as dist
    from transformers import LlamaForCausalLM  # noqa: F401 (seconds of imports, made while the other peers make theirs)

    import lowerlm

    torch.set_num_threads(threads)  # ONNX Runtime's sessions take it too (in a rank)
    install_collective_timer()  # before compiling: whatever the program binds, it binds the wrapper
    results.put((rank, {"imported": True}))
    if commands[rank].get() != "compile":
        return
    start = time.perf_counter()
    if spec["smoke"]:
        model, max_seq_len = smoke_model(), 64
    else:
        model, max_seq_len = lowerlm.load("smollm2", progress=lambda _: None), 1024
    loaded = time.perf_counter()
    cm = lowerlm.compile_model(model, backend=spec["backend"], max_batch=1, max_seq_len=max_seq_len, tp=world,
                               tokenizer=False if spec["smoke"] else None)
    compiled = time.perf_counter()
    if spec["smoke"]:
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        from lowerlm.runtime.text import encode

        ids = encode(cm.tokenizer, PROMPT, chat=True)

    def generate(k: int) -> list:
        return [s[0] for s in cm.generate_ids([ids], k, stop_ids=())]

    def measure(k: int) -> tuple:
        """(seconds, tokens, the clock at each token, collectives spent meanwhile: name -> (seconds, calls)), the
        ranks started together."""
        if world > 1:
            dist.barrier()
        before, out, marks = _snapshot(), [], []

        def run():
            for (token,) in cm.generate_ids([ids], k, stop_ids=()):
                out.append(token)
                marks.append(time.perf_counter())

        sec = _timed(run)
        after = _snapshot()
        return sec, out, marks, {n: (after[n][0] - before[n][0], after[n][1] - before[n][1]) for n in after}

    n = spec["new_tokens"]
    with torch.no_grad():
        tokens = generate(n)  # the warm-up
        results.put((rank, {"load_s": loaded - start, "compile_s": compiled - loaded, "tokens": tokens,
                            "prompt": len(ids), "threads": torch.get_num_threads()}))
        while commands[rank].get() == "time":
            generate(2)  # idle while the other peers ran: warm again (untimed) before the timed calls
            t1, _, _, c1 = measure(1)
            tn, out, marks, cn = measure(n)
            results.put((rank, {"t1": t1, "tn": tn, "tokens": out, "steps": (marks[-1] - marks[0]) / (n - 1),
                                "collective": {name: (cn[name][0] - c1[name][0], cn[name][1] - c1[name][1])
                                               for name in cn}}))


class PeerFailed(Exception):
    pass


class Peer:
    """One peer: its ranks' processes (``launch`` in a thread of this process) and their queues."""

    def __init__(self, name: str, world: int, threads: int, spec: dict):
        import multiprocessing

        from lowerlm.runtime.distributed import launch

        ctx = multiprocessing.get_context("spawn")
        self.name, self.world, self.threads = name, world, threads
        self.commands = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.error: BaseException | None = None
        self.ready: list = []  # per rank: its compile times and warm-up tokens
        self.rounds: list = []  # per round: [rank 0's timing, rank 1's, ...]

        def run():
            try:
                launch(_rank, world, spec, threads, self.commands, self.results)
            except BaseException as e:  # noqa: BLE001 (reported by the main thread)
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def gather(self) -> list:
        """One message from every rank, in rank order; raises the peer's error if its ranks failed."""
        got: dict = {}
        while len(got) < self.world:
            try:
                rank, message = self.results.get(timeout=1)
                got[rank] = message
            except queue.Empty:
                if not self.thread.is_alive():
                    raise PeerFailed(f"{self.name}: {self.error or 'its ranks exited'}") from None
        return [got[r] for r in range(self.world)]

    def send(self, command: str) -> None:
        for q in self.commands:
            q.put(command)


def _median_ms(values) -> float:
    return statistics.median(values) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", help="the backend every peer compiles for (default auto; reference with --smoke)")
    p.add_argument("--new-tokens", type=int, help="default 64 (8 with --smoke)")
    p.add_argument("--rounds", type=int, help="default 3 (1 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="a tiny random-weight Llama instead of SmolLM2")
    args = p.parse_args(argv)
    for name, full, smoke in (("backend", "auto", "reference"), ("new_tokens", 64, 8), ("rounds", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.new_tokens < 2 or args.rounds < 1:
        p.error("--new-tokens must be >= 2 and --rounds >= 1")
    import onnxruntime

    cpus = os.cpu_count() or 1
    spec = {"smoke": args.smoke, "backend": args.backend, "new_tokens": args.new_tokens}
    plural = "s" if cpus > 1 else ""
    each = max(1, cpus // 2)
    layout = [(f"tp=1, {cpus} thread{plural}", 1, cpus), ("tp=1, 1 thread", 1, 1),
              (f"tp=2, {each} thread{'s' if each > 1 else ''} per rank", 2, each)]
    began = time.perf_counter()
    peers: list = []
    try:
        print("starting every peer's ranks ...", file=sys.stderr, flush=True)
        peers = [Peer(name, world, threads, spec) for name, world, threads in layout]
        for peer in peers:
            peer.gather()  # imported
        for peer in peers:  # one at a time: no load or compile overlaps another peer's
            print(f"compiling {peer.name} ...", file=sys.stderr, flush=True)
            peer.send("compile")
            peer.ready = peer.gather()
        for r in range(args.rounds):
            for peer in peers:  # interleaved: every peer sees the same machine state
                print(f"round {r + 1}/{args.rounds}: {peer.name}", file=sys.stderr, flush=True)
                peer.send("time")
                peer.rounds.append(peer.gather())
    except PeerFailed as e:
        print(f"bench/tp.py: {e}", file=sys.stderr)
        return 1
    finally:
        for peer in peers:
            peer.send("stop")
        for peer in peers:
            peer.thread.join(timeout=60)
    wall = time.perf_counter() - began

    n = args.new_tokens
    what = "tiny random-weight Llama" if args.smoke else "SmolLM2-135M-Instruct f32 (real weights)"
    prompt = peers[0].ready[0]["prompt"]
    print(f"{what}, backend {args.backend}, {n} new tokens (greedy, no stop token), prompt {prompt} tokens, "
          f"{args.rounds} round{'s' if args.rounds > 1 else ''} interleaved (medians)")
    print(f"machine: {cpus} CPUs (os.cpu_count), torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    print(f"command: python {shlex.join(sys.argv)}")
    print()
    print(f"| peer | decode ms/token (median) | ratio to {peers[0].name.replace(', ', ' (')}) | collective ms/token | "
          "allreduces/token | first token ms |")
    print("|---|---|---|---|---|---|")
    base = None
    for peer in peers:
        decode = [[(m["tn"] - m["t1"]) / (n - 1) for m in ranks] for ranks in peer.rounds]
        ms = _median_ms([d[0] for d in decode])
        base = base if base is not None else ms
        spent = [statistics.median(sum(s for s, _ in ranks[r]["collective"].values()) / (n - 1)
                                   for ranks in peer.rounds) * 1e3 for r in range(peer.world)]
        calls = {name: statistics.median(ranks[0]["collective"][name][1] / (n - 1) for ranks in peer.rounds)
                 for name in peer.rounds[0][0]["collective"]}
        gathers = sum(c for name, c in calls.items() if name != "all_reduce")
        count = f"{calls.get('all_reduce', 0):g}" + (f" + {gathers:g} gathers" if gathers else "")
        coll = " / ".join(f"{s:.2f}" for s in spent)
        coll += f" (rank {'/'.join(str(r) for r in range(peer.world))}; {spent[0] / ms:.0%} of rank 0's decode)" \
            if peer.world > 1 else ""
        first = _median_ms(ranks[0]["t1"] for ranks in peer.rounds)
        print(f"| {peer.name} | {ms:.2f} | {ms / base:.2f}x | {coll} | {count} | {first:.1f} |")
    print()
    print(f"decode ms/token of rank 0 per round, and (cross-check) from the {n}-token run's own clock, first to last "
          f"token / {n - 1}: " + "; ".join(
              f"{peer.name}: " + ", ".join(f"{(ranks[0]['tn'] - ranks[0]['t1']) / (n - 1) * 1e3:.2f}"
                                          for ranks in peer.rounds)
              + f" (own clock {_median_ms(ranks[0]['steps'] for ranks in peer.rounds):.2f})" for peer in peers))
    print("load / compile per rank (s, compiled once, before the rounds): " + "; ".join(
        f"{peer.name}: " + ", ".join(f"{m['load_s']:.1f} / {m['compile_s']:.1f}" for m in peer.ready)
        for peer in peers))
    print("torch threads per rank as run: " + "; ".join(
        f"{peer.name}: {', '.join(str(m['threads']) for m in peer.ready)}" for peer in peers))
    print(f"wall time of the whole run: {wall:.0f} s")
    reference = peers[0].ready[0]["tokens"]
    bad = 0
    for peer in peers:
        runs = [m["tokens"] for m in peer.ready] + [m["tokens"] for ranks in peer.rounds for m in ranks]
        for tokens in runs:
            if tokens != reference:
                at = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens),
                                                                                               len(reference)))
                print(f"MISMATCH: {peer.name}'s greedy tokens differ from {peers[0].name}'s at token {at}: "
                      f"{tokens[at:at + 4]} versus {reference[at:at + 4]}")
                bad += 1
                break
    if bad:
        return 1
    print(f"greedy tokens agree: every peer (tp=2 included), every rank and round, gives the same {n} tokens as "
          f"{peers[0].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
