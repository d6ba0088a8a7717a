"""Sampling from a GPT: KV-cached, batched over prompts of different lengths, streamed or not.

    generate(model, prompts, max_new_tokens, temperature=0)   -> the new tokens per prompt (greedy)
    stream(model, prompt, max_new_tokens, top_p=0.9)          -> yields token ids as they come

Prompts of different lengths are left-padded: a mask hides the padding and per-row position ids
start every prompt at position 0, so a prompt's tokens don't depend on its batch. Without the
cache (use_cache=False) every step recomputes the whole sequence; the cache gives the same tokens.

Always eager, even on blocks compiled for training (train.compile): see logits_for.
Works on a model wrapped by FSDP2 in a multi-process job: the forward passes are collectives, so
every rank runs the same number of them, stopping only when every row on every rank is done.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist


def sampling_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None
) -> torch.Tensor:
    """The logits of the distribution sample_next draws from, float32, [..., vocab]: divided by the
    temperature (> 0), tokens outside the top_k and the top_p nucleus at -inf. Its log_softmax is the
    log-probability of a sampled token (GRPO's ratio and KL need exactly that distribution)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (always at least one).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits [batch, vocab] -> next token ids [batch]. temperature 0 = greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _all_ranks(value: int, op, device) -> int:
    """Agree on a number across ranks (a no-op in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def _model_device(model) -> torch.device:
    return next(iter(model.parameters())).device


@torch.no_grad()
def _steps(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    stop_tokens: Sequence[int],
    generator: Optional[torch.Generator],
    use_cache: bool,
    samples: int = 1,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [batch] per step, until all rows (on all ranks) have stopped.

    The rows are each prompt `samples` times in a row. With the cache, a prompt is read once and its
    keys and values copied to its samples, and rows that have stopped leave the batch (their filler
    token is 0): each step costs only the rows still sampling."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start with <|endoftext|> for none)")
    device = _model_device(model)
    max_len = model.cfg.max_seq_len
    lengths = torch.tensor([len(p) for p in prompts for _ in range(samples)], device=device)
    width = int(lengths.max())
    if width > max_len:
        raise ValueError(f"a prompt of {width} tokens exceeds model.max_seq_len={max_len}")
    # The sequence can't grow past max_seq_len; ranks agree on the step count so their collectives match.
    steps = _all_ranks(min(max_new_tokens, max_len - width), dist.ReduceOp.MIN, device)
    n = len(lengths)
    pad = width - lengths  # left padding per row
    tokens = torch.zeros(n, width + steps, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i * samples : (i + 1) * samples, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
    columns = torch.arange(width + steps, device=device)
    padded = bool(pad.any())
    key_ok = columns[None, :] >= pad[:, None]  # [batch, total]: False on padding
    positions = (columns[None, :] - pad[:, None]).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)

    @torch.compiler.set_stance("force_eager")
    def logits_for(rows: torch.Tensor, start: int, end: int, cache) -> torch.Tensor:
        """Logits of the last position of these rows, feeding tokens[rows, start:end] (after `start` cached ones).

        Eager even through blocks that train.compile compiled: every batch of prompts, prompt width and cache
        length is a new shape, and compiling each would soon hit dynamo's recompile limit (GRPO's rollouts,
        the eval) for forward passes too small to repay it. The stance is set per call, not around the whole
        generator, so that it never leaks into the caller's code between tokens."""
        kwargs = {"cache": cache} if cache is not None else {}
        if not padded:
            return model(tokens[rows, start:end], **kwargs)[:, -1]
        causal = torch.ones(end - start, end, dtype=torch.bool, device=device).tril(diagonal=start)
        # Padding queries attend to themselves only: a row with no key at all would give NaN.
        self_only = columns[None, :end] == columns[start:end, None]
        mask = (causal & key_ok[rows, None, None, :end]) | self_only
        return model(tokens[rows, start:end], position_ids=positions[rows, start:end], mask=mask, **kwargs)[:, -1]

    cache = model.new_cache(width + steps) if use_cache else None
    active = torch.arange(n, device=device)  # the rows computed this step (with the cache: those still sampling)
    for t in range(steps):
        end = width + t
        if cache is None:
            logits = logits_for(active, 0, end, None)
        elif t == 0:  # each prompt once, then its keys and values for every sample of it
            logits = logits_for(active[::samples], 0, end, cache).repeat_interleave(samples, 0)
            if samples > 1:
                cache.select(active // samples)
        else:
            logits = logits_for(active, end - 1, end, cache)
        nxt = torch.zeros(n, dtype=torch.long, device=device)  # finished rows keep a filler token
        nxt[active] = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        tokens[:, end] = nxt
        yield nxt
        done |= torch.isin(nxt, stops)
        if _all_ranks(int(done.all()), dist.ReduceOp.MIN, device):
            return
        if cache is not None and bool(done[active].any()) and not bool(done.all()):
            keep = ~done[active]  # rows that stopped leave the batch, and their keys and values the cache
            cache.select(keep.nonzero().squeeze(1))
            active = active[keep]


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    samples: int = 1,
) -> list[list[int]]:
    """The new tokens of each prompt, each ending at (and including) its first stop token.

    At most max_new_tokens, and no further than model.max_seq_len allows for the longest prompt.
    samples: completions per prompt (GRPO's group), returned consecutively: len(prompts) * samples lists.
    """
    out: list[list[int]] = [[] for _ in range(len(prompts) * samples)]
    finished = [False] * len(out)
    for nxt in _steps(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        generator=generator,
        use_cache=use_cache,
        samples=samples,
    ):
        for i, tok in enumerate(nxt.tolist()):
            if not finished[i]:
                out[i].append(tok)
                finished[i] = tok in stop_tokens
    return out


