"""The eval job on a tiny pretrained model: eval.json's numbers, checked against independent
computations (the pretraining's own validation, a plain per-choice forward, lm-evaluation-harness),
the report, and `orch generate` / `orch chat`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, env_for, tiny_overrides

THREE_QUESTIONS = [
    {
        "context": "import os\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n    return",
        "choices": ["0", "banana split", "))))"],
        "label": 0,
    },
    {"context": "def check(x):\n    if x is", "choices": ["None:", "import", "def def"], "label": 0},
    {
        "context": "class Foo(object):\n    def __init__(self):\n        self.value =",
        "choices": ["0", "class", "return return"],
        "label": 0,
    },
]


def _run(args, tmp, **kw):
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env_for(tmp), capture_output=True, text=True, timeout=300, **kw
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def pretrain_run(workdir, tiny_data) -> Path:
    run_dir = workdir / "pretrain"
    r = _run(
        [
            "-m",
            "training.main",
            "jobs/pretrain.yaml",
            *tiny_overrides(tiny_data, "train.max_steps=20"),
            "--run-dir",
            str(run_dir),
        ],
        workdir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def hf_export(pretrain_run, workdir) -> Path:
    from training.hf_export import export_hf

    return export_hf(pretrain_run, workdir / "hf")


@pytest.fixture(scope="module")
def three_questions(workdir) -> Path:
    data = workdir / "three.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in THREE_QUESTIONS))
    task = workdir / "three.yaml"
    task.write_text(f"""task: three_questions
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return task


@pytest.fixture(scope="module")
def eval_run(workdir, tiny_data, pretrain_run, hf_export, three_questions) -> Path:
    run_dir = workdir / "eval"
    tasks = f"[{three_questions},jobs/tasks/stdlib_continuation.yaml,jobs/tasks/python_functions.yaml]"
    r = _run(
        [
            "-m",
            "training.main",
            "jobs/eval.yaml",
            f"data.dir={tiny_data}",
            "train.micro_batch_size=8",
            "train.val_batches=4",
            "train.device=cpu",
            f"eval.tasks={tasks}",
            "eval.max_examples=20",
            f"eval.compare=[pretrain={pretrain_run},exported={hf_export}]",
            "--run-dir",
            str(run_dir),
        ],
        workdir,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_eval_json_has_every_metric(eval_run, pretrain_run):
    results = json.loads((eval_run / "eval.json").read_text())
    assert list(results["stages"]) == ["pretrain", "exported"]
    pre = results["stages"]["pretrain"]["metrics"]
    for key in (
        "val/perplexity",
        "val/bpb",
        "three_questions/acc",
        "three_questions/acc_norm",
        "stdlib_continuation/acc",
        "stdlib_continuation/acc_norm",
        "python_functions/parses",
        "python_functions/passes",
    ):
        assert 0 <= pre[key] < math.inf, key
    assert pre["stdlib_continuation/n"] == 20 and pre["three_questions/n"] == 3 and pre["python_functions/n"] == 12
    # generation tasks carry the collapse numbers (python_functions' records have reference bodies)
    assert 0 < pre["python_functions/distinct_frac"] <= 1 and pre["python_functions/len_ratio"] > 0
    assert "three_questions/distinct_frac" not in pre, "multiple choice generates nothing"
    assert pre["val/perplexity"] == pytest.approx(math.exp(pre["val/loss"]))
    # The same 4 batches of 8 as the pretraining's last validation: the same bits per byte.
    last_val = [
        json.loads(line) for line in (pretrain_run / "metrics.jsonl").read_text().splitlines() if "val_bpb" in line
    ][-1]
    assert pre["val/bpb"] == pytest.approx(last_val["val_bpb"], rel=1e-6)
    assert pre["val/loss"] == pytest.approx(last_val["val_loss"], rel=1e-6)
    # A 20-step model is far from the data (the tokenizer's bytes would give 8 bpb, xz ~1.6).
    assert 2.0 < pre["val/bpb"] < 8.0
    # The Hugging Face export is the same model: the same numbers.
    exported = results["stages"]["exported"]["metrics"]
    for key, value in pre.items():
        assert exported[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_acc_matches_an_independent_computation(eval_run, pretrain_run):
    from training.run_folder import load_model

    model, tok = load_model(pretrain_run)
    right = right_norm = 0
    lls_all = []
    for q in THREE_QUESTIONS:
        ctx = tok.encode(q["context"]).ids
        lls = []
        for choice in q["choices"]:
            ids = tok.encode(q["context"] + " " + choice).ids  # the harness' default target_delimiter
            assert ids[: len(ctx)] == ctx
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([ids[:-1]])).double(), dim=-1)[0]
            lls.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
        lls_all.append(lls)
        right += max(range(3), key=lambda k: lls[k]) == q["label"]
        right_norm += max(range(3), key=lambda k: lls[k] / len(q["choices"][k])) == q["label"]  # per character
    stage = json.loads((eval_run / "eval.json").read_text())["stages"]["pretrain"]
    assert stage["metrics"]["three_questions/acc"] == right / 3
    assert stage["metrics"]["three_questions/acc_norm"] == right_norm / 3
    for ours, theirs in zip(stage["loglikelihoods"]["three_questions"], lls_all):
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_report_names_every_stage_with_its_plots(eval_run):
    report = (eval_run / "report.md").read_text()
    for stage in ("pretrain", "exported"):
        assert f"| {stage} |" in report
    for name in ("val/bpb", "three_questions/acc_norm", "python_functions/parses"):
        assert f"| {name} |" in report
    for png in ("metrics.png", "curves.png"):
        path = eval_run / "report" / png
        assert f"(report/{png})" in report
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert "No training curves for exported" in report  # a Hugging Face folder has no metrics.jsonl


