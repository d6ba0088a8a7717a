"""TRL's options: DPO's loss types against hand-worked values (and TRL's formulas), reference_free, RPO's NLL
term, the reference's log-probs precomputed into the run folder; GRPO's weighted rewards (TRL's batched reward
functions too) and kl_coef 0 without a reference; bad reward names and weights refused at submit."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobspec.checks import SpecError
from jobspec.loading import load_spec
from tests.conftest import REPO, env_for, posttrain_command
from training.posttrain.losses import IGNORE, chosen_nll, dpo_loss
from training.posttrain.rewards import is_batched, python_parses, score_batch

# ---------------------------------------------------------------- DPO's losses

# One pair: policy chosen -1, rejected -4; reference -3 and -3; beta 0.5. h = (-1 + 3) - (-4 + 3) = 3, beta h = 1.5.
PAIR = [torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-3.0])]
SOFTPLUS_M15 = math.log(1 + math.exp(-1.5))  # -log sigmoid(1.5) = 0.2014133
SOFTPLUS_15 = math.log(1 + math.exp(1.5))  # -log sigmoid(-1.5) = 1.7014133


@pytest.mark.parametrize(
    "loss_type, smoothing, beta, expected",
    [
        ("sigmoid", 0.0, 0.5, 0.2014133),  # log(1 + e^-1.5)
        ("sigmoid", 0.1, 0.5, 0.9 * 0.2014133 + 0.1 * 1.7014133),  # conservative DPO: 0.3514133
        ("robust", 0.1, 0.5, (0.9 * 0.2014133 - 0.1 * 1.7014133) / 0.8),  # 0.0139130
        ("robust", 0.0, 0.5, 0.2014133),  # without smoothing, robust is DPO
        ("hinge", 0.0, 0.5, 0.0),  # max(0, 1 - 1.5)
        ("hinge", 0.0, 0.2, 0.4),  # max(0, 1 - 0.6)
        ("ipo", 0.0, 0.5, 4.0),  # (3 - 1 / (2 * 0.5))^2
        ("ipo", 0.0, 0.25, 1.0),  # (3 - 2)^2
    ],
)
def test_dpo_loss_types_against_hand_worked_values(loss_type, smoothing, beta, expected):
    loss, m = dpo_loss(*PAIR, beta, loss_type=loss_type, label_smoothing=smoothing)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # the implicit rewards do not depend on the loss type
    assert m["rewards/chosen"].item() == pytest.approx(beta * 2) and m["rewards/rejected"].item() == pytest.approx(
        -beta
    )
    assert m["rewards/accuracies"].item() == 1.0


def trl_losses(logits: torch.Tensor, beta: float, loss_type: str, e: float) -> torch.Tensor:
    """TRL's dpo_trainer formulas as they are written there, for comparison over random log-ratios."""
    logsig = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        return -logsig(beta * logits) * (1 - e) - logsig(-beta * logits) * e
    if loss_type == "robust":
        return (-logsig(beta * logits) * (1 - e) + logsig(-beta * logits) * e) / (1 - 2 * e)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_dpo_loss_types_match_trls_formulas(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g) * 3 for _ in range(4))
    e = 0.0 if loss_type in ("hinge", "ipo") else 0.2
    loss, _ = dpo_loss(pc, pr, rc, rr, 0.3, loss_type=loss_type, label_smoothing=e)
    assert loss.item() == pytest.approx(trl_losses((pc - rc) - (pr - rr), 0.3, loss_type, e).mean().item(), rel=1e-6)


def test_reference_free_is_a_zero_reference_and_bad_options_are_refused():
    zero = torch.zeros(1)
    loss, m = dpo_loss(PAIR[0], PAIR[1], zero, zero, 0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))), abs=1e-6), "h = -1 - -4 = 3"
    assert m["rewards/chosen"].item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="dpo.loss_type"):
        dpo_loss(*PAIR, 0.5, loss_type="kto")
    with pytest.raises(ValueError, match="dpo.label_smoothing"):
        dpo_loss(*PAIR, 0.5, label_smoothing=0.5)


