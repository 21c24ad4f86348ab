"""Lowerings of the linear-attention ops (``short_conv``, ``delta_rule`` and their cached forms) into standard
ONNX ops, with ``ir/compute.py``'s semantics.

The short convolution is W shifted slices of ``ext = [state or zeros; x]`` times the weight's columns, summed (in
x's dtype); the new conv state is a per-row GatherElements of ``ext`` at n..n+W-2 (n: the row's valid tokens).

The delta rule runs in f32. One token (decode, S = 1 in the type) is the recurrent step in plain ops; a prefill (S
free) runs either the recurrence as a ``Scan`` over the tokens (``"scan"``) or the chunked form (``"chunked"``,
``ir/compute.py``'s ``delta_rule_chunked``): the intra-chunk products for every chunk at once, the WY matrix
``(I - A)^-1`` of the strictly lower A as ``prod_i (I + A^(2^i))`` (A is nilpotent: no loop, no solve), and a
``Scan`` over the chunks carrying the state. ``PREFILL`` picks the form (the faster one measured is the default).
Right padding (positions at or past seq_lens) gets gate 0 and beta 0 before the recurrence, so it leaves the state
as it is.

The state a ``Scan`` carries may be bound to the same buffer in and out (``OnnxProgram``): ONNX Runtime's Scan reads
its initial state in the first iteration only and writes the final one in the last, through buffers of its own in
between; in a one-iteration scan it reads and writes that one buffer, and every node of the step that reads the state
is an ancestor of the node writing the new one, so all reads come first.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from lowerlm.ir.abi import SILU
from lowerlm.ir.dtypes import DType
from lowerlm.ir.ops import Op

PREFILL = "chunked"  # "scan" (the recurrence token by token) or "chunked"
# tokens per chunk of the chunked form, by gate: per key channel (KDA; its pairwise decays cost C x K per token) and
# per head (measured fastest: 8 and 16 among 8, 16, 32, 64 at H=4, K=V=64, S=512 and 2048)
CHUNK = {True: 8, False: 16}
_END = 2 ** 62


# ---- short convolution ------------------------------------------------------------------------------------------
def _conv(lw, c, x: str, w: str, bias, state) -> tuple:
    """(act(bias + sum_j w[:, j] * ext[s + j]), ext) over ext = [state; x] (zeros for an absent state)."""
    xt = c.ins[0]
    dtype = xt.dtype
    channels, width = c.ins[1].shape
    if state is None:
        shape = lw.op("Concat", [lw.op("Shape", [x], start=0, end=1), lw.const([width - 1, channels])], axis=0)
        state = lw.op("ConstantOfShape", [shape], value=helper.make_tensor("zero", _onnx(dtype), [1], [0]))
    elif c.ins[3].dtype != dtype:
        state = lw.cast(state, dtype)
    ext = lw.op("Concat", [state, x], axis=1) if width > 1 else x
    if c.ins[1].dtype != dtype:
        w = lw.cast(w, dtype)
    wt = lw.op("Transpose", [w], perm=[1, 0])  # [W, C]
    y = None
    for j in range(width):
        end = j - (width - 1) if j < width - 1 else _END
        tap = lw.op("Slice", [ext, lw.const([j]), lw.const([end]), lw.const([1])])  # ext[:, j : j + S]
        term = lw.op("Mul", [tap, lw.op("Gather", [wt, lw.const(j)], axis=0)])
        y = term if y is None else lw.op("Add", [y, term])
    if bias is not None:
        y = lw.op("Add", [y, bias if c.ins[2].dtype == dtype else lw.cast(bias, dtype)])
    if c.a["act"] == SILU:
        y = lw.activation(y, SILU)
    return y, ext


def short_conv(lw, c) -> str:
    x, w, bias = c.x
    return _conv(lw, c, x, w, bias, None)[0]


def cached_short_conv(lw, c) -> list:
    x, w, bias, state, positions, seq_lens = c.x
    channels, width = c.ins[1].shape
    y, ext = _conv(lw, c, x, w, bias, state)
    # the row's valid tokens n = clamp(seq_lens - positions[:, 0], 0, S); the new state: ext[n : n + W - 1]
    first = lw.op("Squeeze", [lw.op("Slice", [positions, lw.const([0]), lw.const([1]), lw.const([1])]),
                              lw.const([1])])
    n = lw.op("Sub", [lw.cast(seq_lens, DType.I64), lw.cast(first, DType.I64)])
    s = lw.op("Shape", [x], start=1, end=2)
    n = lw.op("Min", [lw.op("Max", [n, lw.const(0)]), s])  # [B]
    idx = lw.op("Add", [lw.op("Unsqueeze", [n, lw.const([1, 2])]),
                        lw.const(np.arange(width - 1).reshape(1, width - 1, 1))])  # [B, W-1, 1]
    idx = lw.op("Expand", [idx, lw.const([1, 1, channels])])
    new = lw.op("GatherElements", [ext, idx], axis=1)
    if c.outs[1].dtype != c.ins[0].dtype:
        new = lw.cast(new, c.outs[1].dtype)
    return [y, new]


# ---- the delta rule ---------------------------------------------------------------------------------------------
def _f32(lw, x: str, t) -> str:
    return x if t.dtype == DType.F32 else lw.cast(x, DType.F32)


def _inputs(lw, c) -> tuple:
    """q (scaled), k, v [B, S, H, D], g [B, S, H, K or 1], beta [B, S, H, 1] in f32; q and k L2-normalised when
    asked; right padding (cached form) with gate 0 and beta 0."""
    a = c.a
    heads = a["heads"]
    q, k, v, g, beta = (lw.op("Reshape", [_f32(lw, x, t), lw.const([0, 0, heads, -1])])
                        for x, t in zip(c.x[:5], c.ins[:5]))
    if a["l2norm"]:
        eps = lw.scalar(a["eps"], DType.F32)
        q, k = (lw.op("Div", [x, lw.op("Sqrt", [lw.op("Add", [
            lw.op("ReduceSum", [lw.op("Mul", [x, x]), lw.const([-1])], keepdims=1), eps])])]) for x in (q, k))
    q = lw.op("Mul", [q, lw.scalar(a["scale"], DType.F32)])
    if c.op is Op.CACHED_DELTA_RULE:
        positions, seq_lens = c.x[6], c.x[7]
        valid = lw.op("Less", [positions, lw.op("Unsqueeze", [lw.cast(seq_lens, DType.I64), lw.const([1])])])
        valid = lw.op("Unsqueeze", [valid, lw.const([2, 3])])  # [B, S, 1, 1]
        zero = lw.scalar(0.0, DType.F32)
        g, beta = (lw.op("Where", [valid, x, zero]) for x in (g, beta))
    return q, k, v, g, beta


def _dims(c) -> tuple:
    heads = c.a["heads"]
    return heads, c.ins[0].shape[2] // heads, c.ins[2].shape[2] // heads


def _zero_state(lw, c, q: str) -> str:
    heads, dk, dv = _dims(c)
    shape = lw.op("Concat", [lw.op("Shape", [q], start=0, end=1), lw.const([heads, dk, dv])], axis=0)
    return lw.op("ConstantOfShape", [shape], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))


def _output(lw, c, o: str) -> str:
    out = lw.op("Reshape", [o, lw.const([0, 0, -1])])
    return out if c.outs[0].dtype == DType.F32 else lw.cast(out, c.outs[0].dtype)


def delta_rule(lw, c) -> str:
    q, k, v, g, beta = _inputs(lw, c)
    return _output(lw, c, _run(lw, c, q, k, v, g, beta, _zero_state(lw, c, q))[0])


def cached_delta_rule(lw, c) -> list:
    q, k, v, g, beta = _inputs(lw, c)
    o, state = _run(lw, c, q, k, v, g, beta, c.x[5])
    return [_output(lw, c, o), state]


def _run(lw, c, q, k, v, g, beta, state) -> tuple:
    """(o [B, S, H, V], the final state [B, H, K, V]): one step for a single token, else ``PREFILL``'s form."""
    if c.ins[0].shape[1] == 1:
        return _step_once(lw, q, k, v, g, beta, state)
    return (_scan if PREFILL == "scan" else _chunked)(lw, c, q, k, v, g, beta, state)