def test_bad_task_file_is_a_user_error(workdir, tiny_data, pretrain_run):
    bad = workdir / "bad.yaml"
    bad.write_text("task: bad\ndataset_path: json\noutput_type: multiple_choise\n")
    run_dir = workdir / "eval-bad"
    r = _run(
        [
            "-m",
            "training.main",
            "jobs/eval.yaml",
            f"data.dir={tiny_data}",
            "train.device=cpu",
            f"eval.source={pretrain_run}",
            f"eval.tasks=[{bad}]",
            "--run-dir",
            str(run_dir),
        ],
        workdir,
    )
    assert r.returncode == 2
    assert str(bad) in r.stderr and "output_type" in r.stderr and "multiple_choise" in r.stderr
    assert not (run_dir / "eval.json").exists()


def test_orch_generate_streams_greedy_text_and_stops_at_the_stop_string(workdir, pretrain_run):
    from model.generate import generate
    from training.run_folder import load_model

    model, tok = load_model(pretrain_run)
    prompt = "def main(argv):\n    "
    full = tok.decode(generate(model, [tok.encode(prompt).ids], 30, temperature=0, stop_tokens=[0])[0])
    # The latest place where a 2-character string first appears (a 20-step model may repeat one character).
    at = max(i for i in range(len(full) - 1) if full.find(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    r = _run(
        [
            "-m",
            "orchestrator.cli",
            "generate",
            str(pretrain_run),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "30",
            "--temperature",
            "0",
            "--stop",
            stop,
        ],
        workdir,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + full[:at] + "\n"
    assert "stopped by stop_string" in r.stderr
    # Chat: two turns in the chat template, then an empty line ends it.
    r = _run(
        ["-m", "orchestrator.cli", "chat", str(pretrain_run), "--max-new-tokens", "8", "--seed", "0"],
        workdir,
        input="hello\nwrite a function\n\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 2


def _lm_eval_python():
    """An interpreter with lm_eval: $ORCH_LM_EVAL_PYTHON, the .venv/lmeval overlay (docs/eval.md), or this one."""
    for candidate in (os.environ.get("ORCH_LM_EVAL_PYTHON"), str(REPO / ".venv" / "lmeval" / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            return candidate
    return sys.executable if importlib.util.find_spec("lm_eval") else None


@pytest.mark.skipif(_lm_eval_python() is None, reason="lm_eval is not installed (see docs/eval.md)")
def test_multiple_choice_scores_as_lm_evaluation_harness(workdir, eval_run, hf_export):
    out = workdir / "lm_eval"
    env = dict(
        env_for(workdir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(workdir / "hf_home"),
        HF_DATASETS_CACHE=str(workdir / "hf_datasets"),
    )
    r = subprocess.run(
        [
            _lm_eval_python(),
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={hf_export},dtype=float32",
            "--tasks",
            "stdlib_continuation",
            "--include_path",
            "jobs/tasks",
            "--device",
            "cpu",
            "--batch_size",
            "8",
            "--limit",
            "20",
            "--output_path",
            str(out),
            "--log_samples",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["stdlib_continuation"]
    samples = [
        json.loads(line) for line in next(out.rglob("samples_stdlib_continuation_*.jsonl")).read_text().splitlines()
    ]
    assert len(samples) == 20
    results = json.loads((eval_run / "eval.json").read_text())
    for stage in ("pretrain", "exported"):  # our job on the run's checkpoint and on the same export
        ours = results["stages"][stage]
        assert ours["metrics"]["stdlib_continuation/acc"] == pytest.approx(theirs["acc,none"], abs=1e-3)
        assert ours["metrics"]["stdlib_continuation/acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-3)
        for s in samples:
            lls = [float(resp[0]) for resp in s["filtered_resps"]]
            assert ours["loglikelihoods"]["stdlib_continuation"][s["doc_id"]] == pytest.approx(lls, abs=1e-3)


def test_a_chat_model_is_asked_in_its_chat_format_with_the_reply_begun_by_the_prompt(pretrain_run, tmp_path):
    """Generation tasks ask a post-trained model what SFT taught it to answer (metadata.chat_prompt), its
    reply begun with the code to continue; a pretrained model gets the bare code, as before."""
    from omegaconf import OmegaConf

    from training.run_folder import is_chat_model, load_model
    from training.evaluate.scoring import generation, prompt_ids
    from training.evaluate.tasks import load_task
    from training.posttrain.chat import encode_prompt

    model, tokenizer = load_model(pretrain_run)
    task = load_task(REPO / "jobs" / "tasks" / "python_functions.yaml", max_examples=2)
    doc = task.docs[0]
    assert doc["instruction"].startswith("Write the Python function `def add(a, b):`")
    code = tokenizer.encode(doc["prompt"]).ids
    assert prompt_ids(tokenizer, task, doc, chat=False) == code
    assert prompt_ids(tokenizer, task, doc, chat=True) == encode_prompt(tokenizer, doc["instruction"]) + code

    assert not is_chat_model(pretrain_run)
    sft_like = tmp_path / "sft"  # the same weights, recorded as a chat-trained kind
    sft_like.mkdir()
    (sft_like / "checkpoints").symlink_to(pretrain_run / "checkpoints")
    cfg = OmegaConf.load(pretrain_run / "config.yaml")
    cfg.kind = "sft"
    OmegaConf.save(cfg, sft_like / "config.yaml")
    assert is_chat_model(sft_like)
    result = generation(model, tokenizer, task, batch_size=2, chat=True)
    assert result["n"] == 2 and 0.0 <= result["parses"] <= 1.0


def test_len_ratio_compares_completions_with_the_reference_cut_to_the_generation_budget(pretrain_run):
    """A completion holds at most max_gen_toks tokens: its length is compared with as much of the reference,
    cut at the same stop strings. Against whole references (up to 3,320 characters for stdlib_bodies, 128
    tokens a completion) the reference itself would have read 0.50 and been called a collapse."""
    import dataclasses

    from training.evaluate.scoring import cut_at_stop, generation
    from training.evaluate.tasks import load_task
    from training.run_folder import load_model

    model, tokenizer = load_model(pretrain_run)
    task = load_task(REPO / "jobs" / "tasks" / "python_functions.yaml", max_examples=2)
    long_body = "\n".join(f"    total_{i} = compute(value, {i}) + offset" for i in range(60))
    task = dataclasses.replace(task, max_gen_toks=6, docs=[{**doc, "reference": long_body} for doc in task.docs])
    result = generation(model, tokenizer, task, batch_size=2)
    written = sum(len(s["completion"]) for s in result["samples"])
    assert written > 0, "the model wrote nothing: the ratio would not tell the references apart"
    reachable = cut_at_stop(tokenizer.decode(tokenizer.encode(long_body).ids[:6]), task.until)
    assert 0 < len(reachable) < len(long_body) / 20
    assert result["len_ratio"] == pytest.approx(written / (2 * len(reachable)))
