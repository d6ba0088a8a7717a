"""LoRA: the module (wrapping by our names, frozen base, merge/unmerge, adapters off = the base),
then real training processes: SFT with LoRA on 2 gloo ranks under FSDP2 killed and resumed exactly
from adapter-only checkpoints, a changed base refused on resume, and DPO whose reference is the base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.lora import LoRALinear, adapters_disabled, apply_lora, init_lora_weights, merge_adapters, unmerge_adapters

CFG = GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16)


def tiny_lora(targets=("wq", "wv", "w2"), **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(CFG)
    model.init_weights(seed=0)
    apply_lora(model, rank=4, alpha=8, target_modules=targets, **kw)
    init_lora_weights(model, seed=1)
    return model


def test_wraps_the_named_projections_and_freezes_the_rest():
    model = tiny_lora()
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == [f"layers.{i}.{p}" for i in range(2) for p in ("attention.wq", "attention.wv", "feed_forward.w2")]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{w}.lora_{ab}.weight" for w in wrapped for ab in "AB"}
    assert model.checkpoint_keys == trainable
    assert set(model.fresh_keys) == trainable, "a base checkpoint lacks exactly the adapters"
    # the base weight keeps its name, so a base checkpoint loads into the wrapped model as it is
    assert "layers.0.attention.wq.weight" in model.state_dict()


def test_starts_as_the_base_and_adapters_off_is_the_base():
    model = tiny_lora()
    tokens = torch.randint(0, 64, (2, 10))
    with adapters_disabled(model):
        base = model(tokens)
    assert torch.equal(model(tokens), base), "B = 0 at the start: the wrapped model is its base"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    tuned = model(tokens)
    assert (tuned - base).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(model(tokens), base)
    assert torch.equal(model(tokens), tuned), "adapters come back on after the block"


def test_merge_gives_the_same_logits_and_unmerge_restores_the_weights():
    model = tiny_lora()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.5)
    tokens = torch.randint(0, 64, (2, 10))
    before = model(tokens)
    weight = model.layers[0].attention.wq.weight.detach().clone()
    merge_adapters(model)
    assert not torch.equal(model.layers[0].attention.wq.weight, weight)
    assert torch.allclose(model(tokens), before, atol=1e-5)
    unmerge_adapters(model)
    assert torch.allclose(model.layers[0].attention.wq.weight, weight, atol=1e-6)
    assert torch.allclose(model(tokens), before, atol=1e-5)


def test_only_adapters_get_gradients_and_modules_to_save_train_too():
    model = tiny_lora(targets=("wk",), modules_to_save=("norm",))
    model(torch.randint(0, 64, (2, 10))).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"norm.weight", *(f"layers.{i}.attention.wk.lora_{ab}.weight" for i in range(2) for ab in "AB")}
    assert "norm.weight" in model.checkpoint_keys and "norm.weight" not in model.fresh_keys


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"target_modules": ["wz"]}, "'wz', which matches no projection"),
        ({"target_modules": ["wq"], "modules_to_save": ["head"]}, "'head', which is no module"),
        ({"target_modules": ["wq"], "rank": 0}, "lora.rank=0"),
    ],
)
def test_bad_targets_are_named(kw, match):
    args = {"rank": 4, "alpha": 8, **kw}
    with pytest.raises(ValueError, match=match):
        apply_lora(GPT(CFG), **args)


# ---------------------------------------------------------------- real runs, from a tiny pretrain

from tests.conftest import env_for, posttrain_command  # noqa: E402
from tests.test_distributed import final_weights, killed_at, losses  # noqa: E402

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.target_modules=[wq,wv,w1,w2,w3]"]


@pytest.fixture(scope="module")
def source(posttrain_source, tmp_path_factory) -> dict:
    """The session's tiny pretrain and demo files; this module's runs go in a folder of its own."""
    return dict(posttrain_source, root=tmp_path_factory.mktemp("lora"))


def job(kind: str, source: dict, run_dir: Path, *extra: str, nproc: int = 1) -> list[str]:
    return posttrain_command(
        kind, source, run_dir, "optim.lr=3e-3", "train.val_at_start=false", *LORA, *extra, nproc=nproc
    )


def run_job(cmd: list[str], cwd: Path, expect: int = 0) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env_for(cwd), capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_lora_sft_on_two_fsdp_ranks_saves_adapters_only_and_resumes_exactly(source):
    extra = [
        "train.max_steps=8",
        "checkpoint.every=3",
        "checkpoint.keep_last=3",
        "train.micro_batch_size=2",
        "sft.val_max=8",
    ]
    reference, killed = source["root"] / "lora-reference", source["root"] / "lora-killed"
    output = run_job(job("sft", source, reference, *extra, nproc=2), source["root"])
    assert "LoRA:" in output and "parameters train" in output
    train = losses(reference)
    # the checkpoint holds the adapters only, and names its base
    saved = final_weights(reference)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k), "B starts at 0: it learned"
    assert len(saved) == 2 * 5 * 2  # 2 blocks x 5 projections x (A, B)
    step = sorted((reference / "checkpoints").glob("step_*"))[-1]
    record = json.loads((step / "trainer_state.json").read_text())["lora_base"]
    assert Path(record["checkpoint"]).parent.parent == source["run"].resolve() and record["rank"] == 4
    # rank 1 killed right after optimizer step 4 (a fault point): resumes from step 3's adapters, takes the same steps
    assert killed_at(job("sft", source, killed, *extra, nproc=2), killed, 4) != 0
    output = run_job(job("sft", source, killed, *extra, nproc=2), source["root"])
    assert "step_00000003" in output
    got = losses(killed)
    for s in range(4, 9):
        assert got[s] == train[s], f"step {s}: {got[s]!r} != {train[s]!r}"


@pytest.mark.slow
def test_a_changed_base_stops_the_resume_with_a_sentence(source, tmp_path):
    import shutil

    base_run = tmp_path / "base"
    shutil.copytree(source["run"], base_run)
    src = dict(source, run=base_run)
    run_dir = tmp_path / "lora"
    run_job(job("sft", src, run_dir, "train.max_steps=2", "sft.val_max=4"), tmp_path)
    base_ckpt = sorted((base_run / "checkpoints").glob("step_*"))[-1]
    manifest = json.loads((base_ckpt / "manifest.json").read_text())
    manifest["note"] = "retrained"  # any change to the base checkpoint changes its manifest's hash
    (base_ckpt / "manifest.json").write_text(json.dumps(manifest))
    output = run_job(job("sft", src, run_dir, "train.max_steps=4", "sft.val_max=4"), tmp_path, expect=2)
    assert "changed since" in output and str(base_ckpt) in output
    # evaluating or exporting the run finds the same problem rather than merging onto the wrong base
    from training import checkpoint as ckpt
    from training.run_folder import read_checkpoint_model

    with pytest.raises(ckpt.CheckpointError, match="changed since"):
        read_checkpoint_model(sorted((run_dir / "checkpoints").glob("step_*"))[-1])


@pytest.mark.slow
def test_lora_dpo_uses_the_base_as_its_reference(source):
    run_dir = source["root"] / "lora-dpo"
    output = run_job(
        job("dpo", source, run_dir, "train.max_steps=3", "train.micro_batch_size=4", "dpo.val_max=8", "optim.lr=1e-2"),
        source["root"],
    )
    assert "initialized weights" in output
    train = losses(run_dir)
    assert train[1] == pytest.approx(0.6931, abs=1e-3), "adapters start at zero: policy = reference, loss log 2"
    assert train[3] < train[1], "and the policy moves away from the base it is compared with"


@pytest.mark.slow
def test_export_writes_the_base_and_a_peft_adapter_that_peft_loads_with_our_logits(source, tmp_path):
    import peft
    from transformers import LlamaForCausalLM

    from training.run_folder import read_checkpoint_model
    from model.config import GPTConfig as Config

    run_dir = tmp_path / "lora-sft"
    run_job(job("sft", source, run_dir, "train.max_steps=3", "sft.val_max=4", "optim.lr=3e-2"), tmp_path)
    out = tmp_path / "hf"
    for merge in (False, True):
        target = out if not merge else tmp_path / "hf-merged"
        cmd = [sys.executable, "-m", "orchestrator.cli", "export", str(run_dir), "--hf", str(target)]
        result = subprocess.run(
            cmd + (["--merge"] if merge else []), cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    # ours: the base with the adapters merged, run through our own GPT
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    state = read_checkpoint_model(step)
    cfg = Config(**{**json.loads((out / "orch_export.json").read_text())["model"]})
    ours = GPT(cfg)
    ours.init_weights(seed=0)
    ours.load_state_dict(state, strict=False)
    ours.eval()
    tokens = torch.randint(4, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours(tokens)
        base = LlamaForCausalLM.from_pretrained(out).eval()
        plain = base(tokens).logits
        tuned = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        theirs = tuned(tokens).logits
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "hf-merged").eval()(tokens).logits
    assert (plain - mine).abs().max() > 1e-3, "the adapters changed the model: the test can tell base from tuned"
    assert (theirs - mine).abs().max().item() <= 1e-4
    assert (merged - mine).abs().max().item() <= 1e-4
