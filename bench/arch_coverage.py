"""Which of transformers' causal-LM architectures lowerlm compiles exactly, per backend.

Enumerates transformers' causal-LM registry, builds each architecture tiny with random weights (hidden 32, 4 query
and 2 kv heads of 8, vocab 64, every sub-config -- vision, audio, ... -- shrunk too; 2 to 8 layers, the fewest that
hold every kind of layer its family's config names: sliding and full attention, linear and full attention, dense and
MoE, ...; windows and chunks smaller than the test length; every 1-D parameter -- norm weights, biases -- randomised,
so a dropped term cannot match by accident; matrices drawn with std 1/sqrt(fan-in), so attention is far from
uniform and a wrong mask, window or soft-cap shows; soft-caps small enough to bite), compiles it on each backend
and compares with eager: logits of a 2x9 batch (max abs error <= 1e-4 x max |logit|, f32) and 8 greedy tokens.
Each architecture x backend is one of:

- ``match``: both agree;
- ``refused: <reason>``: compile_model (or the first call) raised lowerlm's one-line error;
- ``MISMATCH <err>``: compiled and ran, and gave other logits or tokens: a silent wrong result, the worst defect;
- ``error: <type>``: anything else (a crash lowerlm should have turned into a refusal).

``--write COVERAGE.md`` writes the table; ``--only a,b`` runs some architectures, ``--backends`` some backends
(default all three; without CUDA, Triton's kernels run in its interpreter); ``--smoke`` runs two architectures on
every backend (CI's subset). The full run is one command: ``python bench/arch_coverage.py --write COVERAGE.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
import sys
import time
import warnings

import torch

# Sizes every architecture is shrunk to, each set where its config has the attribute (one size goes by several
# names across families: n_embd, d_model, ...). Layer counts are not here: _tiny_config picks one per family.
TINY = dict(
    # widths, heads, vocabularies, positions
    vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8,
    max_position_embeddings=128, n_embd=32, n_head=4, n_heads=4, num_heads=4, n_positions=128, d_model=32,
    ffn_dim=64, ffn_hidden_size=64, d_inner=64, dim_ff=64, dff=64, feed_forward_size=64, attention_head_size=8,
    embedding_size=32, embedding_dim=32, emb_dim=32, word_embed_proj_dim=32, input_embedding_size=32,
    output_embedding_size=32, decoder_vocab_size=64, unpadded_vocab_size=64, hidden_size_global=32,
    encoder_hash_byte_group_vocab=64, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, laurel_rank=8,
    router_hidden_size=32, hc_lowrank=8, shape_vocab_size=64, shape_embed_dim=32, pronunciation_vocab_size=64,
    pronunciation_embed_dim=32, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
    # vision and audio towers of multimodal families (a text-only forward does not run them, but they are built)
    mlp_dim=64, output_channels=32, ext_pw_out_channel=32, depthwise_separable_out_channel=32,
    nemo_conv_channels=32, adapter_in_dim=32, adapter_input_size=32, adapter_out_dim=32,
    # mixtures of experts: few small experts, grouped routing of two experts a group, dense layers among MoE ones
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, moe_num_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, moe_topk=2, moe_k=2, n_group=2, num_expert_group=2,
    topk_group=1, n_shared_experts=1, shared_expert_intermediate_size=32, shared_intermediate_size=32,
    shared_experts_intermediate_size=32, moe_shared_expert_intermediate_size=32, expert_ffn_hidden_size=32,
    dense_intermediate_size=64, first_dense_intermediate_size=64, intermediate_size_mlp=64,
    mlp_only_intermediate_size=64, first_k_dense_replace=1, num_dense_layers=1, interleave_moe_layer_step=2,
    # multi-head latent attention (DeepSeek-V2 and its kin): latent ranks and per-head q/k/v dims that fit together
    q_lora_rank=16, kv_lora_rank=16, o_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
    # sparse-attention indexers (DeepSeek-V3.2 and its kin): small heads; index_topk the real models' 2048, since
    # lowerlm computes DSA exactly up to index_topk keys and refuses a longer max_seq_len (the limit and the
    # refusal are tested with a small index_topk in tests/test_sparse_attention.py)
    index_head_dim=8, index_n_heads=2, index_num_heads=2, index_topk=2048,
    # linear-attention (Gated DeltaNet, ...) and state-space (Mamba) layers: heads x head dim = expand (2) x hidden
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_head_dim=8, linear_num_heads=4, mamba_n_heads=8, mamba_num_heads=8, mamba_d_head=8, mamba_head_dim=8,
    mamba_d_ssm=64, mamba_d_state=16, ssm_state_size=16, state_size=16,
    # encoder-decoder families, whose decoder runs alone as a causal LM
    encoder_layers=2, decoder_layers=2, num_encoder_layers=2, num_decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
    # partial rotary embeddings (CodeGen, GPT-J, ...) rotate fewer dims than a head has
    rotary_dim=4,
    # windows, chunks and blocks shorter than the test's sequences (9 and 5 + 8 tokens), so that they take effect
    sliding_window=4, attention_window_size=4, window_size=4, sliding_window_size=4, attention_chunk_size=4,
    local_attention_window_len=4, chunk_size=4, mamba_chunk_size=4, block_size=4,
    local_attention=8,  # ModernBERT-decoder's window is half of it
    n_layers_per_attn_res_block=2,  # Inkling 2's attention-residual blocks: several in a tiny build
    # soft-caps (Gemma-2, ...) small enough to change scores and logits of this size (their defaults, 30-50, do not)
    attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
)
# None switches these off (a full-rank q projection, ungrouped routing): a config that has them None keeps them so
KEEP_NONE = ("q_lora_rank", "n_group", "topk_group")
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "num_blocks")  # a depth, however named
MAX_LAYERS = 8  # the deepest tiny build: enough for every layer kind of the hybrid families' patterns
# model_type (of a config or sub-config) -> its attributes where the generic rules miss, each saying why. A layer
# count here is the depth the family starts from (its per-layer lists are given for that depth).
FAMILY: dict = {
    "bamba": dict(attn_layer_indices=[1]),  # no attention layer by default, and its mask needs one
    "blt": dict(use_cache=False),  # its cache is sized by num_hidden_layers, which BltConfig lacks
    # its rope parameters are keyed by layer type, and the defaults give none
    "cohere_compass_text": dict(
        num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                         for t in ("sliding_attention", "full_attention")}),
    # its attention reads attn_config.rope_theta, which DbrxAttentionConfig lacks, and clamps q/k/v unconditionally
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=500000.0, clip_qkv=8.0)),
    "dory": dict(n_input_layers=1, n_output_layers=1),  # its recurrent section is the layers between these
    # the swa_* sizes make the per-layer config of its sliding layers (latent attention too)
    "dots3_note_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=16,
                            swa_kv_lora_rank=16, swa_head_dim=12, swa_qk_nope_head_dim=8, swa_v_head_dim=8),
    # the last two layers reuse the keys and values of the first two; the first layer's activations are sparse
    "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    "gemma4_text": dict(global_head_dim=16),  # the head size of its full-attention layers (512 by default)
    "gemma4_unified_text": dict(global_head_dim=16),  # likewise
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]]),  # its layer kinds come from this
    "granitemoehybrid": dict(num_hidden_layers=2, layer_types=["mamba", "attention"]),  # Mamba layers only, else
    # its loop section (run several passes) between attention-residual block boundaries, in a 6-layer build
    "inkling2_loop_text": dict(loop_layer_index_start=2, loop_layer_index_end=4, loop_num_passes=2, loop_gate_rank=8),
    # NVFP4 rounding of keys and values needs a head_dim multiple of 16. Its indexed-attention layers share keys and
    # values (the second reads the first's), so two are needed; fewer local and sink tokens than the test has
    "kolibri1_1": dict(head_dim=16, num_hidden_layers=4, layer_types=["sliding_attention", "indexed_attention"] * 2,
                       index_num_local_tokens=2, index_num_sink_tokens=1),
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),  # attention layers only, else
    "lfm2_moe": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),  # no layer_types, else
    "longcat_flash": dict(head_dim=4),  # its rotary embedding's head_dim: the q/k rope dims
    "mamba2": dict(num_heads=8),  # num_heads x head_dim must be expand x hidden_size
    # its first layer has no attention norm: a second full-attention layer is another kind
    "modernbert-decoder": dict(num_hidden_layers=3, global_attn_every_n_layers=2),
    # its input ids are a row per codebook: a batch of 2 rows is 2 sequences of one codebook
    "musicgen_decoder": dict(num_codebooks=1),
    "musicgen_melody_decoder": dict(num_codebooks=1),
    # its indexed-attention layers need these, unset by default
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                           indexer_compress_ratio=2),
    # its layers are attn_layers (a tuple, 6 by default): one of each kind; axial position embeddings factor the
    # positions and the width; chunks shorter than the test; LSH attention hashes with random rotations, drawn from
    # hash_seed when it is set (else anew each call)
    "reformer": dict(attn_layers=["local", "lsh"], axial_pos_shape=[8, 16], axial_pos_embds_dim=[16, 16],
                     local_attn_chunk_length=4, lsh_attn_chunk_length=4, hash_seed=0),
    "xlstm": dict(hidden_size=64, embedding_dim=64, qk_dim_factor=1.0),  # q/k/v widths round up to 64s
    # its hybrid layers share one transformer block (tied across them): two are needed for the tie
    "zamba": dict(num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid"] * 2),
    # likewise, with a small adapter per hybrid layer
    "zamba2": dict(num_hidden_layers=4, layers_block_type=["linear_attention", "hybrid"] * 2, adapter_rank=8),
    "zaya": dict(num_experts_per_tok=1),  # the only value it supports
}
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
MAX_PARAMS = 20_000_000  # a tiny build larger than this kept a size the config names differently
TIMEOUT_S = 120  # per architecture and backend


def registry() -> dict:
    """model_type -> causal-LM class name, as transformers maps them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _attr(cfg, name: str, default=None):
    """``cfg.name``, or ``default`` where it has none or will not say (a property that raises); a heterogeneous
    config's per-layer attribute (Gemma 4's head_dim) is read as its global value."""
    with warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")
        read = getattr(cfg, "_getattr_without_heterogeneous_validation", None)
        return read(name, default) if read else getattr(cfg, name, default)
    return default


