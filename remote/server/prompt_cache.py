"""Text-encoder outputs of recent prompts, kept per loaded model.

A1111 keeps its last conditioning the same way. On an H100 the prompt phase of an SD1.5
image at batch 1 (two eager CLIP passes, the prompt and the negative prompt) was 26 ms of
234 ms, and users run a prompt again with other seeds (or several clients the same one).

The cache wraps a pipeline's own `encode_prompt`: each row (one prompt with its negative
prompt: a pair, since pipelines encode the two differently, e.g. clip_skip or SDXL's zeros
for an empty negative prompt) is looked up; rows not cached are encoded together by the
original method, in one call, and their outputs kept. Anything the wrapper does not understand (precomputed
embeddings, num_images_per_prompt > 1, tensors among the arguments) goes straight through.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

# Arguments that hold the texts, one per row of the batch (SD: prompt, negative_prompt; SDXL adds the _2 ones).
TEXT_ARGUMENTS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
# Precomputed embeddings: the caller encoded already.
EMBEDDING_ARGUMENTS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


class PromptCache:
    def __init__(self, rows: int = 128) -> None:
        self.rows = rows
        self._entries: OrderedDict[tuple, tuple[Any, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._entries.clear()

    def wrap(self, encode_prompt: Callable[..., tuple], weights_version: Callable[[], Any]) -> Callable[..., tuple]:
        """encode_prompt (a bound method) answered from the cache; weights_version() changes
        whenever the text encoders' weights do (a LoRA merged or removed)."""
        import torch

        signature = inspect.signature(encode_prompt)

        def cached(*args: Any, **kwargs: Any) -> tuple:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = dict(bound.arguments)
            rows = _rows(given)
            if rows is None:
                return encode_prompt(*args, **kwargs)
            others = tuple((k, _value_key(v)) for k, v in sorted(given.items()) if k not in TEXT_ARGUMENTS and k != "device")
            if any(v is _UNCACHEABLE for _, v in others):
                return encode_prompt(*args, **kwargs)
            keys = [(texts, others, weights_version()) for texts in rows]
            missing = [i for i, key in enumerate(keys) if key not in self._entries]
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
            if missing:
                subset = dict(given)
                for name in TEXT_ARGUMENTS:
                    if isinstance(given.get(name), list):
                        subset[name] = [given[name][i] for i in missing]
                outputs = encode_prompt(**subset)
                for j, i in enumerate(missing):
                    self._entries[keys[i]] = tuple(None if t is None else t[j : j + 1].clone() for t in outputs)
                while len(self._entries) > self.rows:
                    self._entries.popitem(last=False)
            found = [self._entries[key] for key in keys]
            for key in keys:
                self._entries.move_to_end(key)
            return tuple(None if found[0][c] is None else torch.cat([row[c] for row in found])
                         for c in range(len(found[0])))

        return cached


_UNCACHEABLE = object()


def _value_key(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _UNCACHEABLE


def _rows(given: dict[str, Any]) -> list[tuple] | None:
    """The texts of each row, or None when this call is not one the cache understands."""
    if given.get("num_images_per_prompt", 1) != 1 or any(given.get(k) is not None for k in EMBEDDING_ARGUMENTS):
        return None
    prompts = given.get("prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        return None
    n = len(prompts)
    columns = []
    for name in TEXT_ARGUMENTS:
        if name not in given:
            continue
        value = given[name]
        if value is None or (isinstance(value, str) and n == 1):
            columns.append([value] * n)
        elif isinstance(value, list) and len(value) == n and all(isinstance(v, str) for v in value):
            columns.append(value)
        else:
            return None  # a string for several rows, or a length mismatch: let the pipeline decide
    return list(zip(*columns))
