"""The recipe options (docs/recipe.md): each model option trains and round-trips a checkpoint, Muon
updates the matrices it should, agrees across 1 and 2 gloo ranks and resumes bitwise, the WSD schedule
has the values worked out by hand, and export refuses what a Llama can't represent."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from model.config import GPTConfig
from model.gpt import GPT
from model.state_dict_adapter import HFError
from training.hf_export import export_hf
from jobspec import SpecError, load_spec
from jobspec.schema import OptimConfig
from tests.conftest import REPO
from tests.test_distributed import losses, train
from training.checkpoint import load_checkpoint, save_checkpoint
from training.optim import MuonAdamW, build_optimizer, lr_scale, set_lr

# save_checkpoint in one process: DCP says it assumes one process, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

OPTIONS = {
    "qk_norm": {"qk_norm": True},
    "relu2": {"mlp": "relu2"},
    "softcap": {"logit_softcap": 5.0},
    "untied": {"tie_embeddings": False},
}


def tiny(**options) -> GPTConfig:
    return GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32, **options)


def optim_cfg(**changes):
    return OmegaConf.structured(OptimConfig(**changes))


def step(model, opt, tokens) -> float:
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("name", OPTIONS)
def test_each_model_option_changes_the_model_and_trains(name):
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 32))
    plain, model = GPT(tiny()), GPT(tiny(**OPTIONS[name]))
    plain.init_weights(seed=1)
    model.init_weights(seed=1)
    assert not torch.allclose(model(tokens), plain(tokens)), "the option must change the function"
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    opt = build_optimizer(model, optim_cfg(name="muon"), torch.device("cpu"))
    first = step(model, opt, tokens)
    for _ in range(4):
        last = step(model, opt, tokens)
    assert last < first
    if name == "softcap":
        assert model(tokens).abs().max() <= 5.0
    if name == "relu2":  # about SwiGLU's parameters: two 4*d matrices against three 8/3*d ones (rounded up)
        assert not hasattr(model.layers[0].feed_forward, "w3")
        assert model.layers[0].feed_forward.w1.out_features == 4 * 64


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("name", OPTIONS)
def test_checkpoint_round_trip_continues_exactly(tmp_path, name, optimizer):
    """Saved after 3 steps and loaded into a model built from another seed, the next step is bitwise the same."""
    cfg, ocfg = tiny(**OPTIONS[name]), optim_cfg(name=optimizer, warmup_steps=2)
    torch.manual_seed(0)
    batches = [torch.randint(0, 128, (2, 32)) for _ in range(4)]
    model = GPT(cfg)
    model.init_weights(seed=1)
    opt = build_optimizer(model, ocfg, torch.device("cpu"))
    for i in range(3):
        set_lr(opt, i, ocfg, 10)
        step(model, opt, batches[i])
    path = save_checkpoint(tmp_path, 3, model, opt, {"step": 3, "tokens_seen": 0})
    other = GPT(cfg)
    other.init_weights(seed=2)
    other_opt = build_optimizer(other, ocfg, torch.device("cpu"))
    load_checkpoint(path, other, other_opt)
    for m, o in ((model, opt), (other, other_opt)):
        set_lr(o, 3, ocfg, 10)
    assert step(other, other_opt, batches[3]) == step(model, opt, batches[3])
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), n


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(tiny(tie_embeddings=False))
    opt = build_optimizer(model, optim_cfg(name="muon", muon_lr=0.05, muon_weight_decay=0.01), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [g for g in opt.param_groups if g["muon"]]
    assert len(muon) == 1 and muon[0]["lr"] == 0.05 and muon[0]["weight_decay"] == 0.01
    expected = {
        f"layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        )
    }
    assert {names[id(p)] for p in muon[0]["params"]} == expected
    adamw = {names[id(p)] for g in opt.param_groups if not g["muon"] for p in g["params"]}
    assert {"tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention_norm.weight"} <= adamw
    assert adamw.isdisjoint(expected) and len(adamw) + len(expected) == len(names)
    set_lr(opt, 10_000, optim_cfg(name="muon", muon_lr=0.05, warmup_steps=0, min_lr_ratio=0.1), 100)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([3e-4, 3e-4, 5e-3])
    # Orthogonalized: Muon's update of a square matrix has all its singular values near 1.
    wq = model.layers[0].attention.wq.weight
    before = wq.detach().clone()
    step(model, opt, torch.randint(0, 128, (2, 32)))
    sv = torch.linalg.svdvals((before * (1 - 5e-3 * 0.01) - wq.detach()) / 5e-3)
    assert sv.median() > 0.5 and sv.max() < 1.5, sv  # a raw gradient's spread over orders of magnitude


def test_muon_adamw_steps_exactly_as_torchs_muon_and_adamw():
    """One optimizer object, but the same arithmetic as torch.optim.Muon on the matrices and
    torch.optim.AdamW on the rest, used side by side as their docs show."""
    ocfg = optim_cfg(name="muon", muon_lr=0.05, muon_weight_decay=0.01, weight_decay=0.1)
    ours, theirs = GPT(tiny()), GPT(tiny())
    ours.init_weights(seed=3)
    theirs.load_state_dict(ours.state_dict())
    opt = build_optimizer(ours, ocfg, torch.device("cpu"))
    named = list(theirs.named_parameters())
    matrices = [p for n, p in named if n.startswith("layers.") and p.ndim == 2]
    muon = torch.optim.Muon(matrices, lr=0.05, weight_decay=0.01, momentum=0.95, nesterov=True)
    adamw = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not n.startswith("layers.") and p.ndim == 2], "weight_decay": 0.1},
            {"params": [p for n, p in named if p.ndim == 1], "weight_decay": 0.0},
        ],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=True,
    )
    torch.manual_seed(0)
    for _ in range(3):
        tokens = torch.randint(0, 128, (2, 32))
        step(ours, opt, tokens)
        F.cross_entropy(theirs(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        muon.step()
        adamw.step()
        theirs.zero_grad(set_to_none=True)
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), n


def test_wsd_schedule_values_by_hand():
    cfg = optim_cfg(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    # warm-up 1/10 .. 10/10; stable to step 80; linear decay over the last 20 steps to 0.1
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 50: 1.0, 80: 1.0, 85: 0.775, 90: 0.55, 99: 0.145, 100: 0.1, 150: 0.1}
    for s, value in expected.items():
        assert lr_scale(s, cfg, 100) == pytest.approx(value), s
    # Extending the run (max_steps 100 -> 300) changes nothing before the first run's decay started.
    assert [lr_scale(s, cfg, 300) for s in range(80)] == [lr_scale(s, cfg, 100) for s in range(80)]
    cosine = optim_cfg(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_scale(55, cosine, 100) == pytest.approx(0.55) and lr_scale(100, cosine, 100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "key,value",
    [
        ("model.mlp", "gelu"),
        ("optim.name", "sgd"),
        ("optim.schedule", "linear"),
        ("model.logit_softcap", "-1"),
        ("optim.decay_fraction", "0"),
    ],
)
def test_bad_recipe_values_are_refused_naming_the_key(key, value):
    with pytest.raises(SpecError, match=key) as info:
        load_spec(str(REPO / "jobs" / "pretrain.yaml"), [f"{key}={value}"])
    assert value in str(info.value)


@pytest.mark.parametrize(
    "option,key",
    [
        ({"mlp": "relu2"}, "model.mlp"),
        ({"qk_norm": True, "qkv_bias": True}, "model.qkv_bias"),
        ({"logit_softcap": 15.0}, "model.logit_softcap"),
    ],
)
def test_export_refuses_options_a_llama_cannot_represent(tmp_path, option, key):
    from training.data.tokenizer import train_tokenizer

    train_tokenizer(["def f(x):\n    return x\n"] * 8, vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    cfg = tiny(**option)
    model = GPT(cfg)
    model.init_weights(seed=0)
    run = tmp_path / "run"
    run.mkdir()
    section = {
        k: getattr(cfg, k)
        for k in (
            "vocab_size",
            "n_layer",
            "n_head",
            "n_kv_head",
            "d_model",
            "max_seq_len",
            "mlp",
            "qk_norm",
            "qkv_bias",
            "logit_softcap",
        )
    }
    (run / "config.yaml").write_text(
        yaml.safe_dump({"kind": "pretrain", "model": section, "data": {"dir": str(tmp_path), "tokenizer": None}})
    )
    save_checkpoint(run, 1, model, torch.optim.AdamW(model.parameters()), {"step": 1})
    with pytest.raises(HFError, match=f"can't export as a Hugging Face Llama: {key}="):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_muon_on_two_ranks_matches_one_and_resumes_bitwise(tmp_path, tiny_data):
    """FSDP2 shards every matrix over 2 gloo ranks: gathered before orthogonalizing, the losses match one
    process; a run resumed from its step-6 checkpoint repeats steps 7..12 bitwise (Muon's momentum and
    AdamW's moments restored), with every model option on; and the WSD run extends from its stable phase."""
    recipe = [
        "optim.name=muon",
        "optim.schedule=wsd",
        "optim.decay_fraction=0.5",
        "model.qk_norm=true",
        "model.mlp=relu2",
        "model.logit_softcap=15",
        "train.max_steps=12",
        "checkpoint.every=6",
        "checkpoint.keep_last=5",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    train(1, one, tiny_data, *recipe)
    train(2, two, tiny_data, *recipe)
    ref, got = losses(one), losses(two)
    assert sorted(got) == list(range(1, 13))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=2e-4), (s, got[s], ref[s])
    # Extending the WSD run from its stable phase (docs/recipe.md): a new run folder holding the step-6
    # checkpoint, twice the steps. Its LR is the first run's until the first run's decay lowers it (the
    # update of step 8): losses through step 8 (weights after 7 updates) repeat, later ones do not.
    longer = tmp_path / "longer"
    shutil.copytree(two / "checkpoints" / "step_00000006", longer / "checkpoints" / "step_00000006")
    train(2, longer, tiny_data, *recipe, "train.max_steps=24")
    extended = losses(longer)
    assert sorted(extended) == list(range(7, 25))
    assert [extended[s] for s in range(7, 9)] == [got[s] for s in range(7, 9)]
    assert extended[12] != got[12]  # the first run was decaying there; the extended one is not
    shutil.rmtree(two / "checkpoints" / "step_00000012")
    train(2, two, tiny_data, *recipe)
    again = losses(two)
    assert [again[s] for s in range(7, 13)] == [got[s] for s in range(7, 13)]