def test_rpo_nll_is_the_chosen_tokens_mean_cross_entropy():
    # vocabulary of 2, uniform logits: every labelled token costs log 2; one with logits (0, ln 3): p = 3/4
    logits = torch.zeros(1, 3, 2)
    logits[0, 2, 1] = math.log(3)
    labels = torch.tensor([[0, IGNORE, 1]])
    assert chosen_nll(logits, labels).item() == pytest.approx((math.log(2) - math.log(3 / 4)) / 2)
    assert chosen_nll(logits, torch.tensor([[0, IGNORE, IGNORE]])).item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------- GRPO's rewards, called once per batch

CALLS = []


def trl_style_length(prompts, completions, **columns):
    """A reward function in TRL's form: the whole batch at once, the records' other keys as columns."""
    CALLS.append((list(prompts), list(completions), sorted(columns)))
    return [len(c) / 10 for c in completions]


def test_a_trl_reward_is_called_once_per_batch_and_ours_per_completion():
    records = [{"prompt": "p1", "signature": "def f(x):", "truncated": False}] * 2
    CALLS.clear()
    assert is_batched(trl_style_length) and not is_batched(python_parses)
    assert score_batch(trl_style_length, ["abc", "abcdefghij"], records) == [0.3, 1.0]
    assert CALLS == [(["p1", "p1"], ["abc", "abcdefghij"], ["signature", "truncated"])], "one call for the batch"
    assert score_batch(python_parses, ["def f(x):\n    return x\n", "nope("], records) == [1.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        score_batch(lambda prompts, completions, **k: [1.0], ["a", "b"], records)


# ---------------------------------------------------------------- refused at submit


def write_job(tmp_path: Path, body: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(body)
    return str(path)


GRPO_JOB = "kind: grpo\ncheckpoint:\n  init_from: runs/sft\ngrpo:\n  rewards:\n"


@pytest.mark.parametrize(
    "rewards, key, words",
    [
        (
            "    - {fn: demo_body_rewrd}\n",
            "grpo.rewards[0].fn",
            "defines no 'demo_body_rewrd' (did you mean 'demo_body_reward'?)",
        ),
        (
            "    - {fn: python_parses}\n    - {fn: 'no_such_module:f'}\n",
            "grpo.rewards[1].fn",
            "no Python module 'no_such_module'",
        ),
        (
            "    - {fn: python_parses, weight: 1}\n    - {fn: demo_body_reward, weight: -1}\n",
            "grpo.rewards",
            "sum to 0",
        ),
    ],
)
def test_bad_rewards_are_refused_at_submit_naming_the_key(tmp_path, rewards, key, words):
    path = write_job(tmp_path, GRPO_JOB + rewards)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert f"{path}, line 5: key '{key}'" in str(e.value) and words in str(e.value)
    assert e.value.exit_code == 2
    # the real command: exit 2, the same sentence, nothing registered
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "orch"), "submit", path],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


def test_dpo_options_are_checked(tmp_path):
    path = write_job(tmp_path, "kind: dpo\ncheckpoint:\n  init_from: runs/sft\ndpo:\n  loss_type: kto\n")
    with pytest.raises(SpecError, match="key 'dpo.loss_type' has the value 'kto', but it must be one of sigmoid"):
        load_spec(path)
    with pytest.raises(SpecError, match="dpo.loss_type hinge has no label smoothing"):
        load_spec(path, ["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"])
    with pytest.raises(SpecError, match="'dpo.label_smoothing' has the value 0.5, but at 0.5 a label says nothing"):
        load_spec(path, ["dpo.loss_type=robust", "dpo.label_smoothing=0.5"])
    cfg = load_spec(path, ["dpo.loss_type=robust", "dpo.label_smoothing=0.1", "dpo.rpo_alpha=1.0"])
    assert (cfg.dpo.loss_type, cfg.dpo.label_smoothing, cfg.dpo.rpo_alpha) == ("robust", 0.1, 1.0)


# ---------------------------------------------------------------- end to end, from the session's tiny pretrain


@pytest.fixture(scope="module")
def source(posttrain_source, tmp_path_factory) -> dict:
    return dict(posttrain_source, root=tmp_path_factory.mktemp("trl"))


