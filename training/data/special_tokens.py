"""A tokenizer's special tokens and chat template, read from its own folder as transformers reads them.

    tokenizer_config.json     bos_token, eos_token, pad_token (a string or {"content": ...}), chat_template
    special_tokens_map.json   the same token names, where tokenizer_config.json lacks them
    generation_config.json    bos/eos/pad_token_id; eos_token_id may be a list: every id in it stops generation
    chat_template.jinja       the chat template (wins over tokenizer_config.json's, as in transformers)

No id is fixed: an imported Llama's 0 is an ordinary token. orch's own byte-level BPE writes these files beside
its tokenizer.json (write_tokenizer_files, called by `orch data prepare`); a folder of ours from before that
(a tokenizer.json with <|endoftext|> and no tokenizer_config.json) reads as if it had written them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

from jobspec import atomic
from training.data import DataError

# The special tokens of our byte-level BPE (training/data/tokenizer.py reserves them first when training one).
EOS = "<|endoftext|>"  # ends every document; the separator in packed sequences
PAD = "<|pad|>"
IM_START = "<|im_start|>"  # chat turns (ChatML)
IM_END = "<|im_end|>"

CONFIG, SPECIAL_MAP, GENERATION, TEMPLATE = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
FILES = (CONFIG, SPECIAL_MAP, GENERATION, TEMPLATE)  # what a tokenizer folder holds beside tokenizer.json

# ChatML, the template orch writes for its own models. The {% generation %} markers enclose what the assistant
# says (its closing <|im_end|> included: the model must learn to stop); transformers reads them too
# (apply_chat_template(..., return_assistant_tokens_mask=True)).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class SpecialTokens(NamedTuple):
    bos: Optional[int]  # None: the model has no beginning-of-sequence token
    eos: int  # ends a sequence: the separator of packed documents, the token a classifier reads
    pad: int  # fills rows; always masked by position, so the eos where the folder names no pad
    stops: tuple[int, ...]  # generation ends at any of these: eos, generation_config's eos_token_id list
    names: dict  # the template's variables: bos_token, eos_token, pad_token, unk_token, ... as strings


def _read(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, expected a JSON object")
    return data


def _content(value) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def orch_config(tok) -> dict:
    """tokenizer_config.json of our byte-level BPE: <|endoftext|> begins and ends documents, ChatML is its
    chat template."""
    pad = PAD if tok.token_to_id(PAD) is not None else EOS
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": pad,
        "additional_special_tokens": [t for t in (IM_START, IM_END) if tok.token_to_id(t) is not None],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML,
    }


def _is_ours(tok, folder: Path) -> bool:
    return not any((folder / name).is_file() for name in (CONFIG, SPECIAL_MAP)) and tok.token_to_id(EOS) is not None


def read_special_tokens(tok, folder: str | Path) -> tuple[SpecialTokens, Optional[str]]:
    """(special tokens, chat template or None) of the tokenizer `tok` whose files are in `folder`."""
    folder = Path(folder)
    if _is_ours(tok, folder):
        config, generation = orch_config(tok), {}
        if tok.token_to_id(IM_END) is not None:
            generation = {"eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(IM_END)]}
    else:
        config, generation = {**_read(folder, SPECIAL_MAP), **_read(folder, CONFIG)}, _read(folder, GENERATION)
    names = {k: _content(v) for k, v in config.items() if k.endswith("_token") and _content(v)}
    extra = config.get("additional_special_tokens")
    names["additional_special_tokens"] = [_content(t) for t in extra if _content(t)] if isinstance(extra, list) else []

    def token_id(key: str, where: str) -> Optional[int]:
        name = names.get(key)
        if name is None:
            return None
        i = tok.token_to_id(name)
        if i is None:
            raise DataError(
                f"{folder / where}: key {key!r} names the token {name!r}, which the tokenizer.json beside it lacks"
            )
        return i

    generated_eos = _ids(generation.get("eos_token_id"))
    eos = token_id("eos_token", CONFIG)
    if eos is None:
        eos = generated_eos[0] if generated_eos else None
    if eos is None:
        raise DataError(
            f"{folder}: no end-of-sequence token: neither {CONFIG} nor {SPECIAL_MAP} names an 'eos_token', and "
            f"{GENERATION} has no 'eos_token_id' (a Hugging Face tokenizer folder has them)"
        )
    bos = token_id("bos_token", CONFIG)
    if bos is None and _ids(generation.get("bos_token_id")):
        bos = _ids(generation.get("bos_token_id"))[0]
    pad = token_id("pad_token", CONFIG)
    if pad is None:
        pad = (_ids(generation.get("pad_token_id")) or [eos])[0]
    for key, value in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)):
        if key not in names and value is not None:
            names[key] = tok.id_to_token(value)
    stops = tuple(dict.fromkeys([eos, *generated_eos]))
    template = _template(config, folder)
    return SpecialTokens(bos, eos, pad, stops, names), template


def _template(config: dict, folder: Path) -> Optional[str]:
    if (folder / TEMPLATE).is_file():
        return (folder / TEMPLATE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def write_tokenizer_files(tok, folder: str | Path) -> None:
    """Our BPE's tokenizer_config.json, special_tokens_map.json and generation_config.json beside its
    tokenizer.json, so that it is read like any other tokenizer folder (atomic writes)."""
    folder = Path(folder)
    config = orch_config(tok)
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}
    eos = tok.token_to_id(EOS)
    stops = [eos] + ([tok.token_to_id(IM_END)] if tok.token_to_id(IM_END) is not None else [])
    generation = {"bos_token_id": eos, "eos_token_id": stops, "pad_token_id": tok.token_to_id(config["pad_token"])}
    for name, data in ((CONFIG, config), (SPECIAL_MAP, special), (GENERATION, generation)):
        atomic.write_text(folder / name, json.dumps(data, indent=2) + "\n")  # Hugging Face's own indent


class FolderTokenizer:
    """A `tokenizers.Tokenizer` (every attribute of which it passes through) with its folder's special tokens
    (`special`) and chat template (`chat_template`, None where the folder ships none)."""

    def __init__(self, tok, folder: str | Path):
        self.__dict__["_tok"] = tok
        self.__dict__["folder"] = Path(folder)
        special, template = read_special_tokens(tok, folder)
        self.__dict__["special"], self.__dict__["chat_template"] = special, template

    def __getattr__(self, name):
        if name.startswith("__") or "_tok" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_tok"], name)

    def __setattr__(self, name, value):
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self._tok, name, value)

    @property
    def tokenizer(self):
        """The bare `tokenizers.Tokenizer`."""
        return self._tok


def special_tokens(tok) -> SpecialTokens:
    """The special tokens of a loaded tokenizer (load_tokenizer's); a bare one of ours is read by its names."""
    special = getattr(tok, "special", None)
    if special is None:
        special, _ = read_special_tokens(tok, Path(os.devnull))
    return special
