"""The transformers generation engine: one queue of requests, continuous batching by row refill.

Every (problem, sample) is one request in one queue. A fixed number of rows (``slots``) decode
together; when a row ends (a stop token, or its token limit) its completion is handed to
``on_finish`` at once and the next queued prompt takes its place, so the device never waits for the
longest completion of a fixed batch (static batches run every row to the batch's longest one).

The rows share one key/value cache (transformers' ``DynamicCache``, its layers made to append in
place; (rows, heads, T, head_dim) per layer), left-padded: new prompts are prefilled together,
padded on the left to the cache's length (or the cache to theirs) and appended; a finished row is
dropped, and columns that are padding in every remaining row are cut. Each row keeps its own positions and attention mask, so a
row's tokens do not depend on which rows share its batch (greedy decoding agrees up to float noise).

Sampling is the same in every engine: temperature, then top-k (0 = off), then top-p, each knob given
explicitly (no model or library default applies). Each request draws from its own generator, seeded
by the request, so a sample does not depend on the batch around it or on where a resumed evaluation
restarted.

transformers 5's own continuous batching (``generate_batch`` and its manager) works here and was
measured first (``benchmarks/bench_generation.py``, ``docs/performance.md``): on CPU it was slower
than this loop, it runs in a background thread, and it reseeds torch's global RNG and samples every
row from one generator, so a resumed sampled evaluation could not redraw the samples it lost.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Sampling:
    """Decoding settings, all explicit (``eval.*``)."""

    temperature: float = 0.0  # 0 = greedy (argmax); top_k and top_p then do not matter
    top_p: float = 1.0  # nucleus: the smallest set of tokens with this much probability (1 = off)
    top_k: int = 0  # the k most likely tokens only (0 = off)
    max_new_tokens: int = 256  # per completion, the stop token included


@dataclass
class Request:
    key: tuple  # the caller's id, e.g. (problem index, sample index)
    prompt: Sequence[int]  # token ids
    seed: int = 0  # this request's sampling generator
    max_new_tokens: Optional[int] = None  # None: Sampling.max_new_tokens


@dataclass
class Generated:
    key: tuple
    tokens: list[int]  # up to and including the stop token when ``stopped``
    stopped: bool  # ended with a stop token (False: reached its token limit)


@dataclass
class _Rows:
    """The rows decoding together. ``mask``: (B, T) 1 on real tokens (left padding); ``cache``: the
    model's DynamicCache, T columns per layer; ``last``: (B,) the token each row feeds next."""

    requests: list[Request] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    generators: list = field(default_factory=list)
    mask: Optional[torch.Tensor] = None
    cache: object = None
    last: Optional[torch.Tensor] = None


def _pad_left(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """``tensor`` with ``columns`` zeros prepended along ``dim``."""
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@functools.lru_cache(maxsize=None)
def _growing_layer():
    """A DynamicLayer that appends in place. transformers' own concatenates the whole cache at every
    step (O(T) copied per token); here keys/values are views of the first ``length`` columns of
    buffers that double when full, so a decode step writes one column."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.is_initialized, self.device = True, keys.device
            self.set(keys, values)

        def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Take these (B, heads, T, head_dim) tensors as the whole cache of this layer."""
            self._keys, self._values, self.length = keys, values, keys.shape[-2]
            self.keys, self.values = keys, values

        def update(self, key_states, value_states, *args, **kwargs):
            new = key_states.shape[-2]
            if self.length + new > self._keys.shape[-2]:
                room = max(self._keys.shape[-2], new)  # capacity doubles: copies amortize to O(1) per token
                self._keys, self._values = (
                    torch.cat([buf[..., :self.length, :], buf.new_empty(*buf.shape[:2], room, buf.shape[3])], 2)
                    for buf in (self._keys, self._values))  # (B, heads, 2T, head_dim); unused columns never read
            self._keys[..., self.length:self.length + new, :] = key_states
            self._values[..., self.length:self.length + new, :] = value_states
            self.length += new
            self.keys, self.values = self._keys[..., :self.length, :], self._values[..., :self.length, :]
            return self.keys, self.values

    return GrowingLayer


def _layers(cache) -> list:
    """The cache's layers as GrowingLayers, each holding ``keys``/``values`` of (B, heads, T, head_dim)."""
    if any(getattr(layer, "is_sliding", False) or not hasattr(layer, "keys") for layer in cache.layers):
        raise NotImplementedError("the transformers engine's continuous batching needs a full-attention "
                                  "key/value cache (this model has sliding-window layers); use eval.engine=vllm")
    growing = _growing_layer()
    cache.layers[:] = [layer if isinstance(layer, growing) else growing(layer.keys, layer.values)
                       for layer in cache.layers]
    return list(cache.layers)


def sample_next(logits: torch.Tensor, sampling: Sampling, generators: Sequence) -> torch.Tensor:
    """The next token of every row from its last logits (B, V), in fp32: argmax when greedy, else
    temperature → top-k → top-p, one draw per row from the row's own generator."""
    logits = logits.float()
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits / sampling.temperature
    if sampling.top_k > 0:
        scores = TopKLogitsWarper(top_k=sampling.top_k)(None, scores)
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=sampling.top_p)(None, scores)
    probs = scores.softmax(dim=-1)  # (B, V)
    return torch.cat([torch.multinomial(probs[row], 1, generator=gen) for row, gen in enumerate(generators)])