def run(kind: str, source: dict, run_dir: Path, *extra: str) -> str:
    result = subprocess.run(
        posttrain_command(kind, source, run_dir, *extra),
        cwd=source["root"],
        env=env_for(source["root"]),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def train_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


@pytest.mark.slow
def test_precomputed_reference_logprobs_train_as_the_live_reference_does(source):
    """3 steps of robust DPO with RPO's NLL term, the reference live and precomputed: the same losses; the
    precomputed run holds its table in the run folder (one value per pair, train and val) and reads it again."""
    common = [
        "train.max_steps=3",
        "dpo.val_max=8",
        "dpo.loss_type=robust",
        "dpo.label_smoothing=0.1",
        "dpo.rpo_alpha=0.5",
    ]
    live, pre = source["root"] / "dpo-live", source["root"] / "dpo-pre"
    run("dpo", source, live, *common)
    output = run("dpo", source, pre, *common, "dpo.precompute_ref_log_probs=true")
    assert "precomputed into" in output
    from safetensors import safe_open

    with safe_open(str(pre / "ref_logprobs.safetensors"), "pt") as f:
        keys = json.loads(f.metadata()["keys"])
        assert f.get_tensor("chosen").shape == f.get_tensor("rejected").shape == (len(keys),)
    n_pairs = sum(1 for _ in open(source["pref_train"])) + 8
    assert len(set(keys)) == n_pairs
    a, b = train_records(live), train_records(pre)
    assert [r["step"] for r in b] == [1, 2, 3] and "nll_loss" in b[0]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5), (x, y)
        assert y["rewards/margins"] == pytest.approx(x["rewards/margins"], rel=1e-3, abs=1e-5)


@pytest.mark.slow
def test_grpo_with_weighted_rewards_and_no_kl_builds_no_reference(source):
    """kl_coef 0: no reference is built (the trainer holds one model) and no KL is logged; two rewards with
    weights, each logged, their weighted sum the reward; prompts need only "prompt" (the file's other keys are
    the rewards' business)."""
    grpo = source["root"] / "grpo-rewards"
    rewards = "grpo.rewards=[{fn: python_parses, weight: 0.25}, {fn: 'tests.test_grpo:letter_share', weight: 2}]"
    output = run(
        "grpo",
        source,
        grpo,
        "train.max_steps=2",
        "train.micro_batch_size=2",
        "grpo.max_new_tokens=16",
        "grpo.val_prompts=2",
        "grpo.kl_coef=0",
        "grpo.stop_on_collapse=false",
        rewards,
    )
    train = train_records(grpo)
    assert "kl" not in train[0] and "rewards/python_parses" in train[0]
    for r in train:
        weighted = 0.25 * r["rewards/python_parses"] + 2 * r["rewards/tests.test_grpo:letter_share"]
        assert r["reward_mean"] == pytest.approx(weighted, abs=1e-5)
    assert "grpo.kl_coef is 0: no reference model is built" in output


# ---------------------------------------------------------------- LoRA: rsLoRA and DoRA


def tiny_dora(**kw):
    from model.config import GPTConfig
    from model.gpt import GPT
    from model.lora import apply_lora, init_lora_weights

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16))
    model.init_weights(seed=0)
    apply_lora(model, rank=4, alpha=8, target_modules=["wq", "w2"], **kw)
    init_lora_weights(model, seed=1)
    return model


def test_rslora_scales_by_the_square_root_of_the_rank_and_dora_starts_as_the_base():
    from model.lora import adapters_disabled, lora_modules, merge_adapters, unmerge_adapters

    assert {m.scaling for m in lora_modules(tiny_dora(use_rslora=True))} == {8 / 2}, "alpha / sqrt(4)"
    assert {m.scaling for m in lora_modules(tiny_dora())} == {8 / 4}
    model = tiny_dora(use_dora=True, use_rslora=True)
    assert "layers.0.attention.wq.lora_magnitude" in model.checkpoint_keys
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with adapters_disabled(model):
            base = model(tokens)
        assert torch.allclose(model(tokens), base, atol=1e-6), "B = 0, magnitude 1: the base"
        for m in lora_modules(model):  # a trained state: B and the magnitudes moved
            m.lora_B.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
            m.lora_magnitude.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
        tuned = model(tokens)
        weights = {n: p.clone() for n, p in model.named_parameters()}
        merge_adapters(model)
        assert torch.allclose(model(tokens), tuned, atol=1e-5), "DoRA merged gives the adapter's logits"
        unmerge_adapters(model)
        assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert (tuned - base).abs().max() > 1e-3


