"""Runtime: greedy tokens identical to transformers' generate, batches equal to single prompts, seeded sampling,
exact top-k/top-p sets, stop tokens, cache limits and input errors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import lowerlm
from lowerlm.errors import InputError
from lowerlm.runtime.sampler import Sampling, filter_logits

from .conftest import tiny_model

PROMPTS = [[5, 7, 9, 11, 3], [8, 1, 4], [2, 9, 9, 9, 9, 9, 30]]


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def tokens_of(steps, i=0):
    return [s[i] for s in steps if s[i] is not None]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def family(request):
    model = tiny_model(request.param, sliding_window=4) if request.param == "mistral" else tiny_model(request.param)
    return model, lowerlm.compile_model(model, backend="reference", max_batch=4, max_seq_len=64)


def test_greedy_matches_transformers_generate(family):
    model, cm = family
    for prompt in PROMPTS:
        assert tokens_of(cm.generate_ids([prompt], 32)) == hf_greedy(model, prompt, 32)


def test_a_batch_gives_each_prompt_its_own_tokens(family):
    _, cm = family
    batch = list(cm.generate_ids(PROMPTS, 32))
    for i, prompt in enumerate(PROMPTS):
        assert tokens_of(batch, i) == tokens_of(cm.generate_ids([prompt], 32))


def test_seeded_sampling_is_reproducible(family):
    _, cm = family
    kw = dict(temperature=1.3, top_k=20, top_p=0.9)
    a = tokens_of(cm.generate_ids([PROMPTS[0]], 24, seed=7, **kw))
    assert a == tokens_of(cm.generate_ids([PROMPTS[0]], 24, seed=7, **kw))
    assert a != tokens_of(cm.generate_ids([PROMPTS[0]], 24, seed=8, **kw))
    assert a != tokens_of(cm.generate_ids([PROMPTS[0]], 24))


def test_stop_tokens_and_a_full_cache_end_generation():
    model = tiny_model("llama")
    cm = lowerlm.compile_model(model, backend="reference", max_batch=2, max_seq_len=8)
    greedy = tokens_of(cm.generate_ids([PROMPTS[0]], 3, stop_ids=[]))
    stopped = tokens_of(cm.generate_ids([PROMPTS[0]], 32, stop_ids=[greedy[2]]))
    assert stopped == greedy[:greedy.index(greedy[2]) + 1]
    # a 5-token prompt in an 8-slot cache: 3 more tokens fit in the cache, the 4th comes from the last logits
    assert len(tokens_of(cm.generate_ids([PROMPTS[0]], 32, stop_ids=[]))) == 4


def test_input_errors():
    cm = lowerlm.compile_model(tiny_model("llama"), backend="reference", max_batch=2, max_seq_len=8)
    cases = [
        (([list(range(8))], 4), "longer than max_seq_len 8"),
        (([[1, 2, 64]], 4), "token id 64 in prompt 0 is outside the vocabulary"),
        (([[]], 4), "prompt 0 is empty"),
        (([[1, 2]], 0), "max_new_tokens must be >= 1"),
        (([[1], [2], [3]], 4), "batch of 3 prompts is larger than max_batch 2"),
    ]
    for (prompts, n), message in cases:
        with pytest.raises(InputError, match=message):
            list(cm.generate_ids(prompts, n))
    with pytest.raises(InputError, match="no tokenizer"):
        cm.generate("hello")
    with pytest.raises(InputError, match="top_p"):
        Sampling(top_p=0.0)


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15]])
    logits = probs.log()
    kept = lambda out: set(torch.nonzero(out[0] > float("-inf")).flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.6)) == {1, 3}  # 0.5 < 0.6, then 0.2 crosses it
    assert kept(filter_logits(logits, top_p=0.75)) == {1, 3, 4}
    assert kept(filter_logits(logits, top_p=0.01)) == {1}  # the most likely token always stays
    assert kept(filter_logits(logits, top_k=4, top_p=0.75)) == {1, 3, 4}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(3, 50, generator=g) * 3
        k = int(torch.randint(1, 50, (1,), generator=g))
        p = float(torch.rand(1, generator=g).clamp(0.05, 0.95))
        want_k = TopKLogitsWarper(k)(None, x.clone())
        want_p = TopPLogitsWarper(p)(None, x.clone())
        assert torch.equal(filter_logits(x, top_k=k) > float("-inf"), want_k > float("-inf"))
        assert torch.equal(filter_logits(x, top_p=p) > float("-inf"), want_p > float("-inf"))


@pytest.mark.slow
def test_smollm2_chat_greedy_matches_transformers_and_streams():
    model = lowerlm.load("smollm2")
    cm = lowerlm.compile_model(model, backend="reference", max_batch=1)
    from lowerlm.runtime.text import encode

    prompt = encode(cm.tokenizer, "What is the capital of France?", chat=True)
    ours = tokens_of(cm.generate_ids([prompt], 32))
    assert ours == hf_greedy(model, prompt, 32)
    streamed = list(cm.generate("What is the capital of France?", max_new_tokens=32))
    assert len(streamed) > 1 and "".join(streamed) == cm.tokenizer.decode(ours, skip_special_tokens=True)
    assert "Paris" in "".join(streamed)