def _cache_argument(model) -> str:
    """The forward keyword of the key/value cache: ``cache`` in recent transformers 5 releases,
    ``past_key_values`` before (5.0 names it so). Read once per model class, not per decode step."""
    return _cache_keyword(type(model))


@functools.lru_cache(maxsize=None)
def _cache_keyword(model_class) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{_cache_argument(model): cache})  # the output layer on the last position only
    cache = out.cache if hasattr(out, "cache") else out.past_key_values  # (a DynamicCache may be falsy)
    return out.logits[:, -1], cache  # (B, V)


def _admit(model, rows: _Rows, new: list[Request], pad_id: int, sampling: Sampling, device) -> None:
    """Prefill ``new`` prompts (left-padded among themselves) and append them to ``rows``."""
    width = max(len(r.prompt) for r in new)
    ids = torch.full((len(new), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(new), width), dtype=torch.long)
    for row, request in enumerate(new):
        ids[row, width - len(request.prompt):] = torch.as_tensor(list(request.prompt))
        mask[row, width - len(request.prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
    logits, cache = _forward(model, ids, mask, positions, None)
    generators = [torch.Generator(device=device).manual_seed(r.seed) for r in new]
    first = sample_next(logits, sampling, generators)
    if rows.cache is None:
        _layers(cache)
        rows.cache, rows.mask, rows.last = cache, mask, first
    else:  # one cache of max(T, width) columns: the shorter side is padded on the left
        old_t, total = rows.mask.shape[1], max(rows.mask.shape[1], width)
        for old_layer, new_layer in zip(_layers(rows.cache), cache.layers):
            old_layer.set(torch.cat([_pad_left(old_layer.keys, total - old_t, 2),
                                     _pad_left(new_layer.keys, total - width, 2)]),
                          torch.cat([_pad_left(old_layer.values, total - old_t, 2),
                                     _pad_left(new_layer.values, total - width, 2)]))
        rows.mask = torch.cat([_pad_left(rows.mask, total - old_t, 1), _pad_left(mask, total - width, 1)])
        rows.last = torch.cat([rows.last, first])
    rows.requests += new
    rows.generators += generators
    rows.tokens += [[t] for t in first.tolist()]


def _retire(rows: _Rows, done: list[int]) -> None:
    """Drop the rows ``done`` and the cache columns that are padding in every remaining row."""
    keep = [i for i in range(len(rows.requests)) if i not in set(done)]
    if not keep:
        rows.requests, rows.tokens, rows.generators = [], [], []
        rows.cache = rows.mask = rows.last = None
        return
    index = torch.as_tensor(keep, device=rows.mask.device)
    lead = int((rows.mask[index] == 0).all(dim=0).long().cumprod(0).sum())  # leading all-pad columns
    for layer in _layers(rows.cache):
        layer.set(layer.keys[index, :, lead:], layer.values[index, :, lead:])
    rows.mask, rows.last = rows.mask[index, lead:], rows.last[index]
    rows.requests = [rows.requests[i] for i in keep]
    rows.tokens = [rows.tokens[i] for i in keep]
    rows.generators = [rows.generators[i] for i in keep]


@torch.no_grad()
def continuous_generate(model, requests: Sequence[Request], stop_ids: Sequence[int], sampling: Sampling,
                        slots: int, pad_id: int, on_finish: Callable[[list[Generated]], None],
                        check: Callable[[], None] = lambda: None) -> None:
    """Generate every request, ``slots`` rows at a time, refilling a row as soon as it ends.
    ``on_finish`` gets the completions that ended at each step (in the order they ended);
    ``check`` runs before every step (it raises to stop, e.g. on a preemption signal)."""
    model.eval()
    device = next(model.parameters()).device
    stops = set(int(t) for t in stop_ids)
    queue, rows = deque(requests), _Rows()
    while queue or rows.requests:
        check()
        if queue and len(rows.requests) < slots:
            _admit(model, rows, [queue.popleft() for _ in range(min(slots - len(rows.requests), len(queue)))],
                   pad_id, sampling, device)
        else:
            rows.mask = F.pad(rows.mask, (0, 1), value=1)
            positions = rows.mask.sum(-1, keepdim=True) - 1  # (B, 1): real tokens before the new one
            logits, rows.cache = _forward(model, rows.last[:, None], rows.mask, positions, rows.cache)
            rows.last = sample_next(logits, sampling, rows.generators)
            for tokens, token in zip(rows.tokens, rows.last.tolist()):
                tokens.append(token)
        done = [i for i, (request, tokens) in enumerate(zip(rows.requests, rows.tokens))
                if tokens[-1] in stops or len(tokens) >= (request.max_new_tokens or sampling.max_new_tokens)]
        if done:
            on_finish([Generated(rows.requests[i].key, rows.tokens[i], rows.tokens[i][-1] in stops) for i in done])
            _retire(rows, done)
