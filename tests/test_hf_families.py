"""The Hugging Face families people post-train, in and out: small random models made by transformers' own config
and model classes (Llama 3.x with llama3 rotary scaling, SmolLM2's Llama layout, Qwen2 with q/k/v biases, Qwen3
with q/k norms and its own head_dim) give our logits after import, and the folder exported after a training step
gives transformers ours. What we can't represent is refused, at `orch submit` already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"  # local folders only: nothing may download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from model.hf_families import HFError, read_hf_config  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.data.tokenizer import train_tokenizer  # noqa: E402
from training.hf_export import export_hf  # noqa: E402
from training.hf_import import import_hf  # noqa: E402
from training.run_folder import write_artifacts  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)
# Llama 3.1's scaling with a 64-position "pretraining context": over 16 dims at theta 1e4 the wavelengths fall in
# all three bands (kept, interpolated, slowed by factor).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES = {
    "llama3-gqa-untied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE)),
    "smollm2-tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=100000.0)),
    "qwen2-tied": (
        "Qwen2",
        dict(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=32,
            max_window_layers=1,
        ),
    ),  # a window named, not used
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),  # head_dim != 64 / 4
}


def hf_model(name: str, seed: int = 0):
    prefix, extra = FAMILIES[name]
    config = getattr(transformers, f"{prefix}Config")(**TINY, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():  # norm gains and biases away from their init of ones and zeros: each must be carried
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["def f(x):\n    return x * 2\n", "The quick brown fox.\n"] * 8, vocab_size=300).save(str(path))
    return path


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, theirs, tokens) -> float:
    with torch.no_grad():
        return (ours(tokens) - theirs(tokens).logits).abs().max().item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_train_export_matches_transformers(tmp_path, tokenizer_json, name):
    theirs = hf_model(name)
    theirs.save_pretrained(tmp_path / "in", safe_serialization=True)
    ours = import_hf(tmp_path / "in").eval()
    assert max_diff(ours, theirs, batch()) < 1e-4

    # One training step on our side, saved as the trainer saves it, then exported.
    ours.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    tokens = batch(2)
    torch.nn.functional.cross_entropy(ours(tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    ours.eval()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"kind": "pretrain", "model": asdict(ours.cfg)}))
    write_artifacts(run, ours.cfg, tokenizer_json)
    save_checkpoint(run, 1, ours, opt, {"step": 1, "tokens_seen": 0})
    out = export_hf(run, tmp_path / "out")

    assert read_hf_config(out) == ours.cfg  # config.json carries every option back, rope_scaling included
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back).__name__ == type(theirs).__name__
    assert max_diff(ours, back, batch(3)) < 1e-4
    assert max_diff(ours, theirs, batch(3)) > 1e-3, "the training step changed the weights"


def test_llama3_rope_scaling_changes_the_rotary_table():
    """The scaled and the plain tables differ: the Llama 3 case above would not pass on plain rotary."""
    from model.gpt import rotary_tables

    plain, _ = rotary_tables(16, 64, 10000.0)
    scaled, _ = rotary_tables(16, 64, 10000.0, LLAMA3_ROPE)
    assert torch.equal(plain[:, 0], scaled[:, 0])  # the highest frequency is kept
    assert not torch.allclose(plain, scaled, atol=1e-2)


def save_config(folder: Path, prefix: str, **extra) -> Path:
    getattr(transformers, f"{prefix}Config")(**{**TINY, **extra}).save_pretrained(folder)
    return folder


# config.json as transformers writes it, with a family or option our GPT doesn't have
REFUSED = {
    "sliding-window": (
        ("Qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
        "layer_types",
        "sliding_attention",
    ),
    "moe": (("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2)), "model_type", "'qwen3_moe'"),
    "rope-yarn": (
        ("Llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
        "rope_scaling",
        "'yarn'",
    ),
    "gelu": (("Llama", dict(hidden_act="gelu")), "hidden_act", "'gelu'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_families_and_options_are_refused_naming_key_and_value(tmp_path, case):
    (prefix, extra), key, value = REFUSED[case]
    folder = save_config(tmp_path / "m", prefix, **extra)
    with pytest.raises(HFError) as info:
        read_hf_config(folder)
    msg = str(info.value)
    assert msg.startswith(f"{folder / 'config.json'}: key '{key}' has the value ") and value in msg, msg


def test_orch_submit_refuses_an_unsupported_init_from_before_queueing(tmp_path):
    folder = save_config(tmp_path / "qwen", "Qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            str(REPO / "jobs" / "sft.yaml"),
            f"checkpoint.init_from={folder}",
            "executor=local",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "ORCH_HOME": str(tmp_path / ".orch"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    assert f"key 'checkpoint.init_from' has the value '{folder}'" in result.stderr
    assert f"{folder / 'config.json'}: key 'layer_types' has the value" in result.stderr
    assert result.stderr.count("\n") == 1, "one paragraph, no traceback"
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".orch").exists(), "nothing registered"


def test_a_supported_init_from_passes_submit_checks(tmp_path):
    from jobspec import load_spec

    folder = save_config(tmp_path / "qwen3", "Qwen3", num_key_value_heads=2, head_dim=32)
    (folder / "model.safetensors").touch()  # submit checks that weights are there, not what they hold
    cfg = load_spec(str(REPO / "jobs" / "sft.yaml"), [f"checkpoint.init_from={folder}"], launch=True)
    assert cfg.checkpoint.init_from == str(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3"


def test_lora_keeps_qwen2_biases(tmp_path):
    """LoRA wraps q/k/v with their biases: at init (B = 0) the wrapped model is the imported one."""
    from model.lora import apply_lora, init_lora_weights, merge_adapters

    theirs = hf_model("qwen2-tied")
    theirs.save_pretrained(tmp_path / "in", safe_serialization=True)
    ours = import_hf(tmp_path / "in").eval()
    apply_lora(ours, rank=4, alpha=8.0, target_modules=["wq", "wk", "wv"])
    init_lora_weights(ours, seed=0)
    assert max_diff(ours, theirs, batch()) < 1e-4
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.normal_(0, 0.1)
    lora_logits = ours(batch()).detach()
    merge_adapters(ours)
    assert (ours(batch()) - lora_logits).abs().max().item() < 1e-4
    assert (lora_logits - theirs(batch()).logits).abs().max().item() > 1e-3


@pytest.mark.slow
def test_a_lora_sft_run_from_a_qwen2_folder_exports_merged(tmp_path, posttrain_source):
    """The trainer starts a LoRA SFT run from a Qwen2 folder (checkpoint.init_from), and `orch export --merge`
    writes a Qwen2 that transformers reads with our logits."""
    import shutil

    from conftest import POSTTRAIN_SEQ, env_for, posttrain_command
    from training.data.tokenizer import load_tokenizer
    from training.run_folder import load_model

    vocab = 64 * ((load_tokenizer(posttrain_source["tokenizer"]).get_vocab_size() + 63) // 64)
    _, extra = FAMILIES["qwen2-tied"]
    config = transformers.Qwen2Config(
        **{**TINY, **extra, "vocab_size": vocab, "max_position_embeddings": POSTTRAIN_SEQ}
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2", safe_serialization=True)
    shutil.copyfile(posttrain_source["tokenizer"], tmp_path / "qwen2" / "tokenizer.json")

    run = tmp_path / "run"
    cmd = posttrain_command(
        "sft",
        dict(posttrain_source, run=tmp_path / "qwen2"),
        run,
        "train.max_steps=2",
        "optim.lr=1e-2",
        "train.val_at_start=false",
        "lora.enabled=true",
        "lora.rank=4",
        "lora.alpha=8",
        "lora.target_modules=[wq,wk,wv,w1]",
    )
    result = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "export", str(run), "--hf", str(tmp_path / "out"), "--merge"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr

    ours, _ = load_model(run)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    assert max_diff(ours, back, tokens) < 1e-4
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2", dtype=torch.float32).eval()
    assert max_diff(ours, base, tokens) > 1e-4, "the adapters trained"


TP_SCRIPT = '''
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from model.config import GPTConfig
from model.gpt import GPT
from model.parallelize import parallelize
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

dist.init_process_group("gloo")
cfg = GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=32, qk_norm=True,
                head_size=32)
torch.manual_seed(0)
ref = GPT(cfg)
ref.init_weights(seed=0)
with torch.no_grad():
    for p in ref.parameters():
        if p.ndim == 1:
            p.add_(0.2 * torch.randn_like(p))
mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
with torch.device("meta"):
    model = GPT(cfg)
model = parallelize(model, mesh, param_dtype=torch.float32, compile=False, activation_checkpointing=False)
model.to_empty(device="cpu")
model.init_weights(seed=0)
set_model_state_dict(model, ref.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False))
tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
out = model(tokens)
out = out.full_tensor() if hasattr(out, "full_tensor") else out
out.square().mean().backward()
ref(tokens).square().mean().backward()
want = dict(ref.named_parameters())
for name, p in model.named_parameters():
    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
    assert (grad - want[name].grad).abs().max().item() < 1e-5, name
print("gradients match")
'''


@pytest.mark.slow
def test_qwen3_q_k_norm_gains_get_whole_gradients_under_tensor_parallel(tmp_path):
    """Each tensor-parallel rank sees only its heads: the shared q/k gains' gradients are summed over the ranks."""
    from conftest import env_for

    (tmp_path / "tp.py").write_text(TP_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "tp.py")],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "gradients match" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