def _fields(cls) -> set:
    """The attributes a config class takes: its dataclass fields, under their own names or their aliases (GPT-2's
    hidden_size for n_embd); not the properties it derives (Falcon's head_dim) or refuses (XLNet's
    max_position_embeddings)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return names | {alias for alias, name in cls.attribute_map.items() if name in names}


def _depth(cfg) -> int | None:
    """A config's layer count, whichever name it has."""
    return next((v for k in LAYER_COUNTS if isinstance(v := _attr(cfg, k), int)), None)


def _layer_patterns(cfg) -> dict:
    """name -> per-layer pattern of a config: each list attribute (properties too) with one entry per layer
    (layer_types, mlp_layer_types, layers_block_type, no_rope_layers, ...), and each list of layer indices
    (mlp_only_layers, cross_attention_layers, hybrid_layer_ids, ...) as a per-layer membership mask."""
    depth, out = _depth(cfg), {}
    for name in dir(cfg):
        value = None if name.startswith("_") or name.endswith("token_id") else _attr(cfg, name)
        if isinstance(value, list) and len(value) == depth:
            out[name] = value
        elif (isinstance(value, list) and value and all(type(i) is int for i in value)
              and re.search(r"layers$|layer_ids$|layer_indices$", name)):
            out[name] = [i in value for i in range(depth)]
    return out


