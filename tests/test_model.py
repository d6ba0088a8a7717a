"""The GPT module: shapes, causality, GQA, tied weights, FLOP accounting."""

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT, flops_per_token


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32)
    base.update(kw)
    return GPTConfig(**base)


def build(cfg: GPTConfig) -> GPT:
    model = GPT(cfg)
    model.init_weights(seed=0)
    return model


def test_logits_shape_and_dtype():
    model = build(tiny())
    logits = model(torch.randint(0, 128, (3, 17)))
    assert logits.shape == (3, 17, 128)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_causal_changing_a_later_token_never_changes_earlier_logits(n_kv_head):
    model = build(tiny(n_kv_head=n_kv_head)).eval()
    tokens = torch.randint(0, 128, (2, 24))
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 128
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_position_ids_restart_each_packed_document():
    """Two documents packed with restarted positions and a block mask score as if alone."""
    model = build(tiny()).eval()
    doc_a, doc_b = torch.randint(0, 128, (1, 10)), torch.randint(0, 128, (1, 6))
    packed = torch.cat([doc_a, doc_b], dim=1)
    pos = torch.cat([torch.arange(10), torch.arange(6)]).unsqueeze(0)
    doc = torch.cat([torch.zeros(10), torch.ones(6)]).long()
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    mask = (causal & (doc[:, None] == doc[None, :]))[None, None]
    with torch.no_grad():
        together = model(packed, position_ids=pos, mask=mask)
        alone_b = model(doc_b)
    torch.testing.assert_close(together[:, 10:], alone_b, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied, untied = build(tiny(tie_embeddings=True)), build(tiny(tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 128 * 64


def test_meta_device_build_keeps_embeddings_tied():
    with torch.device("meta"):
        model = GPT(tiny())
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    assert model.output.weight is model.tok_embeddings.weight
    reference = build(tiny())
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_init_is_deterministic_for_a_seed():
    a, b = build(tiny()), build(tiny())
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_flops_per_token_matches_parameter_count():
    cfg = tiny(vocab_size=1024, n_kv_head=4)
    model = build(cfg)
    # Every weight except the embedding lookup is a matmul: 6 FLOPs per weight per token, plus attention.
    matmul_params = model.num_params()  # tied: the shared matrix is counted once, as the output head
    expected = 6 * matmul_params - 6 * sum(p.numel() for n, p in model.named_parameters() if p.ndim == 1)
    attention = 12 * cfg.n_layer * cfg.d_model * 32
    assert flops_per_token(cfg, 32) == pytest.approx(expected + attention)


def test_bad_shapes_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(tiny(n_head=4, n_kv_head=3))
    with pytest.raises(ValueError, match="max_seq_len"):
        build(tiny())(torch.zeros(1, 33, dtype=torch.long))


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = build(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 128, (4, 32))
    losses = []
    for _ in range(60):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