def _step(lw, state, decay, k_row, kb_col, v_row, q_row) -> tuple:
    """One token: S <- decay S; S <- S + (k beta) (v - S^T k)^T; o = S^T q. Rows [B, H, 1, D], columns
    [B, H, D, 1], decay [B, H, K or 1, 1]; the state is read by the first node only."""
    s1 = lw.op("Mul", [state, decay])
    delta = lw.op("Sub", [v_row, lw.op("MatMul", [k_row, s1])])
    s2 = lw.op("Add", [s1, lw.op("MatMul", [kb_col, delta])])
    return lw.op("MatMul", [q_row, s2]), s2


def _token_major(lw, q, k, v, g, beta, perm) -> tuple:
    """The step's operands for every token: q, k, v rows, k beta columns, exp(g) columns, transposed by ``perm``
    from [B, S, H, 1, D] / [B, S, H, D, 1]."""
    rows = [lw.op("Transpose", [lw.op("Unsqueeze", [x, lw.const([3])])], perm=perm) for x in (q, k, v)]
    kb = lw.op("Mul", [k, beta])
    cols = [lw.op("Transpose", [lw.op("Unsqueeze", [x, lw.const([4])])], perm=perm)
            for x in (kb, lw.op("Exp", [g]))]
    return (*rows, *cols)