def _kinds(cfg) -> dict:
    """name -> the set of layer kinds each per-layer pattern names; a pattern of more kinds than MAX_LAYERS (a
    per-layer list of source-layer indices, say) names no kinds and is left out."""
    kinds = {k: set(map(str, v)) for k, v in _layer_patterns(cfg).items()}
    return {k: v for k, v in kinds.items() if len(v) <= MAX_LAYERS}


def _rules(default) -> dict:
    """Settings that follow from what else a family's config has."""
    rules = {}
    if _attr(default, "kv_lora_rank"):  # latent attention: keys and values for every q head, from the latent
        rules["num_key_value_heads"] = TINY["num_attention_heads"]
    if _attr(default, "use_sliding_window") is not None:  # Qwen2 and kin: sliding windows switched on ...
        rules["use_sliding_window"] = True
    if _attr(default, "max_window_layers") is not None:  # ... from this layer on (the ones before are full)
        rules["max_window_layers"] = 1
    if _attr(default, "mlp_only_layers") == []:  # Qwen2-MoE and kin: a dense layer among the MoE ones
        rules["mlp_only_layers"] = [0]
    return rules


def _at_depth(cls, kwargs: dict, full, depth: int):
    """``cls`` at ``depth`` layers: its own __post_init__ derives the layer patterns it derives for that depth;
    those it keeps as given (or from the family's defaults) are cut to the first ``depth`` layers."""
    fields = _fields(cls)
    kwargs = {**kwargs, **{k: depth for k in LAYER_COUNTS if k in fields}}
    try:
        cfg = cls(**kwargs)
    except Exception:  # noqa: BLE001 -- a pattern left at the full depth fails validation: cut every one
        stale = [k for k in _layer_patterns(full) if k in fields]
    else:
        patterns = _layer_patterns(cfg)
        stale = [k for k in _layer_patterns(full) if k in fields and len(patterns.get(k, ())) != depth]
        if not stale:
            return cfg
    for k in stale:
        value = _attr(full, k)
        kwargs[k] = value[:depth] if len(value) == _depth(full) else [i for i in value if i < depth]
    return cls(**kwargs)