def stream(
    model,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield one prompt's new token ids as they are sampled, ending with the first stop token.
    (Single process only: a caller that stops early leaves the other ranks waiting.)"""
    for nxt in _steps(
        model,
        [prompt],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
        generator=generator,
        use_cache=use_cache,
    ):
        yield int(nxt[0])


class TextStream:
    """One prompt's continuation as text, piece by piece as tokens come, ending at a stop string
    (not included), a stop token or max_new_tokens.

        for piece in TextStream(model, tokenizer, prompt_ids, 128, stop=["\\n\\n"], temperature=0.8):
            print(piece, end="", flush=True)

    Text that could be the start of a stop string is held back until it is clear that it isn't,
    and so are the bytes of a character split across tokens. Afterwards `token_ids` holds the
    tokens sampled and `stop_reason` is "stop_string", "stop_token" or "length".
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt: list[int],
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        stop_tokens: Sequence[int] = (),
        **sampling,
    ):
        self.model, self.tokenizer, self.prompt, self.max_new_tokens = model, tokenizer, prompt, max_new_tokens
        self.stop, self.stop_tokens, self.sampling = [s for s in stop if s], set(stop_tokens), sampling
        self.token_ids: list[int] = []
        self.stop_reason: Optional[str] = None

    def _held_back(self, text: str) -> int:
        """Characters at the end of text that could begin a stop string."""
        return max(
            (k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0
        )

    def __iter__(self) -> Iterator[str]:
        shown = 0  # characters of the decoded text already yielded
        text = ""
        for tok in stream(self.model, self.prompt, self.max_new_tokens, **self.sampling):
            if tok in self.stop_tokens:
                self.stop_reason = "stop_token"
                break
            self.token_ids.append(tok)
            text = self.tokenizer.decode(self.token_ids)
            # Look for a stop string only where new text could complete one.
            hits = [i for i in (text.find(s, max(0, shown - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.stop_reason = "stop_string"
                if min(hits) > shown:
                    yield text[shown : min(hits)]
                return
            if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                continue
            safe = len(text) - self._held_back(text)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        else:
            self.stop_reason = "length"
        if len(text) > shown:
            yield text[shown:]
