"""The text encoders' CUDA-graph stand-in (remote/server/graphed.py).

The graph path itself needs a GPU (measured on an H100: SD1.5 encode_prompt 9.2 -> 2.2 ms,
SDXL 52.6 -> 13.1 ms, outputs bit-identical, a weight changed in place seen at the next
replay); here: what must never go to a graph runs the module's own forward, unchanged."""

from __future__ import annotations

import torch

from remote.server import graphed
from remote.server.demo_model import build_demo_pipeline


def test_calls_a_graph_cannot_stand_for_run_the_modules_own_forward():
    pipe = build_demo_pipeline()
    encoder = pipe.text_encoder
    ids = pipe.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = encoder(ids)
    stand_in = graphed.install(encoder)
    assert encoder.forward is stand_in
    with torch.inference_mode():
        got = encoder(ids)  # CPU tensors: no CUDA graph
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    got = encoder(ids)  # outside inference mode too
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert stand_in._graphs == {}, "nothing was captured"


def test_the_signature_names_what_a_graph_bakes_in():
    if not torch.cuda.is_available():
        ids = torch.zeros(1, 77, dtype=torch.long)
        assert graphed._key((ids,), {}) is None, "CPU tensors never go to a graph"
        return
    ids = torch.zeros(1, 77, dtype=torch.long, device="cuda")
    one = graphed._key((ids,), {"output_hidden_states": True})
    assert one == graphed._key((ids.clone(),), {"output_hidden_states": True})
    assert one != graphed._key((ids,), {"output_hidden_states": False})
    assert one != graphed._key((torch.zeros(2, 77, dtype=torch.long, device="cuda"),), {"output_hidden_states": True})
    assert graphed._key((ids,), {"callback": print}) is None
