"""Special tokens and chat templates from the model folder's own files: a tokenizer whose id 0 is an ordinary
token, Llama 3.1's and Qwen2.5's real chat templates (tests/data/chat_templates), the SFT loss mask token by
token against transformers, conversational DPO and GRPO data, bad chat data refused with its file and line,
and SFT, DPO and GRPO runs and the eval from a Hugging Face folder made with `transformers`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from tests.conftest import REPO, TINY, env_for  # noqa: E402
from training.data import DataError  # noqa: E402
from training.data.special_tokens import special_tokens  # noqa: E402
from training.data.tokenizer import load_tokenizer  # noqa: E402
from training.posttrain.chat import (  # noqa: E402
    IGNORE,
    check_example,
    encode_conversation,
    encode_example,
    encode_prompt,
    end_of_turn_id,
    padding_id,
    stop_ids,
)
from training.posttrain.jsonl import read_jsonl  # noqa: E402

TEMPLATES = REPO / "tests" / "data" / "chat_templates"
TEXT = [
    "def add(a, b):\n    return a + b\n",
    "Write the Python function that adds two numbers. Sure, here it is.\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Réponds en français, s'il te plaît: déjà vu, naïve café.\n",
]
LLAMA = {
    "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "extra": ["<|eom_id|>", "<|python_tag|>"],
    "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},  # Llama 3.1 Instruct's
    "generation_eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "template": "llama3_1_instruct.jinja",
}
QWEN = {
    "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "extra": [],
    "config": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},  # Qwen2.5 Instruct's (no BOS)
    "generation_eos": ["<|im_end|>", "<|endoftext|>"],
    "template": "qwen2_5_instruct.jinja",
}
CONVERSATIONS = [
    [
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ],
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Add two numbers, please."},
        {"role": "assistant", "content": "  def add(a, b):\n    return a + b\n"},  # Llama's template trims it
        {"role": "user", "content": "Now in French?"},
        {"role": "assistant", "content": "Réponds: déjà vu."},
    ],
]


def make_folder(folder: Path, family: dict, template: str | None = None) -> Path:
    """A Hugging Face tokenizer folder saved by transformers: a byte-level BPE whose special tokens come after
    its ordinary ones (id 0 is the byte '!'), with the family's token names and generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    tok.add_special_tokens(family["specials"] + family["extra"])
    bos = family["config"].get("bos_token")
    if bos:  # Llama's tokenizer.json adds its BOS to plain text
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **family["config"])
    fast.chat_template = template if template is not None else (TEMPLATES / family["template"]).read_text()
    fast.save_pretrained(folder)
    ids = [tok.token_to_id(t) for t in family["generation_eos"]]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen"])
def family(request, tmp_path_factory):
    spec = {"llama": LLAMA, "qwen": QWEN}[request.param]
    folder = make_folder(tmp_path_factory.mktemp(request.param), spec)
    return spec, folder


def test_special_tokens_come_from_the_folder_and_id_0_is_ordinary(family):
    spec, folder = family
    tok = load_tokenizer(folder / "tokenizer.json")
    assert tok.id_to_token(0) == "!"  # an ordinary byte, not a special token
    special = special_tokens(tok)
    assert special.eos == tok.token_to_id(spec["config"]["eos_token"]) != 0
    assert special.bos == (tok.token_to_id(spec["config"]["bos_token"]) if "bos_token" in spec["config"] else None)
    assert special.pad == tok.token_to_id(spec["config"].get("pad_token", spec["config"]["eos_token"]))
    assert set(special.stops) == {tok.token_to_id(t) for t in spec["generation_eos"]}
    assert padding_id(tok) == special.pad and 0 not in stop_ids(tok, chat=True)
    end = "<|eot_id|>" if spec is LLAMA else "<|im_end|>"
    assert end_of_turn_id(tok) == tok.token_to_id(end) and end_of_turn_id(tok) in stop_ids(tok, chat=True)