def _tiny_kwargs(cls, base: dict, every_kind: bool) -> dict:
    """Keyword arguments for a tiny config of class ``cls`` (``base``: the defaults its parent config gives it):
    TINY's sizes, the rules, its sub-configs (text, vision, audio, ...) shrunk alike, token ids inside the tiny
    vocabulary, then FAMILY's attributes."""
    import transformers

    default, fields = cls(**base), _fields(cls)
    kwargs = dict(base)
    for k, v in TINY.items():
        if k in fields and not (k in KEEP_NONE and _attr(default, k) is None):
            kwargs[k] = v
    kwargs.update({k: v for k, v in _rules(default).items() if k in fields})
    lm = default.get_text_config(decoder=True)  # every layer kind is needed in the language model only
    for k in fields:
        if isinstance(sub := _attr(default, k), transformers.PreTrainedConfig):
            spec = getattr(cls, "sub_configs_defaults", {}).get(k)  # transformers 5.17 has none
            kwargs[k] = _tiny_config(type(sub), dict(spec.init_kwargs) if spec else {}, every_kind and sub is lm)
    for k in SPECIAL_IDS:  # token ids of the full vocabulary, past the tiny one
        v = _attr(default, k) if k in fields else None
        if isinstance(v, int) and v >= TINY["vocab_size"]:
            kwargs[k] = 1
        elif isinstance(v, list):
            kwargs[k] = [i if i < TINY["vocab_size"] else 1 for i in v]
    return {**kwargs, **FAMILY.get(cls.model_type, {})}


