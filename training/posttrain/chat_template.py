"""A model folder's chat template, rendered as transformers renders it, and the characters the assistant says.

The template is Jinja, run in jinja2's ImmutableSandboxedEnvironment with transformers' options and globals
(trim_blocks, lstrip_blocks, loopcontrols, raise_exception, strftime_now, tojson), with the folder's special
tokens (bos_token, eos_token, ...) as variables. What the assistant says is found

- by the template's `{% generation %}...{% endgeneration %}` markers where it has them (as transformers'
  return_assistant_tokens_mask does), else
- by rendering prefixes: the assistant's turn i is what render(messages[:i+1]) adds to
  render(messages[:i], add_generation_prompt=True), up to its last non-blank character (the newline after an
  end-of-turn token is the template's, not the reply's). A turn whose prefixes are not prefixes of the whole
  rendering (a template that rewrites earlier turns) is not learned.
"""

from __future__ import annotations

from datetime import datetime
from typing import Optional, Sequence

from training.data import DataError


class ChatTemplateError(DataError):
    """The template refused a conversation (its raise_exception) or failed to render it."""


def _environment(tracker: list):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}: records the (start, end) characters of its body in the output (tracker[1:])."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            if tracker:  # tracker[0]: the pieces rendered so far
                start = sum(len(p) for p in tracker[0])
                tracker.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        import json

        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    def __init__(self, source: str, names: dict, where: str = "the chat template"):
        import jinja2

        self.source, self.names, self.where = source, dict(names), where
        self._tracker: list = []
        try:
            self._template = _environment(self._tracker).from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{where} is not valid Jinja (line {e.lineno}: {e.message})") from None
        self.has_markers = "generation" in source and "endgeneration" in source

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt)[0]

    def _render(self, messages, add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """(text, the (start, end) characters of each {% generation %} block)."""
        import jinja2

        pieces: list[str] = []
        self._tracker[:] = [pieces]
        try:
            for piece in self._template.generate(
                messages=[dict(m) for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.names,
            ):
                pieces.append(piece)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.where} refused the conversation: {e}") from None
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"{self.where} failed on the conversation ({type(e).__name__}: {e})") from None
        finally:
            spans = self._tracker[1:]
            self._tracker[:] = []
        return "".join(pieces), spans

    def assistant_spans(self, messages: Sequence[dict], learn_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans of the assistant turns at index >= learn_from)."""
        assistant = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not assistant:
            raise DataError("the conversation has no assistant turn: there is nothing to learn")
        text, marked = self._render(messages, False)
        wanted = [i for i in assistant if i >= learn_from]
        if self.has_markers and len(marked) == len(assistant):
            return text, [span for i, span in zip(assistant, marked) if i >= learn_from]
        spans = []
        for i in wanted:
            try:
                before = self.render(messages[:i], add_generation_prompt=True) if i else ""
                through = self.render(messages[: i + 1])
            except ChatTemplateError:
                continue  # the template needs more of the conversation than this prefix (e.g. a user turn)
            end = len(through.rstrip())
            if text.startswith(through) and through.startswith(before) and end > len(before):
                spans.append((len(before), end))
        if not spans:
            raise DataError(
                f"{self.where}: no assistant turn could be found in the rendered conversation (neither "
                "{% generation %} markers nor renderings of its prefixes mark one)"
            )
        return text, spans


def assistant_token_mask(encoding, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Which tokens of a tokenizers Encoding of the rendered text fall in the character spans: for each span,
    every token from the one holding its first character to the one holding its last (transformers' rule)."""
    mask = [False] * len(encoding.ids)
    for start, end in spans:
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None:
            continue
        for t in range(first, (last if last is not None else len(mask) - 1) + 1):
            mask[t] = True
    return mask


def template_of(tokenizer) -> Optional[ChatTemplate]:
    """The chat template of a loaded tokenizer (compiled once and kept on it); None where it has none."""
    cached = getattr(tokenizer, "__dict__", {}).get("_chat")
    if cached is not None:
        return cached
    source = getattr(tokenizer, "chat_template", None)
    if source is None:
        return None
    from training.data.special_tokens import special_tokens

    where = f"the chat template of {getattr(tokenizer, 'folder', 'the tokenizer')}"
    template = ChatTemplate(source, special_tokens(tokenizer).names, where)
    if hasattr(tokenizer, "__dict__"):
        tokenizer.__dict__["_chat"] = template
    return template
