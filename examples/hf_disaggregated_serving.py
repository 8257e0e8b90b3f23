"""A Hugging Face transformers Llama split across a prefill and a decode process.

The model is built from a small config with random weights (a fixed seed; nothing is
downloaded) on CPU. The prefill process (cluster 1) runs a batch of prompts and, from a
forward hook on each decoder layer, pushes that layer's K and V to the decode process as
soon as the layer is computed, asynchronously, with a completion notice per layer. The
decode process (cluster 2) waits for each layer's notice, builds the model's own
DynamicCache from what landed, and continues with ``model.generate``. The tokens must equal
those of one process that prefills and generates the same way.

    python examples/hf_disaggregated_serving.py [--new-tokens 16] [--batch 4] [--prompt-len 48]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

import torch_kvreg as kv

PREFILL_CLUSTER, DECODE_CLUSTER = 1, 2


def build_model(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A wide initialisation, so that random weights give varied, context-dependent tokens.
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def cache_argument(model) -> str:
    """The keyword that takes a KV cache (``cache`` in recent transformers)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_shape(model, batch: int, length: int) -> tuple[int, ...]:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return batch, config.num_key_value_heads, length, head_dim


def layer_kv(cache, layer: int):
    """(keys, values) of one layer of a transformers DynamicCache, old and new API alike."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def prompts(batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(7))


def generate_from(model, input_ids, cache, new_tokens: int) -> torch.Tensor:
    return model.generate(
        input_ids,
        **{cache_argument(model): cache},
        max_new_tokens=new_tokens,
        do_sample=False,
        attention_mask=torch.ones_like(input_ids),
    )


def prefill(model, input_ids, cache) -> None:
    model(input_ids[:, :-1], **{cache_argument(model): cache}, use_cache=True)


def single_process(batch: int, length: int, new_tokens: int) -> torch.Tensor:
    """The reference: prefill all but the last prompt token, then generate, in one process."""
    from transformers import DynamicCache

    model = build_model()
    input_ids = prompts(batch, length)
    cache = DynamicCache()
    with torch.no_grad():
        prefill(model, input_ids, cache)
        return generate_from(model, input_ids, cache, new_tokens)


def decode_main(ready, results, batch: int, length: int, new_tokens: int) -> None:
    from transformers import DynamicCache

    kv.initialize(
        DECODE_CLUSTER,
        kv.LlmRole.DECODER,
        options={"llm.ListenIpInfo": "127.0.0.1:0", "llm.SyncKvCacheWaitTime": "10000"},
    )
    model = build_model()
    layers = model.config.num_hidden_layers
    shape = kv_shape(model, batch, length - 1)
    received = [torch.zeros(shape) for _ in range(2 * layers)]  # K, V per layer; dim 0: batch slot
    cache = kv.register_kv_cache(received, kv.RegisterCfg(remote_accessible=True))
    ready.put((kv.listen_address(), cache.cache_id))
    # One notice per layer, as each layer's push lands (pushes in flight may land in any order).
    landed, deadline = {}, time.monotonic() + 120
    while len(landed) < layers and time.monotonic() < deadline:
        # Blocks (without the GIL) until a notice lands; nothing polls.
        for notice in kv.wait_notices(timeout_ms=max(1, int(1000 * (deadline - time.monotonic())))):
            landed[notice.message.decode()] = time.monotonic()
    assert sorted(landed) == sorted(f"layer {i}" for i in range(layers)), landed
    dynamic = DynamicCache()
    for layer in range(layers):
        dynamic.update(received[2 * layer].clone(), received[2 * layer + 1].clone(), layer)
    with torch.no_grad():
        tokens = generate_from(model, prompts(batch, length), dynamic, new_tokens)
    # Plain lists: a tensor in a queue is shared by file descriptor, which this process,
    # finishing now, could take away before the parent has received it.
    results.put(("decode", tokens.tolist(), [landed[f"layer {i}"] for i in range(layers)]))
    kv.finalize()


def prefill_main(address: str, remote_cache_id: int, results, batch: int, length: int) -> None:
    from transformers import DynamicCache

    kv.initialize(PREFILL_CLUSTER, kv.LlmRole.PROMPT, options={"llm.SyncKvCacheWaitTime": "10000"})
    host, port = address.split(":")
    status, _ = kv.link_clusters([kv.ClusterInfo(DECODE_CLUSTER, host, int(port))])
    assert status == kv.LLMStatusCode.LLM_SUCCESS, status
    model = build_model()
    layers = model.config.num_hidden_layers
    staging = [torch.zeros(kv_shape(model, batch, length - 1)) for _ in range(2 * layers)]
    local = kv.register_kv_cache(staging)
    remote = kv.CacheIndex(DECODE_CLUSTER, remote_cache_id)
    cache = DynamicCache()
    pushes = []

    def push_layer(layer: int):
        def hook(module, inputs, output):
            keys, values = layer_kv(cache, layer)
            staging[2 * layer].copy_(keys)
            staging[2 * layer + 1].copy_(values)
            pushes.append(
                kv.push_kv_blocks_async(
                    local, remote, range(batch), range(batch), layers=range(layer, layer + 1), notify=f"layer {layer}"
                )
            )

        return hook

    handles = [model.model.layers[i].register_forward_hook(push_layer(i)) for i in range(layers)]
    start = time.monotonic()
    with torch.no_grad():
        prefill(model, prompts(batch, length), cache)
    computed = time.monotonic() - start
    moved = sum(push.wait(10_000) for push in pushes)
    for handle in handles:
        handle.remove()
    results.put(("prefill", moved, computed))
    kv.unlink_clusters([kv.ClusterInfo(DECODE_CLUSTER, host, int(port))])
    kv.finalize()


def run(batch: int = 4, length: int = 48, new_tokens: int = 16) -> tuple[torch.Tensor, torch.Tensor, dict]:
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    decoder = ctx.Process(target=decode_main, args=(ready, results, batch, length, new_tokens))
    decoder.start()
    address, cache_id = ready.get(timeout=300)
    prefill = ctx.Process(target=prefill_main, args=(address, cache_id, results, batch, length))
    prefill.start()
    got = {}
    for _ in range(2):
        item = results.get(timeout=300)
        got[item[0]] = item[1:]
    prefill.join(timeout=60)
    decoder.join(timeout=60)
    reference = single_process(batch, length, new_tokens)
    return torch.tensor(got["decode"][0], dtype=reference.dtype), reference, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=48)
    args = parser.parse_args()
    tokens, reference, got = run(args.batch, args.prompt_len, args.new_tokens)
    moved, computed = got["prefill"]
    print(
        f"prefill: {args.batch} prompts of {args.prompt_len} tokens in {computed * 1000:.1f} ms; pushed "
        f"{moved / 2**20:.2f} MiB layer by layer as each layer finished"
    )
    print("decode tokens:   ", tokens[:, -args.new_tokens :].tolist()[0])
    print("one-process run: ", reference[:, -args.new_tokens :].tolist()[0])
    if torch.equal(tokens, reference):
        print("OK: disaggregated tokens equal the single-process generate")
    else:
        raise SystemExit("MISMATCH: disaggregated tokens differ from the single-process generate")


if __name__ == "__main__":
    main()
