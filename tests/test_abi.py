"""ir/abi.py: the importer and the default pipeline make graphs with exactly the interface's names."""

from __future__ import annotations

import lowerlm.ir as ir
from lowerlm.ir import abi
from lowerlm.ir.ops import Op
from lowerlm.ir.shapes import sym
from lowerlm.passes import run_pipeline
from tests.conftest import example_text, tiny_model


def _inputs(g: ir.Graph) -> tuple:
    return tuple(v.name for v in g.inputs)


def _check_forward(m: ir.Module) -> None:
    """A frontend module: one stateless ``forward`` over the interface, typed by the batch and sequence symbols."""
    assert [g.name for g in m.graphs] == [abi.FORWARD]
    g = m.graph(abi.FORWARD)
    assert _inputs(g) == abi.INTERFACE and not g.state
    b, s = sym(abi.BATCH), sym(abi.SEQ)
    assert [(v.type.dtype, v.type.shape) for v in g.inputs] == [(ir.DType.I64, (b, s)), (ir.DType.I64, (b, s)),
                                                                 (ir.DType.I32, (b,))]


def test_the_importers_graph_uses_the_interface():
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=16, intermediate_size=32)
    from lowerlm.frontend.trace import trace_model

    _check_forward(trace_model(model, use_cache=False))


def test_the_default_pipeline_makes_prefill_and_decode_with_the_interface():
    module = ir.parse_module(example_text())
    _check_forward(module)
    out = run_pipeline(module, dump=set())
    assert tuple(g.name for g in out.graphs) == (abi.PREFILL, abi.DECODE)
    prefill, decode = out.graph(abi.PREFILL), out.graph(abi.DECODE)
    assert _inputs(prefill) == abi.INTERFACE + (abi.LOGIT_INDEX,)
    assert _inputs(decode) == abi.INTERFACE
    b, s = sym(abi.BATCH), sym(abi.SEQ)
    assert prefill.type_of(abi.INPUT_IDS).shape == (b, s) and decode.type_of(abi.INPUT_IDS).shape == (b, 1)
    assert prefill.type_of(abi.LOGIT_INDEX).shape == (b, sym(abi.LOGIT_ROWS))
    # the caches: named by short_path of their owner, [B, Hkv, T, D], the same in both graphs
    assert [s.name for s in decode.state] == ["L0.kcache", "L0.vcache"]
    assert all(s.type.shape[:3] == (b, 2, sym(abi.CACHE_LEN)) for s in decode.state)
    assert prefill.state == decode.state


def test_activation_of_names_each_activation_node():
    b = ir.GraphBuilder()
    x = b.input("x", ir.TensorType(ir.DType.F32, (4,)))
    names = [b.add(op, [x], attrs) for op, attrs in
             ((Op.SILU, {}), (Op.GELU, {}), (Op.GELU, {"approximate": "tanh"}), (Op.TANH, {}))]
    g = b.build(names)
    assert [abi.activation_of(g.producer(n)) for n in names] == [abi.SILU, abi.GELU, abi.GELU_TANH, None]
    assert abi.ACTS == (abi.SILU, abi.GELU, abi.GELU_TANH) == ("silu", "gelu", "gelu_tanh")


def test_short_path():
    assert abi.short_path("model.layers.3.self_attn", ".self_attn") == "L3"
    assert abi.short_path("model.layers.12.mlp", ".mlp") == "L12"
    assert abi.short_path("model.layers.0.self-attn", ".self_attn") == "L0.self-attn"
    assert abi.short_path("layers.0.mlp") == "layers.0.mlp"