@pytest.mark.slow
def test_rslora_dora_export_is_read_by_peft_with_our_logits(source, tmp_path):
    """3 SFT steps with use_rslora and use_dora, exported: PEFT's LlamaForCausalLM + adapter gives the logits
    of our merged model, and so does the --merge export."""
    import peft
    from transformers import LlamaForCausalLM

    from model.config import GPTConfig
    from model.gpt import GPT
    from tests.test_lora import LORA
    from training.run_folder import read_checkpoint_model

    run_dir = tmp_path / "dora-sft"
    extra = ["train.max_steps=3", "sft.val_max=4", "optim.lr=3e-2", "train.val_at_start=false"]
    run("sft", source, run_dir, *LORA, "lora.use_rslora=true", "lora.use_dora=true", *extra)
    for target, merge in ((tmp_path / "hf", []), (tmp_path / "hf-merged", ["--merge"])):
        cmd = [sys.executable, "-m", "orchestrator.cli", "export", str(run_dir), "--hf", str(target), *merge]
        result = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["use_dora"] is True
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    magnitudes = [v for k, v in read_checkpoint_model(step, merge_lora=False).items() if k.endswith("lora_magnitude")]
    assert magnitudes and any((m - 1).abs().max() > 1e-4 for m in magnitudes), "the magnitudes trained"
    ours = GPT(GPTConfig(**json.loads((tmp_path / "hf" / "orch_export.json").read_text())["model"]))
    ours.init_weights(seed=0)
    ours.load_state_dict(read_checkpoint_model(step), strict=False)
    tokens = torch.randint(4, ours.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours.eval()(tokens)
        base = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
        plain = base(tokens).logits
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "hf" / "adapter").eval()(tokens).logits
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "hf-merged").eval()(tokens).logits
    assert (plain - mine).abs().max() > 1e-3, "the adapters changed the model"
    assert (theirs - mine).abs().max().item() <= 1e-4
    assert (merged - mine).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- TRL's names


def test_trls_names_are_read_as_ours_with_a_note(tmp_path, capfd):
    body = "kind: grpo\ncheckpoint:\n  init_from: runs/sft\ngrpo:\n  num_generations: 8\n  beta: 0.0\n"
    body += "lora:\n  enabled: true\n  r: 8\n  lora_alpha: 16\n"
    path = write_job(tmp_path, body)
    cfg = load_spec(path, ["grpo.max_completion_length=96", "grpo.epsilon=0.3"])
    g = cfg.grpo
    assert (g.group_size, g.kl_coef, g.max_new_tokens, g.clip_eps) == (8, 0.0, 96, 0.3)
    assert (cfg.lora.rank, cfg.lora.alpha) == (8, 16.0)
    err = capfd.readouterr().err
    assert "note: grpo.num_generations is TRL's name for grpo.group_size; read as grpo.group_size" in err
    assert "note: lora.lora_alpha is TRL's name for lora.alpha" in err and "grpo.epsilon is TRL's name" in err
    # an error about an aliased key points at its line
    with pytest.raises(SpecError, match=r"line 5: key 'grpo.group_size' has the value 1"):
        load_spec(write_job(tmp_path, body.replace("num_generations: 8", "num_generations: 1")))
    with pytest.raises(SpecError, match="'grpo.beta' \\(TRL's name for 'grpo.kl_coef'\\) and 'grpo.kl_coef' are both"):
        load_spec(write_job(tmp_path, body.replace("  beta: 0.0\n", "  beta: 0.0\n  kl_coef: 0.1\n")))


# ---------------------------------------------------------------- sequence classifiers for transformers


