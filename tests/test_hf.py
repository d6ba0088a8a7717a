"""Hugging Face export/import: a checkpoint saved as the trainer saves it, exported, then read by
transformers' own LlamaForCausalLM and tokenizer, and imported back."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"  # local folders only: nothing may download
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from model.config import GPTConfig  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.state_dict_adapter import HFError  # noqa: E402
from training.hf_export import export_hf  # noqa: E402
from training.hf_import import import_hf, load_hf_state_dict  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
# save_checkpoint in one process: DCP says it assumes one process, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TEXTS = [
    "def main():\n    print('hello, world')\n",
    "Grüße aus Köln — naïve café, 東京 and emoji 🚀 in one line.\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "for i in range(10):\n    total += i * i\n",
]
SAMPLE = "Grüße, 東京! 🚀 def f(x): return x  <|endoftext|> tail\n\ttabs  and  spaces"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    train_tokenizer(TEXTS * 4, vocab_size=300).save(str(data / "tokenizer.json"))
    return data


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("exported")
    run, _ = make_run(root, tokenizer_dir, tie=True, n_kv_head=2)
    return export_hf(run, root / "hf")


def make_run(root: Path, data_dir: Path, *, tie: bool, n_kv_head, step: int = 7) -> tuple[Path, GPT]:
    """A run folder as the trainer leaves it: config.yaml (vocab_size null) and one checkpoint."""
    vocab = load_tokenizer(data_dir / "tokenizer.json").get_vocab_size()
    # init_std 0.1, not 0.02: peaked attention, so a rotary or norm mismatch shows far above 1e-4.
    model_section = dict(
        vocab_size=None,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=64,
        ffn_hidden=None,
        max_seq_len=64,
        rope_theta=10000.0,
        norm_eps=1e-5,
        tie_embeddings=tie,
        init_std=0.1,
    )
    cfg = GPTConfig(**{**model_section, "vocab_size": 64 * ((vocab + 63) // 64)})
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights(seed=1)
    # One optimizer step: the optimizer has state to save, and the weights are no longer the init.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"kind": "pretrain", "model": model_section, "data": {"dir": str(data_dir), "tokenizer": None}})
    )
    save_checkpoint(run, step, model, opt, {"step": step, "tokens_seen": 0})
    return run, model.eval()


@pytest.mark.parametrize(
    "tie,n_kv_head", [(True, 2), (False, 2), (True, None)], ids=["tied-gqa", "untied-gqa", "tied-mha"]
)
def test_transformers_reads_the_export(tmp_path, tokenizer_dir, tie, n_kv_head):
    run, model = make_run(tmp_path, tokenizer_dir, tie=tie, n_kv_head=n_kv_head)
    out = export_hf(run, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie and config["vocab_size"] == model.cfg.vocab_size
    assert config["num_key_value_heads"] == model.cfg.kv_heads
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tie

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits.float()
    assert (ours - theirs).abs().max().item() < 1e-4

    # Round trip: importing the export gives back exactly the checkpoint's weights.
    back = import_hf(out)
    assert back.cfg.tie_embeddings is tie and back.cfg.kv_heads == model.cfg.kv_heads
    expected, got = model.state_dict(), back.state_dict()
    assert sorted(expected) == sorted(got)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    if tie:
        assert back.output.weight is back.tok_embeddings.weight
    with torch.no_grad():
        assert torch.equal(back(tokens), ours)


def test_tokenizer_matches_ours(tmp_path, tokenizer_dir):
    run, _ = make_run(tmp_path, tokenizer_dir, tie=True, n_kv_head=2)
    checkpoint = run / "checkpoints" / "step_00000007"
    out = export_hf(checkpoint, tmp_path / "hf")  # a checkpoint folder works as well as a run folder
    ours = load_tokenizer(tokenizer_dir / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in [SAMPLE, *TEXTS]:
        ids = ours.encode(text).ids
        assert theirs.encode(text) == ids  # no BOS added, special-token text stays text
        assert theirs.decode(ids) == text
    assert theirs.eos_token_id == theirs.bos_token_id == 0 and theirs.pad_token_id == 1
    assert theirs.convert_ids_to_tokens([2, 3]) == ["<|im_start|>", "<|im_end|>"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0


def test_newest_valid_checkpoint_and_overwrite_rules(tmp_path, tokenizer_dir):
    run, model = make_run(tmp_path, tokenizer_dir, tie=False, n_kv_head=2)
    # A newer checkpoint whose save never finished is skipped with a warning.
    broken = run / "checkpoints" / "step_00000009"
    shutil.copytree(run / "checkpoints" / "step_00000007", broken)
    (broken / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="step_00000009"):
        out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "orch_export.json").read_text())["step"] == 7
    # Re-exporting over an earlier export is fine; over anything else is refused.
    shutil.rmtree(broken)
    export_hf(run, out, dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf")]  # no temp folders left
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(HFError, match="not empty"):
        export_hf(run, other)
    assert (other / "notes.txt").read_text() == "keep me"
    _, state = load_hf_state_dict(out)
    assert state["tok_embeddings.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "key,value",
    [
        ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("attention_bias", True),
        ("model_type", "mistral"),
        ("hidden_act", "gelu"),
    ],
)
def test_unrepresentable_configs_are_refused(tmp_path, exported, key, value):
    out = shutil.copytree(exported, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config[key] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFError, match=key) as info:
        import_hf(out)
    assert repr(value) in str(info.value)


def test_sharded_hf_folder_imports(tmp_path, tokenizer_dir):
    """model-0000x-of-0000y.safetensors with an index, as transformers writes big models."""
    run, model = make_run(tmp_path, tokenizer_dir, tie=False, n_kv_head=2)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    back = import_hf(sharded)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


SAVE_ON_TWO_RANKS = """
import json, os, sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from model.config import GPTConfig
from model.gpt import GPT
from model.parallelize import parallelize
from training.checkpoint import save_checkpoint