def prefix_reference(hf, messages) -> tuple[list[int], list[int]]:
    """transformers' ids of the conversation and, independently of orch, which tokens each assistant turn
    adds to the prompt that asks for it (render(messages[:i+1]) after render(messages[:i], generation prompt),
    up to its last non-blank character), by the tokens' character offsets."""
    text = hf.apply_chat_template(messages, tokenize=False)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [0] * len(enc["input_ids"])
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = hf.apply_chat_template(messages[: i + 1], tokenize=False)
        assert text.startswith(through) and through.startswith(before)
        start, end = len(before), len(through.rstrip())
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            mask[t] |= int(a < end and b > start)
    return enc["input_ids"], mask


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "system-two-turns"])
def test_the_sft_mask_is_exactly_the_assistant_turns_of_the_real_templates(family, conversation):
    spec, folder = family
    tok = load_tokenizer(folder / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ids, learn = encode_conversation(tok, conversation)
    ref_ids, ref_mask = prefix_reference(hf, conversation)
    theirs = hf.apply_chat_template(conversation, tokenize=True)
    assert ids == ref_ids == list(theirs["input_ids"] if isinstance(theirs, dict) else theirs)
    assert [int(x) for x in learn] == ref_mask
    # What is learned reads as the replies, each with its end-of-turn token (Llama's template trims them).
    end = "<|eot_id|>" if spec is LLAMA else "<|im_end|>"
    said = [m["content"].strip() if spec is LLAMA else m["content"] for m in conversation if m["role"] == "assistant"]
    assert tok.decode([t for t, k in zip(ids, learn) if k], skip_special_tokens=False) == end.join(said) + end
    # The labels are the same tokens shifted by one, and generation starts where the first reply starts.
    input_ids, labels = encode_example(tok, {"messages": conversation}, None)
    assert input_ids == ids[:-1] and labels == [t if k else IGNORE for t, k in zip(ids[1:], learn[1:])]
    first_reply = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    prompt = encode_prompt(tok, conversation[:first_reply])
    assert ids[: len(prompt)] == prompt and learn[len(prompt)] and not any(learn[: len(prompt)])


def with_generation_markers(template: str, family: dict) -> str:
    """The family's template with {% generation %} around each assistant reply and its end of turn."""
    if family is LLAMA:
        old = (
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
            " + '<|eot_id|>' }}"
        )
        new = (
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
            "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}"
            "{% endgeneration %}{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
        )
    else:
        old = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        new = (
            "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.role == 'assistant' %}{% generation %}"
            "{{- message.content + '<|im_end|>' }}{% endgeneration %}{%- else %}{{- message.content + '<|im_end|>' }}"
            "{%- endif %}{{- '\\n' }}"
        )
    assert template.count(old) == 1
    return template.replace(old, new)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "system-two-turns"])
@pytest.mark.parametrize("name", ["llama", "qwen", "chatml"])
def test_generation_markers_mask_as_transformers_does(tmp_path, name, conversation):
    from training.data.special_tokens import CHATML

    spec = LLAMA if name == "llama" else QWEN
    template = CHATML if name == "chatml" else with_generation_markers((TEMPLATES / spec["template"]).read_text(), spec)
    folder = make_folder(tmp_path / name, spec, template)
    tok = load_tokenizer(folder / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    theirs = hf.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, learn = encode_conversation(tok, conversation)
    assert ids == list(theirs["input_ids"])
    assert [int(x) for x in learn] == list(theirs["assistant_masks"]) and any(learn)
    # The markers and the rendering of prefixes agree on these templates.
    assert [int(x) for x in learn] == prefix_reference(hf, conversation)[1]


ALTERNATING = (  # a template that refuses roles out of turn, as Mistral's and Gemma's do
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}{% endif %}"
)


def test_bad_chat_data_is_refused_with_its_file_and_line(tmp_path):
    from training.posttrain.pairs import PreferenceData

    tok = load_tokenizer(make_folder(tmp_path / "alt", LLAMA, ALTERNATING) / "tokenizer.json")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = {
        "the chat template .* refused the conversation: Conversation roles must alternate": {
            "messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]
        },
        "the conversation has no assistant turn": {"messages": [{"role": "user", "content": "hi"}]},
        r"key 'completion' must be a string or a non-empty list": {"prompt": "hi", "completion": []},
    }
    for pattern, bad in cases.items():
        path = tmp_path / "sft.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"sft\.jsonl:2 \(sft\.train_file\): {pattern}"):
            read_jsonl(path, what="sft.train_file", check=lambda r: check_example(tok, r))
    same = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "x", "rejected": "x"}
    data = object.__new__(PreferenceData)  # the loader's check alone: the rest needs a model
    data.tokenizer = tok
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**same, "rejected": "y"}) + "\n" + json.dumps(same) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2 \(dpo\.train_file\): 'chosen' and 'rejected' are the same"):
        read_jsonl(path, what="dpo.train_file", check=data.check)


# ---------------------------------------------------------------- runs from a Hugging Face folder

