"""Task files in lm-evaluation-harness's YAML layout, over local jsonl, so the same file runs under both:

    task: stdlib_continuation
    dataset_path: json                      # the only dataset kind read here: local jsonl files
    dataset_kwargs: {data_files: {test: jobs/tasks/data/stdlib_continuation.jsonl}}
    test_split: test
    output_type: multiple_choice            # or generate_until
    doc_to_text: "{{context}}"              # Jinja2 over one jsonl record, as in the harness
    doc_to_choice: "{{choices}}"            # multiple_choice: a list of strings
    doc_to_target: "{{label}}"              # multiple_choice: the index of the right choice
    target_delimiter: ""                    # put between context and choice (the harness' default is " ")
    generation_kwargs: {until: ["\\ndef"], max_gen_toks: 96}   # generate_until
    metric_list: [{metric: acc}, {metric: acc_norm}]           # or parses / passes for generate_until
    metadata: {chat_prompt: "{{instruction}}"}                 # generate_until, ours: see below

A chat model (a post-trained run: sft, dpo, grpo, or a Hugging Face folder with a chat template) was
taught to answer a user's message, not to continue raw code. For a generate_until task with
metadata.chat_prompt, it gets that message (Jinja2 over the record) in its chat format, with its reply
begun by doc_to_text (the code to continue): the same continuation, asked the way the model was trained.
The harness ignores metadata, so the file still runs there.

Relative data_files are looked up next to the YAML file, then from the current folder (where the
harness looks), then from the repository root.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class EvalError(ValueError):
    """A task file or eval setting we can't use; the message names the file, key and value."""


REPO = Path(__file__).resolve().parents[2]
OUTPUT_TYPES = ("multiple_choice", "generate_until")
METRICS = {"multiple_choice": ("acc", "acc_norm"), "generate_until": ("parses", "passes")}
KNOWN_KEYS = {
    "task",
    "dataset_path",
    "dataset_kwargs",
    "test_split",
    "output_type",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
    "target_delimiter",
    "generation_kwargs",
    "metric_list",
    "description",
    "tag",
    "metadata",
    "num_fewshot",
    "should_decontaminate",
}


@dataclass
class Task:
    name: str
    path: Path  # the YAML file
    output_type: str
    docs: list[dict]
    doc_to_text: str
    doc_to_choice: Optional[str] = None
    doc_to_target: Optional[str] = None
    target_delimiter: str = " "
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = 128
    metrics: tuple[str, ...] = ()
    chat_prompt: Optional[str] = None  # metadata.chat_prompt: the user message a chat model gets

    def chat_message(self, doc: dict) -> Optional[str]:
        return None if self.chat_prompt is None else _render(self.chat_prompt, doc, self.path, "metadata.chat_prompt")

    def text(self, doc: dict) -> str:
        return _render(self.doc_to_text, doc, self.path, "doc_to_text")

    def choices(self, doc: dict) -> list[str]:
        value = _render(self.doc_to_choice, doc, self.path, "doc_to_choice")
        if isinstance(value, str):  # "{{choices}}" renders a list as its repr, as in the harness
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                value = None
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise EvalError(
                f"{self.path}: key 'doc_to_choice' ({self.doc_to_choice!r}) gives {value!r} for a "
                "record, but it must give a non-empty list of strings"
            )
        return value

    def target(self, doc: dict) -> int:
        value = _render(self.doc_to_target, doc, self.path, "doc_to_target")
        try:
            index = int(value)
        except (TypeError, ValueError):
            choices = self.choices(doc)
            if value not in choices:
                raise EvalError(
                    f"{self.path}: key 'doc_to_target' ({self.doc_to_target!r}) gives {value!r}, "
                    "neither an index nor one of the choices"
                ) from None
            index = choices.index(value)
        return index