def _step_once(lw, q, k, v, g, beta, state) -> tuple:
    q_row, k_row, v_row, kb_col, decay = _token_major(lw, q, k, v, g, beta, [0, 2, 1, 3, 4])
    # [B, H, 1, 1, D]: the one token's axis dropped
    q_row, k_row, v_row, kb_col, decay = (lw.op("Squeeze", [x, lw.const([2])])
                                          for x in (q_row, k_row, v_row, kb_col, decay))
    o, new = _step(lw, state, decay, k_row, kb_col, v_row, q_row)  # o: [B, H, 1, V]
    return lw.op("Transpose", [o], perm=[0, 2, 1, 3]), new


def _body(lw, build, n_inputs: int):
    """A Scan body: ``build(*input names)`` emits its nodes through ``lw`` and returns its output names; its
    constants become the body's initializers. All values f32."""
    saved = lw.nodes, lw.inits
    lw.nodes, lw.inits = [], []
    try:
        names = [lw.fresh("in") for _ in range(n_inputs)]
        outs = build(*names)
        renamed = [lw.fresh("out") for _ in outs]
        for o, r in zip(outs, renamed):  # the producing node writes the output (no copy per iteration)
            for n in lw.nodes:
                n.output[:] = [r if v == o else v for v in n.output]
                n.input[:] = [r if v == o else v for v in n.input]
        f32 = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
        out_vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in renamed]
        return helper.make_graph(lw.nodes, lw.fresh("body"), f32, out_vi, lw.inits)
    finally:
        lw.nodes, lw.inits = saved


def _scan(lw, c, q, k, v, g, beta, state) -> tuple:
    """The recurrence as a Scan over the tokens, from operands laid out token-first ([S, B, H, ...])."""
    operands = _token_major(lw, q, k, v, g, beta, [1, 0, 2, 3, 4])

    def step(s, q_row, k_row, v_row, kb_col, decay):
        o, new = _step(lw, s, decay, k_row, kb_col, v_row, q_row)
        return [new, o]

    body = _body(lw, step, 6)
    new, o = lw.op("Scan", [state, *operands], 2, body=body, num_scan_inputs=5)  # o: [S, B, H, 1, V]
    o = lw.op("Squeeze", [lw.op("Transpose", [o], perm=[1, 0, 2, 3, 4]), lw.const([3])])
    return o, new