def our_model(run_dir: Path, out: Path, model_class, **kw):
    """Our model of the run's last checkpoint, in the exported folder's shape."""
    from model.config import GPTConfig
    from training.run_folder import read_checkpoint_model

    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    model = model_class(GPTConfig(**json.loads((out / "orch_export.json").read_text())["model"]), **kw)
    model.init_weights(seed=0)
    model.load_state_dict(read_checkpoint_model(step), strict=False)
    return model.eval()


def export(run_dir: Path, out: Path, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "orchestrator.cli", "export", str(run_dir), "--hf", str(out)]
    result = subprocess.run(cmd, cwd=cwd, env=env_for(cwd), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_reward_model_exports_as_a_one_label_sequence_classifier(source, tmp_path):
    """transformers' LlamaForSequenceClassification reads the exported reward model: one label, and the
    scores of our RewardModel on the pairs as training encodes them (chosen and rejected, right-padded)."""
    from transformers import LlamaForSequenceClassification

    from model.reward import RewardModel

    rm = source["root"] / "rm"
    run("rm", source, rm, "train.max_steps=3", "rm.val_max=4", "train.val_at_start=false", "optim.lr=3e-2")
    out = tmp_path / "rm-hf"
    export(rm, out, tmp_path)
    hf = LlamaForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1 and hf.config.architectures == ["LlamaForSequenceClassification"]
    ours = our_model(rm, out, RewardModel)
    from training.data.tokenizer import load_tokenizer
    from training.posttrain.chat import encode_examples

    records = [json.loads(line) for line in Path(source["pref_val"]).read_text().splitlines()[:3]]
    examples = [{"prompt": r["prompt"], "completion": r[side]} for side in ("chosen", "rejected") for r in records]
    rows = [ids for ids, _ in encode_examples(load_tokenizer(str(out / "tokenizer.json")), examples, 128)]
    pad = json.loads((out / "config.json").read_text())["pad_token_id"]
    batch = {
        "tokens": torch.full((len(rows), max(map(len, rows))), pad),
        "last": torch.tensor([len(r) - 1 for r in rows]),
    }
    for i, r in enumerate(rows):
        batch["tokens"][i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        mine = ours(batch["tokens"], batch["last"])
        mask = torch.arange(batch["tokens"].shape[1]) <= batch["last"].unsqueeze(1)
        theirs = hf(input_ids=batch["tokens"], attention_mask=mask.long()).logits.squeeze(-1)
    assert mine.abs().max() > 1e-4, "the head trained"
    assert (theirs - mine).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_an_exported_classifier_appends_the_end_of_sequence_token_as_training_did(posttrain_source, tmp_path):
    """transformers' pipeline, on plain text, gives the probabilities our classifier gives on the text's ids and
    the end-of-sequence token training appended: the exported tokenizer appends it itself."""
    from transformers import pipeline

    from model.classifier import GPTClassifier
    from tests.test_classify import classify
    from training.classify.data import write_demo
    from training.data.tokenizer import load_tokenizer

    train, val = write_demo(tmp_path / "data", posttrain_source["tokenizer"], 128, max_docs=200)
    src = {"run": posttrain_source["run"], "root": tmp_path, "train": train, "val": val}
    run_dir = tmp_path / "classify"
    result = classify(src, run_dir, "train.max_steps=3", "classify.baselines=false", "optim.lr=3e-2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "classify-hf"
    export(run_dir, out, tmp_path)
    texts = [json.loads(line)["text"] for line in Path(val).read_text().splitlines()[:3]]
    scored = pipeline("text-classification", model=str(out), top_k=None)(texts)
    ours = our_model(run_dir, out, GPTClassifier, num_labels=2)
    tok = load_tokenizer(str(out / "tokenizer.json"))
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    for text, theirs in zip(texts, scored):
        ids = tok.encode(text, add_special_tokens=False).ids + [eos]
        with torch.no_grad():
            probs = ours(torch.tensor([ids]), torch.tensor([len(ids) - 1])).softmax(-1)[0]
        by_label = {d["label"]: d["score"] for d in theirs}
        labels = json.loads((run_dir / "labels.json").read_text())
        assert [by_label[label] for label in labels] == pytest.approx(probs.tolist(), abs=1e-4)
