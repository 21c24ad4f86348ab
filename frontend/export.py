"""torch.export capture of a model, with the settings that keep the graph importable.

``export(..., strict=False)`` with batch and sequence ≥ 2 and explicit ``Dim``s, then ``run_decompositions({})``:
an empty table keeps ``linear`` and ``scaled_dot_product_attention`` whole and inlines the grad-mode wrapper
around the rotary cos/sin. The wrapper passes ``position_ids`` explicitly when the model accepts them, so the
positions are a graph input that RoPE reads instead of an ``arange`` the model builds.

GQA: transformers' sdpa integration repeats the K/V heads (``expand`` + ``reshape``) unless it may pass
``enable_gqa=True``. torch 2.11's export cannot prove that reshape's contiguity guard for a dynamic sequence length
(``min(8*S, 16*S) == 8*S``) and refuses every GQA model, so during export the integration is told it may pass the
flag; the frontend raises both forms to the same attention op.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings

import torch

from lowerlm.frontend import complex_rope, linear_attention, mla, sparse_attention
from lowerlm.frontend.importer import ExportInfo
from lowerlm.ir.abi import BATCH, INPUT_IDS, SEQ
from lowerlm.ir.errors import CompileError, LowerlmError, UnsupportedOpError

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 5
WRAPPER_ATTR = "model"


class _Wrapper(torch.nn.Module):
    """``(input_ids[, position_ids]) -> logits`` around an HF causal LM or a plain module. Its first argument is
    named ``INPUT_IDS`` (ir/abi.py): the export's example and dynamic shapes, and the importer, key by that name."""

    def __init__(self, model: torch.nn.Module, with_positions: bool):
        super().__init__()
        setattr(self, WRAPPER_ATTR, model)
        self.with_positions = with_positions
        self.skip_token: int | None = None  # set by check_position_numbering: see skipping_positions

    def forward(self, input_ids, position_ids=None):
        model = getattr(self, WRAPPER_ATTR)
        if position_ids is not None and self.skip_token is not None:
            position_ids = skipping_positions(input_ids, position_ids, self.skip_token)
        kwargs = {"position_ids": position_ids} if self.with_positions else {}
        if _is_hf(model):
            kwargs["use_cache"] = False
        out = model(input_ids, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _sdpa_with_gqa():
    """transformers' sdpa attention calls sdpa with ``enable_gqa=True`` instead of repeating K/V (see above)."""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        sdpa_attention = None
    original = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if original is None:  # another transformers layout: it traces as it is
        yield
        return
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: True
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


def _export_reason(e: Exception) -> str:
    """The first line of torch.export's error, and the lines that name a violated shape constraint."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
    first = lines[0].split(" For more information")[0]
    detail = [line[2:] for line in lines[1:] if line.startswith("- Not all values")]
    return " ".join([f"{type(e).__name__}: {first}"] + detail[:2]).rstrip(".")


def _guards_the_longest(e: Exception, longest: int) -> bool:
    """torch.export refused only because the forward guards ``S != longest`` (the top of the length range)."""
    guards = re.findall(r"satisfy the generated guard (.+?)\.?$", str(e), flags=re.M)
    return bool(guards) and all(re.search(rf"!= {longest}\b", g) for g in guards)


def _is_hf(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "model_type")


def accepts_positions(model: torch.nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def skipping_positions(input_ids: torch.Tensor, slots: torch.Tensor, pad: int) -> torch.Tensor:
    """RoBERTa's numbering of tokens at cache ``slots`` (0, 1, …): ``pad`` for a padding token, ``slot + pad + 1``
    for any other. It equals the model's own (a cumulative count of the non-padding tokens, from ``pad + 1``)
    wherever no padding token precedes a non-padding one, which the runtime checks of every input
    (runtime/generate.py's ``check_skipped``); a generated padding token is numbered as transformers' cached
    generation numbers it."""
    return torch.where(input_ids == pad, pad, slots + (pad + 1))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(float(a.abs().max()), 1e-30)
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * scale


def check_position_numbering(wrapper: _Wrapper, ids: torch.Tensor, positions: torch.Tensor, pad=None) -> None:
    """Refuse a model whose logits without ``position_ids`` differ from those with ``positions`` (0..S-1, what
    lowerlm feeds): it numbers positions itself in a way the IR does not model, and compiling it would give other
    logits with no error. One own numbering is modelled: RoBERTa-style models count from ``padding_idx + 1`` and
    give padding tokens ``padding_idx`` (``pad``, the config's pad_token_id); when the model's logits match that
    (checked with a padding token as the last token of one row), the wrapper numbers so (``skip_token``)."""
    try:
        own = wrapper(ids)
    except Exception:  # noqa: BLE001 -- it needs position_ids: they mean what it is given, nothing to compare
        return
    model = getattr(wrapper, WRAPPER_ATTR)
    try:
        given = wrapper(ids, positions)
    except Exception as e:  # noqa: BLE001 -- reported as one line: the model cannot take the positions lowerlm feeds
        raise UnsupportedOpError(f"{type(model).__name__}'s position_ids", "",
                                 f"its forward fails when given position_ids 0..S-1, the positions lowerlm feeds "
                                 f"({_export_reason(e)})") from None
    if _close(own, given):
        return
    if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
        # first without padding tokens, then with one ending the first row: given positions and no attention mask,
        # transformers reads a gap in them as the start of another packed sequence, so that call passes a mask
        probe = torch.where(ids == pad, pad - 1 if pad else 1, ids)
        padded = probe.clone()
        padded[0, -1] = pad
        wrapper.skip_token = pad
        try:
            if _close(wrapper(probe), wrapper(probe, positions)) and (not _is_hf(model) or _close(
                    model(padded, attention_mask=torch.ones_like(padded), use_cache=False).logits,
                    model(padded, attention_mask=torch.ones_like(padded), use_cache=False,
                          position_ids=skipping_positions(padded, positions, pad)).logits)):
                return
        except Exception:  # noqa: BLE001 -- not this numbering: refused below
            pass
        wrapper.skip_token = None
    raise UnsupportedOpError(
        f"{type(model).__name__}'s own position numbering", "",
        "without position_ids its logits differ from those at positions 0..S-1, the positions lowerlm feeds, and "
        "from RoBERTa's (padding_idx + 1 onward, padding tokens skipped); lowerlm does not model that numbering. "
        "If 0..S-1 is what you want, wrap the model in a module that passes position_ids")


def config_value(model, *names, default=None):
    cfg = getattr(model, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def check_supported(model: torch.nn.Module) -> None:
    """Refuse what the IR cannot express before spending time on export."""
    for path, mod in model.named_modules():
        rope_type = getattr(mod, "rope_type", None)
        if rope_type == "dynamic" or "dynamic" in str(getattr(mod, "rope_init_fn", "")).lower():
            raise UnsupportedOpError("dynamic NTK rotary embedding", path,
                                     "its frequencies change with the sequence length; use a model with static "
                                     "RoPE scaling (default, linear, llama3, yarn)")


def _hf_models(model: torch.nn.Module) -> list:
    """The outermost transformers models (``PreTrainedModel``s) in ``model``: itself, or those a plain module wraps.
    A block of one (an MoE block, an attention module) carries a ``config`` too but is not a model."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    found: list = []
    for path, mod in model.named_modules():
        if isinstance(mod, PreTrainedModel) and not any(path.startswith(p + ".") or p == "" for p, _ in found):
            found.append((path, mod))
    return found


def _traceable_attention(path: str, model) -> str | None:
    """Switch a transformers model to sdpa attention, the form the frontend raises. A model whose attention
    transformers runs only eagerly (soft-capped logits, attention sinks) is switched to lowerlm's own
    implementation of that eager attention (frontend/eager_attention.py) instead, and its previous
    implementation returned, to be restored after the export so the user's model keeps computing as before. A
    model whose attention modules do not take an implementation (BigBird-Pegasus, GIT) is traced with its own,
    which the frontend raises where it can. A model without attention (Mamba, xLSTM, other state-space or
    recurrent LMs) cannot be switched, and lowerlm cannot compile it."""
    before = getattr(model.config, "_attn_implementation", "sdpa")
    if sparse_attention.indexers(model):  # DSA: an implementation other than eager/sdpa takes the unmasked path
        from lowerlm.frontend import eager_attention

        model.set_attn_implementation(eager_attention.register())
        return before
    if before == "sdpa":
        return None
    try:
        model.set_attn_implementation("sdpa")
        return None
    except Exception as e:  # transformers raises ValueError (and others, by version) for a model it cannot switch
        reason = e
    if getattr(model, "_supports_attention_backend", False):  # its attention calls whatever function is set
        from lowerlm.frontend import eager_attention

        model.set_attn_implementation(eager_attention.register())
        return before
    if any("Attention" in type(m).__name__ for m in model.modules()):
        return None  # attention of its own (BigBird-Pegasus, GIT): traced as written, raised where it can be
    where = f" (module '{path}')" if path else ""
    raise CompileError(
        f"{type(model).__name__}{where} cannot run scaled-dot-product attention ({type(reason).__name__} from "
        "transformers' set_attn_implementation('sdpa')): lowerlm compiles attention-based decoder-only LMs "
        "(Llama, Qwen2/3, Mistral, Mixtral, … or a plain module built from their blocks); state-space and other "
        "recurrent models such as Mamba are not supported") from None


@contextlib.contextmanager
def _without_kv_cache(models: list):
    """transformers models' ``config.use_cache`` off during export. The wrapper passes ``use_cache=False`` to a
    transformers model it calls directly, but a plain module wrapping one calls it with its own arguments: with the
    config's default (True) the model builds a DynamicCache and concatenates each layer's keys and values onto an
    empty 1-D tensor, which the importer cannot type (a ShapeError naming no module)."""
    saved = [(m.config, m.config.use_cache) for _, m in models if getattr(m.config, "use_cache", None)]
    for cfg, _ in saved:
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg, value in saved:
            cfg.use_cache = value


def export_model(model: torch.nn.Module, vocab_size: int | None = None):
    """Export ``model``; returns (ExportedProgram, ExportInfo)."""
    model = model.eval()
    check_supported(model)
    hf = _hf_models(model)
    switched = [(m, before) for path, m in hf if (before := _traceable_attention(path, m)) is not None]
    try:
        return _export(model, hf, vocab_size)
    finally:  # the user's model computes as before (its eager attention) once the export is done
        for m, before in switched:
            m.set_attn_implementation(before)


def _export(model: torch.nn.Module, hf: list, vocab_size: int | None):
    # a plain module around one transformers model: that model's config gives the vocabulary, positions, window
    configured = hf[0][1] if len(hf) == 1 else model
    vocab = vocab_size or config_value(configured, "vocab_size", default=2)
    max_pos = int(config_value(configured, "max_position_embeddings", default=2048))
    with_positions = accepts_positions(model)
    g = torch.Generator().manual_seed(0)
    device = next(iter(model.parameters()), torch.empty(0)).device  # example inputs live with the weights
    ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=g).to(device)
    example = {INPUT_IDS: ids}
    batch = torch.export.Dim(BATCH, min=1, max=1024)
    seq = torch.export.Dim(SEQ, min=1, max=max(max_pos, EXAMPLE_SEQ + 1))
    dynamic = {INPUT_IDS: {0: batch, 1: seq}}
    args = (ids,)
    if with_positions:
        example["position_ids"] = torch.arange(EXAMPLE_SEQ, device=device).repeat(EXAMPLE_BATCH, 1)
        dynamic["position_ids"] = {0: batch, 1: seq}
        args = (ids, example["position_ids"])
    wrapper = _Wrapper(model, with_positions)
    with warnings.catch_warnings(), torch.no_grad(), _sdpa_with_gqa(), _without_kv_cache(hf), \
            linear_attention.swapped(), mla.traceable(model), complex_rope.real(model), \
            sparse_attention.dense(model):
        warnings.simplefilter("ignore")
        if with_positions:  # the positions input must mean what the model's own numbering means
            check_position_numbering(wrapper, ids, example["position_ids"],
                                     config_value(configured, "pad_token_id"))
        try:
            try:
                ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
            except Exception as e:  # noqa: BLE001 -- one known guard is retried, everything else reported below
                if not _guards_the_longest(e, seq.max):
                    raise
                # a slice of a [.., max_pos] buffer (a causal mask, position rows) to the call's length is the
                # whole buffer at the longest length, and torch specializes that one length: trace up to one less
                # (the IR's slice to S is the same at S = max_pos, and the position table keeps the longest there)
                seq = torch.export.Dim(SEQ, min=1, max=seq.max - 1)
                dynamic = {k: {0: batch, 1: seq} for k in dynamic}
                ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic, strict=False)
        except LowerlmError:  # a capture's own error, already one line for the user
            raise
        except Exception as e:  # torch's own error is pages long and points into torch
            raise CompileError(
                f"torch.export cannot trace {type(model).__name__} for batch sizes 1-1024 and sequence lengths "
                f"1-{seq.max}: {_export_reason(e)}. lowerlm compiles one graph for every length, so the forward "
                "must not branch on values or special-case a length (a causal mask sliced from a fixed-size buffer "
                "does; F.scaled_dot_product_attention(is_causal=True) needs no mask)") from e
        ep = ep.run_decompositions({})
    window = config_value(configured, "sliding_window", default=0) or 0
    return ep, ExportInfo(WRAPPER_ATTR, example, max_pos, int(window) if window < max_pos else 0)