run, cfg = sys.argv[1], GPTConfig(**json.loads(sys.argv[2]))
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
with torch.device("meta"):
    model = GPT(cfg)
model = parallelize(model, mesh, param_dtype=torch.float32)
model.to_empty(device="cpu")
model.init_weights(seed=3)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
opt.step()
save_checkpoint(run, 5, model, opt, {"step": 5, "tokens_seen": 0})
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
if dist.get_rank() == 0:
    save_file({k: v.contiguous() for k, v in full.items()}, run + "/reference.safetensors")
dist.barrier()
dist.destroy_process_group()
# Skip the interpreter's teardown: gloo's threads there aborted a rank now and then (1 run in 6 under load),
# after everything this script is for had been written.
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


def test_export_reassembles_a_checkpoint_saved_by_two_tensor_parallel_ranks(tmp_path, tokenizer_dir):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from model.state_dict_adapter import to_hf_name
    from tests.conftest import env_for

    vocab = load_tokenizer(tokenizer_dir / "tokenizer.json").get_vocab_size()
    section = dict(vocab_size=None, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64, tie_embeddings=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": section, "data": {"dir": str(tokenizer_dir)}}))
    script = tmp_path / "save.py"
    script.write_text(SAVE_ON_TWO_RANKS)
    cfg = json.dumps({**section, "vocab_size": 64 * ((vocab + 63) // 64)})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(run),
            cfg,
        ],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    shards = sorted((run / "checkpoints" / "step_00000005" / "model").glob("*.safetensors"))
    writers = {p.name.split("-model-")[0] for p in shards}  # "shard-0000R": the rank that wrote it
    assert len(writers) == 2, shards  # both ranks wrote files, each holding slices

    out = export_hf(run, tmp_path / "hf")
    exported, reference = load_file(str(out / "model.safetensors")), load_file(str(run / "reference.safetensors"))
    assert sorted(exported) == sorted(to_hf_name(k) for k in reference)
    for k, v in reference.items():
        assert torch.equal(exported[to_hf_name(k)], v), k
