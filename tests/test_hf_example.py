"""The Hugging Face example: a transformers Llama split across a prefill process that pushes
each layer's KV as it is computed and a decode process that continues with generate."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

import torch_kvreg as kv

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the hf extra (transformers)"),
    pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra"),
]


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import hf_disaggregated_serving

        yield hf_disaggregated_serving
    finally:
        sys.path.remove(str(EXAMPLES))


def test_disaggregated_tokens_equal_one_process(example):
    tokens, reference, got = example.run(batch=3, length=40, new_tokens=12)
    assert torch.equal(tokens, reference)
    assert len(set(reference[0, -12:].tolist())) > 3  # varied tokens, not one repeated
    moved, _ = got["prefill"]
    model = example.build_model()
    batch, heads, length, head_dim = example.kv_shape(model, 3, 39)
    assert moved == 2 * model.config.num_hidden_layers * batch * heads * length * head_dim * 4
    landed = got["decode"][1]  # when each layer's notice arrived
    assert len(landed) == model.config.num_hidden_layers and all(t > 0 for t in landed)


def test_the_tokens_depend_on_the_kv_that_landed(example):
    """The comparison above can fail: a decoder given slightly different KV generates
    other tokens."""
    from transformers import DynamicCache

    model = example.build_model()
    input_ids = example.prompts(3, 40)
    cache = DynamicCache()
    with torch.no_grad():
        example.prefill(model, input_ids, cache)
        keys, _ = example.layer_kv(cache, 2)
        keys[1].mul_(0.9)  # one request's keys of one layer, a little off
        tokens = example.generate_from(model, input_ids, cache, 12)
    reference = example.single_process(3, 40, 12)
    assert torch.equal(tokens[0], reference[0]) and not torch.equal(tokens[1], reference[1])


def test_demo_script_runs():
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "hf_disaggregated_serving.py"),
            "--new-tokens",
            "8",
            "--batch",
            "2",
            "--prompt-len",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK: disaggregated tokens equal the single-process generate" in result.stdout
