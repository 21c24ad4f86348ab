"""The reference backend: every IR op with plain torch. It is the oracle every other backend and every pass is
tested against, so it favours the obvious formulation over speed.

State is functional here: ``kv_cache_write`` returns a new cache tensor and ``run`` returns the final version of
every state. Weights (params and weight expressions) are evaluated once per program, when it is built.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from lowerlm.ir.errors import CompileError, InputError
from lowerlm.ir.fold import CORE_OPS, by_slot, run_core
from lowerlm.ir.graph import Graph, Module, Node
from lowerlm.ir.ops import Op
from lowerlm.ir.rope import rope_cos_sin, rotate
from lowerlm.ir.shapes import Sym, evaluate
from lowerlm.ir.weights import Param, evaluate_weight, tensor_digest, weight_fingerprint


# ---- LLM ops ------------------------------------------------------------------------------------------------
def rms_norm(x, w, eps: float):
    # x: [..., H]; computed in f32 and cast back before the weight, as transformers' LlamaRMSNorm does
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def rope(q, k, positions, heads, inv_freq, scaling: float, layout: str):
    # q: [B, S, Hq*D], k: [B, S, Hk*D]; the first R = 2*len(inv_freq) dims of each head rotate
    cos, sin = rope_cos_sin(positions, inv_freq, scaling, layout, q.dtype)
    rdim = cos.shape[-1]
    out = []
    for x, h in zip((q, k), heads):
        b, s, width = x.shape
        xh = x.reshape(b, s, h, width // h)
        rot, rest = xh[..., :rdim], xh[..., rdim:]
        rot = rot * cos + rotate(rot, layout) * sin
        out.append(torch.cat([rot, rest], -1).reshape(b, s, width))
    return tuple(out)


def _heads(x, h):
    # [B, S, H*D] -> [B, H, S, D]
    b, s, width = x.shape
    return x.reshape(b, s, h, width // h).transpose(1, 2)


def _attend(q, k, v, visible, scale: float):
    # q: [B, Hq, S, D]; k, v: [B, Hk, L, D*]; visible: [B, S, L] bool -> [B, S, Hq*Dv]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # query head h reads kv head h // rep
    mask = visible[:, None, :, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = torch.where(visible.any(-1)[:, None, :, None], out, torch.zeros((), dtype=out.dtype))
    b, h, s, dv = out.shape
    return out.transpose(1, 2).reshape(b, s, h * dv)


def _visible(q_pos, k_pos, k_valid, causal: bool, window: int):
    # q_pos: [B, S], k_pos: [B, L], k_valid: [B, L] -> [B, S, L]
    vis = k_valid[:, None, :].expand(-1, q_pos.shape[1], -1)
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    if causal:
        vis = vis & (diff >= 0)
    if window:
        vis = vis & (diff < window)
    return vis


def attention(q, k, v, positions, seq_lens, heads, scale, causal, window):
    hq, hk = heads
    s = q.shape[1]
    k_valid = torch.arange(s)[None, :] < seq_lens[:, None].long()
    vis = _visible(positions, positions, k_valid, causal, window)
    return _attend(_heads(q, hq), _heads(k, hk), _heads(v, hk), vis, scale)


def kv_cache_write(cache, values, positions, inplace: bool = False):
    # cache: [B, Hk, T, D]; values: [B, S, Hk*D]; slots with positions outside [0, T) are skipped. In place only
    # when the caller owns the buffer (the verifier's state linearity makes that sound).
    b, hk, t, d = cache.shape
    out = cache if inplace else cache.clone()
    valid = (positions >= 0) & (positions < t)
    bi, si = valid.nonzero(as_tuple=True)
    out[bi, :, positions[bi, si], :] = values.reshape(b, -1, hk, d)[bi, si].to(out.dtype)
    return out


def cached_attention(q, k_cache, v_cache, positions, seq_lens, scale, causal, window):
    b, hk, t, d = k_cache.shape
    # slots at or past the longest valid length are never visible: leave them out (exact, and T may be large)
    t = max(1, min(t, int(seq_lens.max()) if seq_lens.numel() else 1))
    k_cache, v_cache = k_cache[:, :, :t], v_cache[:, :, :t]
    slots = torch.arange(t)[None, :].expand(b, -1)
    vis = _visible(positions, slots, slots < seq_lens[:, None].long(), causal, window)
    return _attend(_heads(q, q.shape[2] // d), k_cache, v_cache, vis, scale)


def activation(x, act: str):
    if act == "silu":
        return F.silu(x)
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise CompileError(f"unknown activation '{act}'")


def rms_norm_linear(x, norm_weight, weight, bias, residual, eps, splits, act):
    # x: [..., H]; weight: [N, H] -> pieces [..., n] (or act(gate) * up), then the new residual stream
    r = x if residual is None else x + residual
    y = F.linear(rms_norm(r, norm_weight, eps), weight, bias)
    pieces = list(torch.split(y, list(splits), dim=-1))
    if act != "none":
        pieces = [activation(pieces[0], act) * pieces[1]]
    return tuple(pieces + ([r] if residual is not None else []))


def arm_mlp(x, norm_weight, gate_m, up, down_scaled, mu, scale, residual, eps, tau, act):
    # x: [..., H]; gate_m: [I + H, H] = [W_g; M]; up: [I, H]; down_scaled: [H, I] = W_d diag(scale)
    h = rms_norm(x, norm_weight, eps)
    i = up.shape[0]
    gm = F.linear(h, gate_m)
    g, m = gm[..., :i], gm[..., i:]
    a_hat = (activation(g, act) - mu) / scale
    a_hat = torch.where(a_hat.abs() >= tau, a_hat, torch.zeros((), dtype=a_hat.dtype))
    y = F.linear(a_hat * F.linear(h, up), down_scaled) + m
    return y if residual is None else y + residual


# ---- MoE (docs/models.md) ---------------------------------------------------------------------------------------
def moe_route(x, router, bias, router_kind, top_k, n_group, topk_group, renormalize, scaling, router_f32,
              weights_f32):
    # x: [..., H] -> ids i32[..., k], weights [..., k]: transformers' routers, with their rounding points
    lead, h = x.shape[:-1], x.reshape(-1, x.shape[-1])
    logits = F.linear(h.float(), router.float()) if router_f32 else F.linear(h, router)
    if router_kind == "softmax":  # Mixtral, Qwen3-MoE: softmax in f32, top-k
        w, ids = torch.topk(torch.softmax(logits.float(), -1), top_k, -1)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
    else:  # DeepSeek-V3, Kimi: sigmoid scores, chosen by score + bias within the best groups
        scores = logits.sigmoid()
        choice = scores if bias is None else scores + bias
        if n_group > 1:
            e = choice.shape[-1]
            groups = choice.view(-1, n_group, e // n_group).topk(2, -1)[0].sum(-1)
            keep = torch.topk(groups, topk_group, -1, sorted=False)[1]
            allowed = torch.zeros_like(groups).scatter_(1, keep, 1).bool().repeat_interleave(e // n_group, 1)
            choice = choice.masked_fill(~allowed, float("-inf"))
        ids = torch.topk(choice, top_k, -1, sorted=False)[1]
        w = scores.gather(1, ids)
        if renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scaling
    w = w if weights_f32 else w.to(x.dtype)
    return ids.to(torch.int32).reshape(*lead, top_k), w.reshape(*lead, top_k)


def moe(x, router, bias, gate_up, down, shared_gate, shared_up, shared_down, act, **route):
    # the block as transformers runs it: every expert over its tokens, added into the output in expert order
    ids, w = moe_route(x, router, bias, **route)
    k = ids.shape[-1]
    h = x.reshape(-1, x.shape[-1])
    ids, w = ids.reshape(-1, k), w.reshape(-1, k)
    out = torch.zeros_like(h)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(h[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(activation(gate, act) * up, down[e]) * w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    out = out.reshape(x.shape)
    if shared_gate is not None:
        out = out + F.linear(activation(F.linear(x, shared_gate), act) * F.linear(x, shared_up), shared_down)
    return out


def moe_sort(ids, experts: int):
    # the (token, k) pairs stably sorted by expert, and where each expert's rows start
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(torch.bincount(flat, minlength=experts), 0)
    return order.to(torch.int32), offsets.to(torch.int32)


def grouped_gemm(x, w, order, offsets, scale, gather: int, act: str):
    rows = x.reshape(-1, x.shape[-1])[order.long() // gather] if gather else x
    n = w.shape[1] // 2 if act != "none" else w.shape[1]
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    picked = scale.reshape(-1)[order.long()] if scale is not None else None
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue  # an expert without tokens
        y = F.linear(rows[lo:hi], w[e])
        if act != "none":
            gate, up = y.chunk(2, dim=-1)
            y = activation(gate, act) * up
        if picked is not None:
            y = (y * picked[lo:hi, None]).to(x.dtype)
        out[lo:hi] = y
    return out


def moe_combine(y, order, like, top_k: int):
    out = torch.zeros(like.numel() // like.shape[-1], like.shape[-1], dtype=y.dtype, device=y.device)
    out.index_add_(0, order.long() // top_k, y)  # rows in expert order: each token's sum in expert order
    return out.reshape(like.shape)


_ROUTE_ATTRS = ("top_k", "n_group", "topk_group", "renormalize", "scaling", "router_f32", "weights_f32")


def route_attrs(a: dict) -> dict:
    return {"router_kind": a["router"], **{k: a[k] for k in _ROUTE_ATTRS}}


def _llm(node: Node, args: list, inplace: bool = False):
    a = node.all_attrs()
    op = node.op
    if op is Op.RMS_NORM:
        return rms_norm(args[0], args[1], a["eps"])
    if op is Op.ROPE:
        return rope(*args, a["heads"], a["inv_freq"], a["scaling"], a["layout"])
    if op is Op.RMS_NORM_LINEAR:
        return rms_norm_linear(*by_slot(node, args), a["eps"], a["splits"], a["act"])
    if op is Op.SWIGLU:
        return activation(args[0], a["act"]) * args[1]
    if op is Op.ARM_MLP:
        return arm_mlp(*by_slot(node, args), a["eps"], a["tau"], a["act"])
    if op is Op.ATTENTION:
        return attention(*args, a["heads"], a["scale"], a["causal"], a["window"])
    if op is Op.KV_CACHE_WRITE:
        return kv_cache_write(*args, inplace=inplace)
    if op is Op.CACHED_ATTENTION:
        return cached_attention(*args, a["scale"], a["causal"], a["window"])
    if op is Op.MOE:
        return moe(*by_slot(node, args), a["act"], **route_attrs(a))
    if op is Op.MOE_ROUTE:
        return moe_route(*by_slot(node, args), **route_attrs(a))
    if op is Op.MOE_SORT:
        return moe_sort(args[0], a["experts"])
    if op is Op.GROUPED_GEMM:
        return grouped_gemm(*by_slot(node, args), a["gather"], a["act"])
    if op is Op.MOE_COMBINE:
        return moe_combine(*args, a["top_k"])
    raise CompileError(f"the reference backend has no implementation of {op}")


LLM_OPS = frozenset({Op.RMS_NORM, Op.ROPE, Op.ATTENTION, Op.KV_CACHE_WRITE, Op.CACHED_ATTENTION,
                     Op.RMS_NORM_LINEAR, Op.SWIGLU, Op.ARM_MLP, Op.MOE, Op.MOE_ROUTE, Op.MOE_SORT, Op.GROUPED_GEMM,
                     Op.MOE_COMBINE})
IMPLEMENTED = CORE_OPS | LLM_OPS | {Op.PARAM, Op.WEIGHT}


# ---- programs -----------------------------------------------------------------------------------------------
def bind_symbols(declared, actual, env: dict, what: str) -> None:
    """Bind the symbols of a declared shape to an actual shape; raise InputError on a mismatch."""
    if len(declared) != len(actual):
        raise InputError(f"{what}: expected rank {len(declared)} {list(map(str, declared))}, got {list(actual)}")
    for d, n in zip(declared, actual):
        if isinstance(d, Sym) and len(d.terms) == 1 and d.terms[0][1] == 1 and len(d.terms[0][0]) == 1 \
                and isinstance(d.terms[0][0][0][0], str) and d.terms[0][0][0][1] == 1:
            name = d.terms[0][0][0][0]
            if env.setdefault(name, n) != n:
                raise InputError(f"{what}: dimension {name} is {env[name]} elsewhere but {n} here")
    for d, n in zip(declared, actual):
        try:
            want = evaluate(d, env)
        except KeyError:
            continue
        if want != n:
            raise InputError(f"{what}: expected shape {list(map(str, declared))}, got {list(actual)}")


class ReferenceProgram:
    """A module ready to run on the reference backend: ``run(graph, inputs, state) -> (outputs, new_state)``."""

    device = torch.device("cpu")

    def __init__(self, module: Module, weights: Mapping[str, torch.Tensor], device=None, lazy: bool = False):
        """``lazy``: evaluate each weight expression (a concatenated q|k|v, …) when it is first read instead of
        now (the ONNX backend reads none when its lowered graphs come from the compile cache)."""
        if device is not None:
            self.device = torch.device(device)
        self.module = module
        self.weights = weights
        missing = [n for n, _ in module.params if n not in weights]
        if missing:
            raise CompileError(f"weights missing for params: {', '.join(missing[:5])}")
        self._param_digests: dict = {}
        self._constants: dict = dict.fromkeys(k for g in module.graphs for k in self._weight_keys(g))
        self._made_constants: dict = {}  # constant nodes' tensors by attributes
        if not lazy:
            for key in self._constants:
                self.constant(key)

    def constant(self, key):
        """The tensor of a weight key (``Param`` or weight expression), evaluated on first use."""
        value = self._constants[key]
        if value is None:
            value = self._constants[key] = evaluate_weight(key, self.weights.__getitem__).to(self.device)
        return value

    @staticmethod
    def _weight_key(node: Node):
        return Param(node.attrs["name"]) if node.op is Op.PARAM else node.attrs["expr"]

    @classmethod
    def _weight_keys(cls, graph: Graph) -> list:
        """The weight keys ``graph`` reads, in order."""
        return [cls._weight_key(n) for n in graph.nodes if n.op in (Op.PARAM, Op.WEIGHT)]

    def param_digest(self, name: str) -> str:
        if name not in self._param_digests:
            self._param_digests[name] = tensor_digest(self.weights[name])
        return self._param_digests[name]

    def weight_fingerprint(self, graph: Graph | None = None) -> str:
        """A digest over every weight the program evaluates, or only those ``graph`` reads (expression structure and
        parameter values)."""
        import hashlib

        keys = self._constants if graph is None else set(self._weight_keys(graph))
        h = hashlib.sha256()
        for key in sorted(keys, key=repr):
            h.update(weight_fingerprint(key, self.param_digest).encode())
        return h.hexdigest()[:16]

    def run(self, graph: str | Graph, inputs: Mapping[str, torch.Tensor] | list,
            state: Mapping[str, torch.Tensor] | None = None, symbols: Mapping[str, int] | None = None,
            inplace: bool = False, observe=None) -> tuple[list, dict]:
        """Run a graph. Shape symbols bind from the inputs' shapes; ``symbols`` gives those that appear only
        inside compound dimensions such as ``(S+1)//2``. With ``inplace`` state writes update the given state
        tensors (the runtime's buffers) instead of copies. ``observe(node, results)`` sees every node's results
        (calibration collects activations with it)."""
        g = self.module.graph(graph) if isinstance(graph, str) else graph
        values, env = bind_inputs(g, inputs, state, symbols, self.device)
        plan = self.plan(g)
        for node in g.nodes:
            args = [values[i] for i in node.args]
            if node.op in (Op.PARAM, Op.WEIGHT):
                out = self.constant(self._weight_key(node))
            else:
                out = self.execute(node, args, env, inplace, values, plan)
            outs = out if isinstance(out, tuple) else (out,)
            if observe is not None:
                observe(node, outs)
            for r, t in zip(node.results, outs):
                values[r.name] = t
        return ([values[o] for o in g.outputs],
                {s.name: values[o] for s, o in zip(g.state, g.state_outputs)})

    def plan(self, g: Graph) -> dict:
        """Per-graph decisions a backend makes once (which nodes it fuses); none here."""
        return {}

    def execute(self, node: Node, args: list, env: dict, inplace: bool, values: dict, plan: dict):
        """One node's results from its inputs' values."""
        if node.op is Op.CONSTANT:  # made once, on the program's device
            if node.attrs not in self._made_constants:
                self._made_constants[node.attrs] = run_core(node, [], env).to(self.device)
            return self._made_constants[node.attrs]
        if node.op in CORE_OPS:
            return run_core(node, args, env)
        return _llm(node, args, inplace)

    def _check(self, name, type_, given: Mapping, env: dict, what: str):
        return check_tensor(name, type_, given, env, what, self.device)


def bind_inputs(g: Graph, inputs, state, symbols, device) -> tuple[dict, dict]:
    """(values by name, symbol bindings) for ``g``'s inputs (a mapping or a list in input order) and state, each
    checked against its declared type and ``device``."""
    if not isinstance(inputs, Mapping):
        inputs = dict(zip((v.name for v in g.inputs), inputs))
    state = state or {}
    env: dict = dict(symbols or {})
    values = {v.name: check_tensor(v.name, v.type, inputs, env, "input", device) for v in g.inputs}
    values.update({s.name: check_tensor(s.name, s.type, state, env, "state", device) for s in g.state})
    unbound = set().union(*(v.type.symbols for v in g.inputs + g.state)) - set(env)
    if unbound:
        raise InputError(f"shape symbols {', '.join(sorted(unbound))} cannot be read off the inputs of graph "
                         f"'{g.name}'; pass symbols={{...}}")
    return values, env


def check_tensor(name, type_, given: Mapping, env: dict, what: str, device) -> torch.Tensor:
    """``given[name]`` checked against its declared type and ``device``; binds the shape's symbols in ``env``."""
    if name not in given:
        raise InputError(f"{what} %{name} ({type_}) was not given")
    t = given[name]
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what} %{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise InputError(f"{what} %{name} is on {t.device}; this program runs on {device}")
    if t.dtype != type_.dtype.to_torch():
        raise InputError(f"{what} %{name} must have dtype {type_.dtype}, got {t.dtype}")
    bind_symbols(type_.shape, tuple(t.shape), env, f"{what} %{name}")
    return t