def _tiny_config(cls, base: dict, every_kind: bool = True):
    """A config of class ``cls`` with _tiny_kwargs, at the fewest layers (from 2, or the depth FAMILY gives, to
    MAX_LAYERS) that have every kind of layer the family's full depth has (where ``every_kind``; a multimodal
    config's other towers need not): a prefix of its layer pattern."""
    kwargs = _tiny_kwargs(cls, base, every_kind)
    full = cls(**kwargs)  # tiny widths at the family's own depth: its layer patterns name every kind of layer
    if _depth(full) is None:
        return full
    want = _kinds(full) if every_kind else {}
    first = next((kwargs[k] for k in LAYER_COUNTS if k in FAMILY.get(cls.model_type, {})), 2)
    for depth in range(first, max(MAX_LAYERS, first) + 1):
        cfg = _at_depth(cls, kwargs, full, depth)
        have = _kinds(cfg)
        if all(kinds <= have.get(k, set()) for k, kinds in want.items()):
            return cfg
    missing = {k: sorted(v - have.get(k, set())) for k, v in want.items() if not v <= have.get(k, set())}
    raise ValueError(f"{MAX_LAYERS} layers still miss layer kinds {missing}")


def tiny(model_type: str):
    """The architecture built tiny with random weights, in eval mode; raises when transformers cannot build it so
    or its own forward fails on a 2x9 batch (then it is not counted as buildable)."""
    import transformers

    lm = getattr(transformers, registry()[model_type])
    cfg = _tiny_config(transformers.CONFIG_MAPPING[model_type], {})
    subs = (v for k in _fields(type(cfg)) if isinstance(v := _attr(cfg, k), lm.config_class))
    cfg = next(subs, cfg)  # a composite whose LM takes one of its sub-configs (MusicGen's decoder)
    text = cfg.get_text_config(decoder=True)  # a multimodal or encoder-decoder config's language model
    if hasattr(text, "is_decoder"):  # encoder families (RoBERTa, …) run causally only as decoders
        text.is_decoder = True
    with torch.device("meta"):  # sized first: a config that ignores the tiny sizes could fill the memory
        size = sum(p.numel() for p in lm._from_config(cfg).parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"{size / 1e6:.0f}M parameters after shrinking the config (over {MAX_PARAMS / 1e6:.0f}M)")
    torch.manual_seed(0)
    model = lm._from_config(cfg).eval()
    if hasattr(model, "set_default_language"):  # X-MOD's adapters are per language: pick the first
        model.set_default_language(next(iter(cfg.languages)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in name or "ln" in name else p.uniform_(-0.2, 0.2)
            else:  # std 1/sqrt(fan-in), not transformers' 0.02: scores of order 1, so masks, windows, soft-caps
                p.normal_(0.0, p.shape[-1] ** -0.5)  # and sinks change the result (near-uniform attention hides them)
        model(torch.randint(0, TINY["vocab_size"], (2, 9)))  # eager itself must run the tiny config
    return model


def _greedy(model, prompt: list, n: int) -> list:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def check(model, backend: str) -> str:
    """``match``, ``refused: …``, ``MISMATCH …`` or ``error: …`` for one built model on one backend."""
    import lowerlm
    from lowerlm.errors import LowerlmError

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int):  # no padding token inside the text: RoBERTa-style models refuse it (their numbering
        ids[ids == pad] = (pad + 1) % 64  # skips it, lowerlm's does not), and text has none
    prompt = [5, 7, 9, 11, 3]
    try:
        cm = lowerlm.compile_model(model, backend=backend, max_seq_len=64, use_cache=False, tokenizer=False)
        got = cm(ids).float()
        tokens = [s[0] for s in cm.generate_ids([prompt], 8, stop_ids=[])]
    except LowerlmError as e:
        return f"refused: {_first_line(e)}"
    except Exception as e:  # noqa: BLE001 -- reported, not hidden: a crash lowerlm should refuse cleanly
        return f"error: {type(e).__name__}: {_first_line(e)}"
    with torch.no_grad():
        want = model(ids).logits.float()
    err = float((got - want).abs().max() / max(float(want.abs().max()), 1e-30))
    if err > 1e-4 or tokens != _greedy(model, prompt, 8):
        return f"MISMATCH logits {err:.1e}" + ("" if tokens == _greedy(model, prompt, 8) else ", tokens differ")
    return "match"


@contextlib.contextmanager
def _deadline(seconds: int):
    """TimeoutError in the main thread after ``seconds`` (SIGALRM; where there is none, no limit)."""
    import signal

    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(*_):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(types: list, backends: list, out=sys.stdout) -> dict:
    results: dict = {}
    for i, model_type in enumerate(types):
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                model = tiny(model_type)
        except Exception as e:  # noqa: BLE001 -- not buildable tiny as a causal LM: reported as such
            results[model_type] = {"build": f"{type(e).__name__}: {_first_line(e)}"}
            print(f"[{i + 1}/{len(types)}] {model_type}: not built ({results[model_type]['build'][:80]})", file=out,
                  flush=True)
            continue
        row = {}
        for backend in backends:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), _deadline(TIMEOUT_S):
                warnings.simplefilter("ignore")
                try:
                    row[backend] = check(model, backend)
                except TimeoutError:
                    row[backend] = f"error: over {TIMEOUT_S} s"
        results[model_type] = row
        print(f"[{i + 1}/{len(types)}] {model_type} ({time.perf_counter() - start:.1f} s): "
              + "; ".join(f"{b}: {r[:90]}" for b, r in row.items()), file=out, flush=True)
    return results


