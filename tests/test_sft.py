"""Supervised fine-tuning: the chat format's loss mask, packing without cross-document attention,
the demo data's split, and real SFT runs (one process and two gloo processes killed and resumed)
from a tiny pretraining checkpoint."""

from __future__ import annotations

import ast
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.document_attention import dense_document_mask
from model.gpt import GPT
from tests.conftest import REPO, TINY, env_for, tiny_overrides
from tests.test_distributed import killed_at, losses
from training.data import DataError
from training.data.tokenizer import load_tokenizer
from training.posttrain.chat import IGNORE, encode_example, encode_prompt, end_of_turn_id, pack, render_chat
from training.posttrain.demo_data import write_demo_data
from training.posttrain.jsonl import read_jsonl

SEQ = 256  # SFT rows; the tiny source model is pretrained with rotary tables this long
SFT_JOB = str(REPO / "jobs" / "sft.yaml")
EXAMPLE = {"prompt": "Write the Python function `def two():`:\nReturn 2.", "completion": "def two():\n    return 2"}


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return load_tokenizer(Path(tiny_data) / "tokenizer.json")


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_data) -> dict:
    """A tiny pretraining run to fine-tune, and SFT files derived from 200 stdlib files that fit SEQ tokens."""
    root = tmp_path_factory.mktemp("sft-source")
    run = root / "pretrain"
    cmd = [
        sys.executable,
        "-m",
        "training.main",
        str(REPO / "jobs" / "pretrain.yaml"),
        *tiny_overrides(tiny_data, f"model.max_seq_len={SEQ}", "train.max_steps=30"),
        "--run-dir",
        str(run),
    ]
    result = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    paths = write_demo_data(root / "posttrain", Path(tiny_data) / "tokenizer.json", max_docs=200, max_tokens=SEQ)
    return {"run": run, **paths}


def sft_command(source: dict, run_dir: Path, *extra: str, nproc: int = 1) -> list[str]:
    # model.* is unused (the shape is the source's) but the spec check compares it with data.seq_len.
    overrides = [
        *TINY,
        f"data.seq_len={SEQ}",
        f"model.max_seq_len={SEQ}",
        f"checkpoint.init_from={source['run']}",
        f"sft.train_file={source['sft_train']}",
        f"sft.val_file={source['sft_val']}",
        *extra,
    ]
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    return [*launcher, "-m", "training.main", SFT_JOB, *overrides, "--run-dir", str(run_dir)]