SEQ = 128


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A tiny random Llama 3 model (transformers' classes, save_pretrained) with the Llama tokenizer folder."""
    import torch

    folder = make_folder(tmp_path_factory.mktemp("llama-model"), LLAMA)
    vocab = load_tokenizer(folder / "tokenizer.json").get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=64 * ((vocab + 63) // 64),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok = load_tokenizer(folder / "tokenizer.json")  # the model's generation_config.json names its own stops
    stops = [tok.token_to_id(t) for t in LLAMA["generation_eos"]]
    begin = tok.token_to_id("<|begin_of_text|>")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": begin, "eos_token_id": stops}))
    return folder


def run_job(kind: str, source: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [
        *TINY,
        f"model.max_seq_len={SEQ}",
        f"data.seq_len={SEQ}",
        f"checkpoint.init_from={source}",
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "train.val_at_start=false",
        "train.log_every=1",
        *extra,
    ]
    cmd = [sys.executable, "-m", "training.main", str(REPO / "jobs" / f"{kind}.yaml"), *overrides]
    return subprocess.run(
        [*cmd, "--run-dir", str(run_dir)],
        cwd=run_dir.parent,
        env=env_for(run_dir.parent),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sft_dpo_grpo_and_eval_from_a_llama_folder_use_its_tokens_and_template(tmp_path, llama_folder):
    from training.evaluate.scoring import generation, prompt_ids
    from training.evaluate.tasks import load_task
    from training.run_folder import load_model

    ask = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    answer = {"role": "assistant", "content": "def add(a, b):\n    return a + b"}
    wrong = {"role": "assistant", "content": "def add(a, b):\n    return a - b"}
    sft = write_jsonl(
        tmp_path / "sft.jsonl", [{"messages": [*ask, answer]}, {"prompt": "Add.", "completion": "a + b"}] * 4
    )
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": ask, "chosen": [answer], "rejected": [wrong]},
            {"prompt": "Add.", "chosen": "a + b", "rejected": "a - b"},
        ]
        * 4,
    )
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": ask, "signature": "def add(a, b):"}, {"prompt": "Add.", "signature": "def add(a, b):"}] * 4,
    )

    result = run_job("sft", llama_folder, tmp_path / "sft", f"sft.train_file={sft}", f"sft.val_file={sft}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_tok = load_tokenizer(tmp_path / "sft" / "tokenizer.json")  # the run keeps the folder's token files
    assert special_tokens(run_tok) == special_tokens(load_tokenizer(llama_folder / "tokenizer.json"))
    eot, end_of_text = run_tok.token_to_id("<|eot_id|>"), run_tok.token_to_id("<|end_of_text|>")
    _, labels = encode_example(run_tok, {"messages": [*ask, answer]}, None)
    assert [t for t in labels if t != IGNORE][-1] == eot  # SFT learns to stop at <|eot_id|>, not at id 0

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [*ask, answer]}, {"messages": ask}] * 4)
    result = run_job("sft", llama_folder, tmp_path / "sft-bad", f"sft.train_file={bad}", f"sft.val_file={sft}")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{bad}:2 (sft.train_file): the conversation has no assistant turn" in result.stdout + result.stderr

    result = run_job("dpo", tmp_path / "sft", tmp_path / "dpo", f"dpo.train_file={pairs}", f"dpo.val_file={pairs}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    result = run_job(
        "grpo",
        tmp_path / "dpo",
        tmp_path / "grpo",
        f"grpo.train_file={prompts}",
        f"grpo.val_file={prompts}",
        "grpo.group_size=2",
        "grpo.max_new_tokens=8",
        "grpo.num_iterations=1",
        "grpo.reward=training.posttrain.rewards:python_parses",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    model, tok = load_model(tmp_path / "grpo")
    assert set(stop_ids(tok, chat=True)) == {eot, end_of_text, tok.token_to_id("<|eom_id|>")}
    task = load_task(REPO / "jobs" / "tasks" / "python_functions.yaml", max_examples=2)
    ids = prompt_ids(tok, task, task.docs[0], chat=True)
    begin = tok.token_to_id("<|begin_of_text|>")
    assert ids[0] == begin and ids.count(begin) == 1 and tok.token_to_id("<|start_header_id|>") in ids
    result = generation(model, tok, task, batch_size=2, chat=True)
    assert result["n"] == 2

    # The export ships the folder's own template and stop tokens: transformers asks as training did.
    from training.hf_export import export_hf

    out = export_hf(tmp_path / "grpo", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(out).apply_chat_template(
        ask, tokenize=True, add_generation_prompt=True
    )
    assert list(theirs["input_ids"] if isinstance(theirs, dict) else theirs) == encode_prompt(tok, ask)
    generation_config = json.loads((out / "generation_config.json").read_text())
    assert set(generation_config["eos_token_id"]) == set(stop_ids(tok, chat=True))
