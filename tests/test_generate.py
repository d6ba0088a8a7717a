"""Sampling: the KV cache changes nothing but speed, the sampling knobs do what they say, stops stop."""

from __future__ import annotations

import pytest
import torch

from model.config import GPTConfig
from model.generate import TextStream, generate, sample_next, stream
from model.gpt import GPT

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [3], [20, 21, 22, 23, 24]]  # different lengths


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.set_num_threads(1)
    # Untied: a random model with tied embeddings just repeats its last token.
    m = GPT(
        GPTConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48, tie_embeddings=False)
    )
    m.init_weights(seed=0)
    # Sharper logits than the init's: greedy choices are then far from ties, so float noise can't flip them.
    with torch.no_grad():
        m.output.weight.mul_(20)
    return m.eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """The plainest greedy decoding: the whole sequence through the model for every token, one prompt at a time."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_kv_cache_gives_the_same_greedy_tokens_batched_over_different_lengths(model):
    cached = generate(model, PROMPTS, 24, temperature=0, use_cache=True)
    uncached = generate(model, PROMPTS, 24, temperature=0, use_cache=False)
    assert cached == uncached
    assert cached == [greedy_reference(model, p, 24) for p in PROMPTS]  # padding changes nothing
    assert all(len(row) == 24 for row in cached)
    assert len({tuple(r) for r in cached}) > 1  # the prompts lead to different text


def test_kv_cache_logits_match_the_full_forward(model):
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [
            model(tokens[:, :4], cache=cache),
            model(tokens[:, 4:6], cache=cache),
            model(tokens[:, 6:], cache=cache),
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generation_stops_at_the_window(model):
    out = generate(model, [[1] * 40], 100, temperature=0)
    assert len(out[0]) == model.cfg.max_seq_len - 40


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, 16, temperature=0)
    gen = torch.Generator().manual_seed(1)
    assert generate(model, PROMPTS, 16, temperature=1.0, top_k=1, generator=gen) == greedy
    assert generate(model, PROMPTS, 16, temperature=1.0, top_p=1e-6, generator=gen) == greedy


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    def sample(seed):
        return generate(model, PROMPTS, 16, temperature=2.0, generator=torch.Generator().manual_seed(seed))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != generate(model, PROMPTS, 16, temperature=0)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top_k = set(sample_next(logits, 1.0, top_k=2, generator=gen).tolist())
    assert top_k == {1, 3}
    # 0.5 + 0.3 reaches 0.7: the nucleus is {1, 3}; 0.15 and 0.05 fall outside.
    top_p = set(sample_next(logits, 1.0, top_p=0.7, generator=gen).tolist())
    assert top_p == {1, 3}
    everything = set(sample_next(logits, 1.0, generator=gen).tolist())
    assert everything == {0, 1, 2, 3}
    # A low temperature concentrates on the most likely token.
    cold = sample_next(logits, 0.05, generator=gen)
    assert (cold == 1).float().mean() > 0.99


def test_stop_tokens_end_each_row_on_its_own(model):
    greedy = generate(model, PROMPTS, 20, temperature=0)
    stop = greedy[0][5]  # the 6th token of the first row
    out = generate(model, PROMPTS, 20, temperature=0, stop_tokens=[stop])
    for full, cut in zip(greedy, out):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert cut == expected
    assert len(out[0]) == greedy[0].index(stop) + 1 <= 6
    assert list(stream(model, PROMPTS[0], 20, temperature=0, stop_tokens=[stop])) == out[0]


class _Chars:
    """A character-level tokenizer (id = code point, as text): enough for TextStream, which only decodes."""

    def decode(self, ids):
        return "".join(chr(32 + i) for i in ids)


def test_stop_strings_stop_generation_and_are_not_shown(model):
    tok = _Chars()
    full = tok.decode(generate(model, [PROMPTS[0]], 30, temperature=0)[0])
    # A string greedy decoding produces, first at a position >= 5: the stream must end just before it.
    at = next(i for i in range(5, 25) if full.find(full[i : i + 3]) == i)
    stop = full[at : at + 3]
    text_stream = TextStream(model, tok, PROMPTS[0], 30, stop=["@@not there@@", stop], temperature=0)
    pieces = list(text_stream)
    assert "".join(pieces) == full[:at]
    assert text_stream.stop_reason == "stop_string"
    assert len(text_stream.token_ids) == at + len(stop) < 30  # it stopped generating there
    assert len(pieces) > 1  # streamed, not all at the end
    # Without the stop string it runs to the limit, and a stop token ends it too.
    plain = TextStream(model, tok, PROMPTS[0], 30, temperature=0)
    assert "".join(plain) == full and plain.stop_reason == "length"
    at = next(i for i in range(3, 25) if full.find(full[i]) == i)
    by_token = TextStream(model, tok, PROMPTS[0], 30, stop_tokens=[ord(full[at]) - 32], temperature=0)
    assert "".join(by_token) == full[:at] and by_token.stop_reason == "stop_token"