def _render(template: Any, doc: dict, path: Path, key: str):
    """A Jinja2 template over one record; a bare field name is that field (both as in the harness)."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    if isinstance(template, int):
        return template
    if not isinstance(template, str):
        raise EvalError(
            f"{path}: key '{key}' has the value {template!r}, but it must be a Jinja2 template "
            "such as '{{question}}' or a field name"
        )
    if template in doc:
        return doc[template]
    try:
        # task files come from anywhere: their templates may read the record, not reach into Python
        return (
            SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
            .from_string(template)
            .render(**doc)
        )
    except jinja2.TemplateError as e:
        raise EvalError(
            f"{path}: key '{key}' has the value {template!r}, which fails on a record with fields {sorted(doc)}: {e}"
        ) from None


def _data_file(raw: dict, path: Path) -> Path:
    kwargs = raw.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    split = raw.get("test_split", "test")
    if isinstance(files, dict):
        files = files.get(split)
    if isinstance(files, list) and len(files) == 1:
        files = files[0]
    if not isinstance(files, str):
        raise EvalError(
            f"{path}: key 'dataset_kwargs.data_files' has the value {kwargs.get('data_files')!r}, "
            f"but it must name one local .jsonl file for the split '{split}'"
        )
    for base in (path.parent, Path.cwd(), REPO):
        if (base / files).is_file():
            return base / files
    raise EvalError(
        f"{path}: key 'dataset_kwargs.data_files' names {files!r}, which is not a file next to the "
        "YAML, in the current folder or in the repository"
    )


def load_task(path: str | Path, max_examples: Optional[int] = None) -> Task:
    """Read and check one task YAML and its jsonl records (the first max_examples of them)."""
    path = Path(path)
    if not path.is_file():
        found = next((base / path for base in (Path.cwd(), REPO) if (base / path).is_file()), None)
        if found is None:
            raise EvalError(f"key 'eval.tasks' names {str(path)!r}, but no such task file exists")
        path = found
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EvalError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise EvalError(f"{path}: a task file must be a mapping of keys to values")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise EvalError(
            f"{path}: unknown key '{unknown[0]}' (value {raw[unknown[0]]!r}); known keys: "
            f"{', '.join(sorted(KNOWN_KEYS))}"
        )
    output_type = raw.get("output_type")
    if output_type not in OUTPUT_TYPES:
        raise EvalError(
            f"{path}: key 'output_type' has the value {output_type!r}, but it must be one of {', '.join(OUTPUT_TYPES)}"
        )
    if raw.get("dataset_path") != "json":
        raise EvalError(
            f"{path}: key 'dataset_path' has the value {raw.get('dataset_path')!r}, but only local "
            "jsonl data is read here: write 'json' and name the file in dataset_kwargs.data_files"
        )
    if raw.get("num_fewshot"):
        raise EvalError(
            f"{path}: key 'num_fewshot' has the value {raw['num_fewshot']!r}; few-shot prompts are "
            "not supported: put examples in doc_to_text"
        )
    metrics = tuple(m.get("metric") if isinstance(m, dict) else m for m in raw.get("metric_list") or [])
    allowed = METRICS[output_type]
    bad = [m for m in metrics if m not in allowed]
    if bad:
        raise EvalError(
            f"{path}: key 'metric_list' names {bad[0]!r}, but a {output_type} task computes {', '.join(allowed)}"
        )
    data = _data_file(raw, path)
    docs = []
    with open(data, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{data}: line {n} is not JSON ({e})") from None
            if max_examples is not None and len(docs) >= max_examples:
                break
    if not docs:
        raise EvalError(f"{data}: no records (task {path})")
    gen = raw.get("generation_kwargs") or {}
    until = gen.get("until") or []
    task = Task(
        name=str(raw.get("task") or path.stem),
        path=path,
        output_type=output_type,
        docs=docs,
        doc_to_text=raw.get("doc_to_text"),
        doc_to_choice=raw.get("doc_to_choice"),
        doc_to_target=raw.get("doc_to_target"),
        target_delimiter=str(raw.get("target_delimiter", " ")),
        until=[until] if isinstance(until, str) else list(until),
        max_gen_toks=int(gen.get("max_gen_toks", 128)),
        metrics=metrics or allowed,
        chat_prompt=(raw.get("metadata") or {}).get("chat_prompt"),
    )
    task.text(docs[0])  # fail now, naming the key, rather than halfway through
    task.chat_message(docs[0])
    if output_type == "multiple_choice":
        task.target(docs[0])
    return task