def run_sft(source: dict, run_dir: Path, *extra: str, nproc: int = 1) -> tuple[dict, str]:
    """(summary.json, the output) of a finished SFT run."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        sft_command(source, run_dir, *extra, nproc=nproc),
        cwd=run_dir.parent,
        env=env_for(run_dir.parent),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text()), result.stdout + result.stderr


# ---------------------------------------------------------------- the chat format


def test_prompt_carries_no_loss_and_the_end_of_turn_does(tokenizer):
    input_ids, labels = encode_example(tokenizer, EXAMPLE, None)
    assert len(input_ids) == len(labels)
    learned = [t for t in labels if t != IGNORE]
    completion = tokenizer.encode(EXAMPLE["completion"], add_special_tokens=False).ids
    assert learned == completion + [end_of_turn_id(tokenizer)]  # exactly the answer, then the stop token
    # The learned tokens are the last ones but the closing newline: none of the prompt is learned.
    first = labels.index(learned[0])
    assert all(t == IGNORE for t in labels[:first]) and len(input_ids) - first == len(learned) + 1
    # Generation starts where the answer starts, and the ids spell the template's text.
    prompt = encode_prompt(tokenizer, EXAMPLE["prompt"])
    assert input_ids[: len(prompt)] == prompt and len(prompt) == first + 1
    messages = [{"role": "user", "content": EXAMPLE["prompt"]}, {"role": "assistant", "content": EXAMPLE["completion"]}]
    assert tokenizer.decode(prompt, skip_special_tokens=False) == render_chat(messages[:1], add_generation_prompt=True)


def test_padding_is_masked_by_position_even_when_pad_id_is_the_end_of_turn_id(tokenizer):
    example = encode_example(tokenizer, EXAMPLE, None)
    stop = end_of_turn_id(tokenizer)
    [row] = pack([example], 64, pad_id=stop)
    n = len(example[0])
    assert (row["input_ids"][n:] == stop).all() and (row["labels"][n:] == IGNORE).all()
    assert row["labels"][:n].tolist() == example[1] and stop in row["labels"][:n].tolist()


def test_jsonl_errors_name_the_file_line_and_key(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLE) + "\n\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3 \(sft\.train_file\).*'completion'"):
        read_jsonl(path, ("prompt", "completion"), what="sft.train_file")


# ---------------------------------------------------------------- packing


def test_packed_documents_do_not_attend_to_each_other(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, vocab_size=512, max_seq_len=128))
    model.init_weights(seed=0)
    model.eval()
    first = encode_example(tokenizer, EXAMPLE, None)
    second = encode_example(tokenizer, {"prompt": "Return one.", "completion": "def one():\n    return 1"}, None)
    n1, n2 = len(first[0]), len(second[0])
    [row] = pack([first, second], 128)
    assert row["position_ids"].tolist() == [*range(n1), *range(n2), *range(128 - n1 - n2)]
    assert row["doc_ids"].tolist() == [0] * n1 + [1] * n2 + [2] * (128 - n1 - n2)

    def logits(tokens):
        mask = dense_document_mask(row["doc_ids"][None])
        return model(tokens[None], row["position_ids"][None], mask)[0]

    with torch.no_grad():
        before = logits(row["input_ids"])
        changed = row["input_ids"].clone()
        changed[n1 - 3] = (changed[n1 - 3] + 1) % 512  # a token of document 1
        after = logits(changed)
        alone = model(torch.tensor(second[0])[None])[0]
    assert not torch.allclose(before[:n1], after[:n1])  # the change is visible within document 1 ...
    assert torch.equal(before[n1 : n1 + n2], after[n1 : n1 + n2])  # ... and nowhere in document 2
    torch.testing.assert_close(before[n1 : n1 + n2], alone, atol=1e-5, rtol=1e-5)  # as if it were alone


# ---------------------------------------------------------------- demo data


def is_one_function(source: str) -> bool:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    return len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef)


def test_demo_data_keeps_held_out_functions_out_of_training(tmp_path):
    paths = write_demo_data(tmp_path / "pt", max_docs=40, seed=3)
    train = read_jsonl(paths["sft_train"], ("prompt", "completion"))
    val = read_jsonl(paths["sft_val"], ("prompt", "completion"))
    assert train and val and not {r["completion"] for r in train} & {r["completion"] for r in val}
    assert all("def " in r["completion"] and r["completion"].count("\n") < 30 for r in train)
    pairs = read_jsonl(paths["pref_val"], ("prompt", "chosen", "rejected"))
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    unindented = [p for p in pairs if p["corruption"] == "unindent"]
    assert len(unindented) >= len(pairs) // 3  # the reliably detectable kind is common
    for p in unindented:  # the code falls out of the function: no longer one function definition
        assert is_one_function(p["chosen"]) and not is_one_function(p["rejected"])
    grpo = read_jsonl(paths["grpo_train"], ("prompt", "signature"))
    assert all(g["signature"].startswith("def ") and g["signature"] in g["prompt"] for g in grpo)
    mtime = paths["sft_train"].stat().st_mtime_ns
    assert write_demo_data(tmp_path / "pt", max_docs=40, seed=3) == paths  # reused, not rewritten
    assert paths["sft_train"].stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, source) -> tuple[Path, dict]:
    """A finished 40-step SFT run from the tiny source: (run folder, summary.json)."""
    run_dir = tmp_path_factory.mktemp("sft-tuned") / "sft"
    summary, _ = run_sft(source, run_dir, "train.max_steps=40", "optim.lr=3e-3")
    return run_dir, summary


def test_sft_lowers_the_held_out_completion_loss(tmp_path, source, tuned):
    before, _ = run_sft(source, tmp_path / "before", "train.max_steps=0")  # evaluates the starting model
    after = tuned[1]
    print(
        f"held-out completion loss {before['val_loss']:.3f} -> {after['val_loss']:.3f} nats/token, "
        f"token accuracy {before['val_token_acc']:.3f} -> {after['val_token_acc']:.3f}"
    )
    assert after["val_loss"] < before["val_loss"] - 0.2
    assert after["val_token_acc"] > before["val_token_acc"]


@pytest.mark.slow
def test_sft_on_two_processes_resumes_exactly_after_a_kill(tmp_path, source):
    extra = [
        "train.max_steps=16",
        "checkpoint.every=4",
        "checkpoint.keep_last=2",
        "train.log_every=1",
        "train.micro_batch_size=4",
    ]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_sft(source, reference, *extra, nproc=2)
    kill_step = random.Random(20261201).randint(6, 12)  # seeded: a failure replays exactly
    killed.mkdir(parents=True)
    assert killed_at(sft_command(source, killed, *extra, nproc=2), killed, kill_step) != 0
    _, output = run_sft(source, killed, *extra, nproc=2)
    resumed = re.search(r"resumed from \S*step_(\d+)", output)
    assert resumed, output[-3000:]
    resumed_from = int(resumed.group(1))
    assert 4 <= resumed_from < 16
    ref, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 17))
    for step in range(resumed_from + 1, 17):
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r} (killed at {kill_step})"


def test_hf_export_of_a_tuned_run_ships_the_chat_template(tmp_path, source, tuned, tokenizer):
    from transformers import AutoTokenizer

    from training.hf_export import export_hf

    out = export_hf(tuned[0], tmp_path / "hf")
    assert (out / "chat_template.jinja").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert end_of_turn_id(tokenizer) in generation["eos_token_id"]  # generate() stops at the end of the turn
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    for record in read_jsonl(source["sft_val"], ("prompt",))[:10]:
        messages = [{"role": "user", "content": record["prompt"]}]
        ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        assert list(ids) == encode_prompt(tokenizer, record["prompt"])


def first_step(run_dir: Path) -> dict:
    return next(
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("step") == 1 and "loss" in json.loads(line)
    )


@pytest.mark.slow
def test_the_loss_weighs_every_completion_token_alike_however_the_step_is_split(tmp_path, source):
    """One fp32 step on the same 8 rows (completions of uneven lengths): 1 x 8, 4 micro-batches x 2, 2 ranks
    x 4, and 2 tensor-parallel ranks (the loss on logits sharded over the vocabulary) give the same loss and
    gradient norm. A mean of per-micro-batch means would weigh short rows more."""
    common = [
        "train.max_steps=1",
        "train.log_every=1",
        "train.val_every=0",
        "checkpoint.every=0",
        "optim.grad_clip=0",
        "train.dtype=fp32",
    ]
    shapes = {
        "1x8": (["train.micro_batch_size=8"], 1),
        "4x2": (["train.micro_batch_size=2", "train.grad_accum_steps=4"], 1),
        "2ranks": (["train.micro_batch_size=4"], 2),
        "tp2": (["train.micro_batch_size=8", "parallel.tp=2"], 2),
    }
    steps = {}
    for name, (extra, nproc) in shapes.items():
        run_sft(source, tmp_path / name, *common, *extra, nproc=nproc)
        steps[name] = first_step(tmp_path / name)
    for name in ("4x2", "2ranks", "tp2"):
        assert steps[name]["loss"] == pytest.approx(steps["1x8"]["loss"], rel=1e-5), (name, steps)
        assert steps[name]["grad_norm"] == pytest.approx(steps["1x8"]["grad_norm"], rel=1e-5), (name, steps)