def table(results: dict, backends: list, seconds: float) -> str:
    import transformers

    built = {t: r for t, r in results.items() if "build" not in r}
    counts = {b: sum(r[b] == "match" for r in built.values()) for b in backends}
    everywhere = sum(all(r[b] == "match" for b in backends) for r in built.values())
    silent = sorted(t for t, r in built.items() for b in backends if r[b].startswith("MISMATCH"))
    triton = " (Triton in its interpreter)" if "triton" in backends and not torch.cuda.is_available() else ""
    lines = ["# Architecture coverage", "",
             f"`python bench/arch_coverage.py --backends {','.join(backends)} --write COVERAGE.md` (transformers "
             f"{transformers.__version__}, torch {torch.__version__}; {seconds / 60:.0f} min on this machine"
             f"{triton}). Each causal-LM architecture of transformers' registry built tiny with random weights, "
             "compiled per backend, compared with eager: logits (max abs error <= 1e-4 x max |logit|, f32) and 8 "
             "greedy tokens.", "",
             f"{len(results)} architectures checked, {len(built)} built tiny; matching: "
             + ", ".join(f"{b} {counts[b]}" for b in backends) + f", all of them {everywhere}"
             + f"; silent mismatches: {len(silent)}{' (' + ', '.join(silent) + ')' if silent else ''}.", "",
             "| architecture | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for t, r in sorted(results.items()):
        cells = [f"not built tiny: {r['build']}"] + ["" ] * (len(backends) - 1) if "build" in r else \
            [r[b] for b in backends]
        lines.append(f"| {t} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated model types (default: the whole registry)")
    p.add_argument("--backends", default="reference,onnx,triton",
                   help="comma-separated (default: all three; without CUDA Triton runs in its interpreter)")
    p.add_argument("--write", default="", help="write the table to this file (e.g. COVERAGE.md)")
    p.add_argument("--smoke", action="store_true", help="two architectures on every backend (CI's subset)")
    args = p.parse_args(argv)
    names = registry()
    types = [t.strip() for t in args.only.split(",") if t.strip()] or sorted(names)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.smoke:
        types, backends = ["llama", "gpt2"], ["reference", "onnx", "triton"]
    unknown = [t for t in types if t not in names]
    if unknown:
        print(f"arch_coverage.py: error: not in transformers' causal-LM registry: {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    bad = [b for b in backends if b not in ("reference", "onnx", "triton")]
    if bad:
        print(f"arch_coverage.py: error: unknown backend {', '.join(bad)} (reference, onnx, triton)", file=sys.stderr)
        return 2
    if "triton" in backends and not torch.cuda.is_available():  # before lowerlm (and triton) are imported
        os.environ["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    results = run(types, backends)
    text = table(results, backends, time.perf_counter() - start)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
