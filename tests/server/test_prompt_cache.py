"""Text-encoder outputs reused across requests (remote/server/prompt_cache.py), on real pipelines."""

from __future__ import annotations

import pytest
import torch

from remote.server.demo_model import build_demo_pipeline
from remote.server.prompt_cache import PromptCache
from tests.helpers.model_files import build_tiny_sdxl


def counting(pipe) -> list[int]:
    """How many rows each text encoder has encoded so far (forward hooks, nothing replaced)."""
    rows = [0]
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.register_forward_hook(lambda module, args, kwargs, out: rows.__setitem__(0, rows[0] + args[0].shape[0]),
                                          with_kwargs=True)
    return rows


@pytest.mark.parametrize("build", [build_demo_pipeline, build_tiny_sdxl], ids=["sd15", "sdxl"])
def test_cached_rows_are_the_encoders_own_output_and_are_not_encoded_again(build):
    pipe = build()
    direct = pipe.encode_prompt
    rows = counting(pipe)
    version = [0]
    cache = PromptCache()
    cached = cache.wrap(pipe.encode_prompt, lambda: version[0])
    kw = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)

    with torch.inference_mode():
        first = cached(prompt=["a cat"], negative_prompt=["blurry"], **kw)
        assert rows[0] > 0
        encoded = rows[0]
        again = cached(prompt=["a cat"], negative_prompt=["blurry"], **kw)
        assert rows[0] == encoded, "the same prompt is not encoded again"
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        # A batch: the known row comes from the cache, the new one is encoded (alone).
        batch = cached(prompt=["a dog", "a cat"], negative_prompt=["blurry", "blurry"], **kw)
        assert rows[0] == 2 * encoded, "one new row: encoded as much as the first"
        reference = direct(prompt=["a dog", "a cat"], negative_prompt=["blurry", "blurry"], **kw)
        rows[0] -= 2 * encoded  # the reference's own rows
        assert len(batch) == len(reference)
        for a, b in zip(batch, reference):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5), "rows in the order asked, as the encoder gives them"
        # New weights (a LoRA merged): nothing cached before counts.
        version[0] += 1
        cached(prompt=["a cat"], negative_prompt=["blurry"], **kw)
        assert rows[0] == 3 * encoded
    assert cache.hits == 2 and cache.misses == 3


def test_calls_the_cache_does_not_understand_go_straight_through():
    pipe = build_demo_pipeline()
    rows = counting(pipe)
    cache = PromptCache()
    cached = cache.wrap(pipe.encode_prompt, lambda: 0)
    with torch.inference_mode():
        embeds, negative = pipe.encode_prompt(prompt="a cat", device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=True)
        for _ in range(2):
            out = cached(prompt=None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                         prompt_embeds=embeds, negative_prompt_embeds=negative)
            assert torch.equal(out[0], embeds)
            cached(prompt=["a cat"], device="cpu", num_images_per_prompt=2, do_classifier_free_guidance=True)
    assert cache.hits == cache.misses == 0 and rows[0] > 0


def test_the_cache_keeps_a_bounded_number_of_rows():
    pipe = build_demo_pipeline()
    cache = PromptCache(rows=3)
    cached = cache.wrap(pipe.encode_prompt, lambda: 0)
    with torch.inference_mode():
        for i in range(5):
            cached(prompt=[f"prompt {i}"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        assert len(cache._entries) == 3
        cached(prompt=["prompt 0"], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert cache.misses == 6, "the oldest rows were dropped"
