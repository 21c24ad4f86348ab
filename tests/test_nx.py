"""The networkx view: dependences including state anti-dependences, cycle checks, liveness, DOT."""

from __future__ import annotations

import networkx as nx

import lowerlm.ir as ir
from lowerlm.ir.nx import fusion_creates_cycle, liveness, reachable, to_dot, to_networkx, topological_order

from .conftest import example_text

STATEFUL = """\
graph g(%x: f32[B,1,4], %positions: i64[B,1], %seq_lens: i32[B])
    state(%kc0: f32[B,1,T,4] kv) {
  %o0 = cached_attention(%x, %kc0, %kc0, %positions, %seq_lens) {scale=1.0} : f32[B,1,4]
  %kc1 = kv_cache_write(%kc0, %x, %positions) : f32[B,1,T,4]
  %o1 = cached_attention(%x, %kc1, %kc1, %positions, %seq_lens) {scale=1.0} : f32[B,1,4]
  %s = add(%o0, %o1) : f32[B,1,4]
  return %s state(%kc1)
}
"""


def test_reader_of_an_old_version_runs_before_its_writer():
    g = ir.parse_graph(STATEFUL)
    d = to_networkx(g)
    assert d.has_edge(0, 1) and d.edges[0, 1].get("anti")
    # put the writer first: the topological order must restore the reader before it
    shuffled = g.with_(nodes=(g.nodes[1], g.nodes[0]) + g.nodes[2:])
    fixed = topological_order(shuffled)
    ir.verify_graph(fixed)
    assert [n.name for n in fixed.nodes][:2] == ["o0", "kc1"]


def test_topological_order_keeps_a_valid_order():
    g = ir.parse_module(example_text()).graphs[0]
    assert topological_order(g) == g
    reversed_nodes = g.with_(nodes=tuple(reversed(g.nodes)))
    assert ir.print_graph(topological_order(reversed_nodes)) != ""
    ir.verify_graph(topological_order(reversed_nodes))


def test_reachability_and_fusion_cycles():
    g = ir.parse_graph(STATEFUL)
    assert reachable(g, 0, 3) and not reachable(g, 3, 0)
    # fusing o0 with s while o1 (which depends on o0 through the anti edge and feeds s) stays out: a cycle
    assert fusion_creates_cycle(g, {0, 3})
    assert not fusion_creates_cycle(g, {2, 3})
    assert not fusion_creates_cycle(g, {0, 1, 2, 3})


def test_liveness():
    g = ir.parse_graph(STATEFUL)
    live = liveness(g)
    assert live["x"] == (-1, 2)
    assert live["o0"] == (0, 3)
    assert live["s"] == (3, 4) and live["kc1"] == (1, 4)


def test_dot_export_names_ops_values_and_sources():
    g = ir.parse_module(example_text()).graphs[0]
    dot = to_dot(g)
    assert dot.startswith('digraph "forward" {')
    assert "rms_norm" in dot and "model.layers.0.input_layernorm" in dot and '"return %logits"' in dot
    assert nx.is_directed_acyclic_graph(to_networkx(g))