def _chunked(lw, c, q, k, v, g, beta, state) -> tuple:
    """``delta_rule_chunked`` (ir/compute.py) in chunks of ``CHUNK`` tokens: within each chunk with cumulative
    gates G, A[i, j] = -beta_i k_i . (exp(G_i - G_j) k_j) (j < i), T = (I - A)^-1, u = T (beta v), w = T (beta k
    exp(G)); across chunks a Scan carries the state: v' = u - w S, o = (q exp(G)) S + att v' (att[i, j] = q_i .
    (exp(G_i - G_j) k_j), j <= i), S <- exp(G_last) S + (k exp(G_last - G))^T v'."""
    heads, dk, dv = _dims(c)
    per_channel = c.ins[3].shape[2] != heads
    size = CHUNK[per_channel]
    s = lw.op("Shape", [q], start=1, end=2)
    pad = lw.op("Mod", [lw.op("Sub", [lw.const([size]), lw.op("Mod", [s, lw.const([size])])]), lw.const([size])])
    pads = lw.op("Concat", [lw.const([0, 0, 0, 0, 0]), pad, lw.const([0, 0])], axis=0)

    def chunks(x, d):  # [B, S, H, D] -> [N, B, H, C, D], zero padded to N * C tokens
        x = lw.op("Reshape", [lw.op("Pad", [x, pads]), lw.const([0, -1, size, heads, d])])  # [B, N, C, H, D]
        return lw.op("Transpose", [x], perm=[1, 0, 3, 2, 4])

    q, k, v, g, beta = (chunks(x, d) for x, d in ((q, dk), (k, dk), (v, dv), (g, dk if per_channel else 1),
                                                  (beta, 1)))
    gc = lw.op("CumSum", [g, lw.const(3)])  # [N, B, H, C, K or 1]
    kb, vb = lw.op("Mul", [k, beta]), lw.op("Mul", [v, beta])
    strict = np.tril(np.ones((size, size), dtype=np.float32), -1)
    hidden = np.where(np.tril(np.ones((size, size), dtype=bool)), 0.0, -np.inf).astype(np.float32)
    # exp(G_i - G_j) over j <= i (0 above the diagonal: -inf added before the exp, which never overflows there)
    diff = lw.op("Sub", [lw.op("Unsqueeze", [gc, lw.const([4])]), lw.op("Unsqueeze", [gc, lw.const([3])])])
    if per_channel:  # [.., i, j, K]: each key channel's decay from token j to token i, times k_j
        decay = lw.op("Exp", [lw.op("Add", [diff, lw.const(hidden[..., None], dtype=np.float32)])])
        kdec = lw.op("Mul", [decay, lw.op("Unsqueeze", [k, lw.const([3])])])  # [N, B, H, C(i), C(j), K]
        # [kb_i, q_i] . (decay_ij k_j) for every i at once: [.., C(i), C(j), K] @ [.., C(i), K, 2]
        left = lw.op("Concat", [lw.op("Unsqueeze", [x, lw.const([5])]) for x in (kb, q)], axis=5)
        pair = lw.op("MatMul", [kdec, left])  # [N, B, H, C, C, 2]
        kk, att = (lw.op("Squeeze", [x, lw.const([5])]) for x in lw.op("Split", [pair, lw.const([1, 1])], 2, axis=5))
    else:  # one gate per head: [.., i, j] decays times the products of the keys
        decay = lw.op("Exp", [lw.op("Add", [lw.op("Squeeze", [diff, lw.const([-1])]),
                                             lw.const(hidden, dtype=np.float32)])])
        kt = lw.op("Transpose", [k], perm=[0, 1, 2, 4, 3])  # [N, B, H, K, C]
        kk, att = (lw.op("Mul", [lw.op("MatMul", [x, kt]), decay]) for x in (kb, q))
    a = lw.op("Mul", [kk, lw.const(-strict, dtype=np.float32)])  # A = -beta_i k_i . (decay_ij k_j), j < i
    eye = lw.const(np.eye(size, dtype=np.float32), dtype=np.float32)
    t = lw.op("Add", [eye, a])  # (I - A)^-1 = (I + A)(I + A^2)(I + A^4)... (A^C = 0)
    power, reach = a, 2
    while reach < size:
        power = lw.op("MatMul", [power, power])
        t = lw.op("Add", [t, lw.op("MatMul", [t, power])])
        reach *= 2
    egc = lw.op("Exp", [gc])
    u = lw.op("MatMul", [t, vb])  # [N, B, H, C, V]
    w = lw.op("MatMul", [t, lw.op("Mul", [kb, egc])])  # [N, B, H, C, K]
    # w and q exp(G) against the state in one product, so that every read of the state in the step comes before
    # its new version is written (they may share a buffer)
    wq = lw.op("Concat", [w, lw.op("Mul", [q, egc])], axis=3)  # [N, B, H, 2C, K]
    last = lw.op("Slice", [gc, lw.const([-1]), lw.const([_END]), lw.const([3])])  # [N, B, H, 1, K or 1]
    kd = lw.op("Transpose", [lw.op("Mul", [k, lw.op("Exp", [lw.op("Sub", [last, gc])])])], perm=[0, 1, 2, 4, 3])
    elast = lw.op("Transpose", [lw.op("Exp", [last])], perm=[0, 1, 2, 4, 3])  # [N, B, H, K or 1, 1]

    def step(st, u_c, wq_c, att_c, kd_c, el_c):
        ws, qs = lw.op("Split", [lw.op("MatMul", [wq_c, st]), lw.const([size, size])], 2, axis=2)
        vn = lw.op("Sub", [u_c, ws])
        o = lw.op("Add", [qs, lw.op("MatMul", [att_c, vn])])
        new = lw.op("Add", [lw.op("Mul", [st, el_c]), lw.op("MatMul", [kd_c, vn])])
        return [new, o]

    body = _body(lw, step, 6)
    new, o = lw.op("Scan", [state, u, wq, att, kd, elast], 2, body=body, num_scan_inputs=5)
    o = lw.op("Reshape", [lw.op("Transpose", [o], perm=[1, 0, 3, 2, 4]), lw.const([0, -1, heads, dv])])
    o = lw.op("Slice", [o, lw.const([0]), s, lw.const([1])])  # [B, S, H, V]
    return o, new


def _onnx(dtype: DType) -> int:
    return {DType.F32: TensorProto.FLOAT, DType.F16: TensorProto.FLOAT16, DType.F64: TensorProto.DOUBLE,
            DType.BF16: TensorProto.BFLOAT16}[dtype]
