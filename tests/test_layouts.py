"""register_layer_caches: vLLM FlashAttention (NHD and HND views), FlashInfer and MLA layer
tensors become one registration, K,V per layer in layer order, layer names kept in the
registry; anything else is refused and nothing changes. Copies through the registration
land in the engine's own tensors, block by block."""

import pytest
import torch

import torch_kvreg as kv

N, B, H, D = 16, 4, 2, 8  # blocks, block size, heads, head dim


def filled(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hnd_view(seed):
    """vLLM's HND layout: (2, N, H, B, D) memory seen as (2, N, B, H, D)."""
    return filled(2, N, H, B, D, seed=seed).permute(0, 1, 3, 2, 4)


def test_flash_attn_layers_register_k_v_per_layer(kv):
    layers = {f"model.layers.{i}.self_attn.attn": filled(2, N, B, H, D, seed=i) for i in range(3)}
    cache = kv.register_layer_caches(layers)
    assert cache.cache_desc.num_tensors == 6 and cache.cache_desc.shape == (N, B, H, D)
    tensors = list(layers.values())
    assert cache.tensor_addrs == tuple(t[kind].data_ptr() for t in tensors for kind in (0, 1))
    assert cache.layer_names == tuple(layers) and cache.tensors_per_layer == 2
    assert [cache.layer(name) for name in layers] == [0, 1, 2]
    assert kv.get_cache(cache.cache_id) == cache  # the names live in the registry
    # A block copy through the registration moves the engine's K and V of that block.
    targets = {name: torch.zeros(2, N, B, H, D) for name in layers}
    other = kv.register_layer_caches(targets)
    kv.copy_kv_blocks(cache, other, [3, 7], [0, 1])
    for name in layers:  # K and V of blocks 3, 7 of every layer, in the engine's tensors
        assert torch.equal(targets[name][:, [0, 1]], layers[name][:, [3, 7]])
        assert not targets[name][:, 2:].any()


def test_hnd_views_register_their_physical_layout(kv):
    views = [hnd_view(i) for i in range(2)]
    assert not views[0].is_contiguous()
    cache = kv.register_layer_caches(views)
    assert cache.cache_desc.shape == (N, H, B, D)  # physical: heads before block slots
    assert cache.layer_names == ("0", "1")
    target = [torch.zeros(2, N, H, B, D).permute(0, 1, 3, 2, 4) for _ in range(2)]
    other = kv.register_layer_caches(target)
    kv.copy_kv_blocks(cache, other, [5], [9])
    assert all(torch.equal(t[:, 9], v[:, 5]) for t, v in zip(target, views))  # same logical block
    assert not target[0][:, 8].any()


def test_flashinfer_and_mla_are_one_tensor_per_layer(kv):
    flashinfer = [filled(N, 2, B, H, D, seed=i) for i in range(2)]
    cache = kv.register_layer_caches(flashinfer)
    assert cache.cache_desc.num_tensors == 2 and cache.cache_desc.shape == (N, 2, B, H, D)
    assert cache.tensors_per_layer == 1
    mla = {f"layer{i}": filled(N, B, 64, seed=i) for i in range(4)}
    latent = kv.register_layer_caches(mla)
    assert latent.cache_desc.shape == (N, B, 64) and latent.tensors_per_layer == 1
    assert latent.layer("layer3") == 3


def test_shared_layers_are_registered_once(kv):
    first, second = filled(2, N, B, H, D, seed=1), filled(2, N, B, H, D, seed=2)
    cache = kv.register_layer_caches({"l0": first, "l1": second, "l2": first})  # l2 reuses l0's KV
    assert cache.cache_desc.num_tensors == 4
    assert cache.layer_names == ("l0", "l1", "l2") and cache.name_layers == (0, 1, 0)
    assert cache.layer("l2") == cache.layer("l0") == 0


def test_views_of_one_buffer_register_as_layers(kv):
    buffer = torch.zeros(3, 2, N, B, H, D)  # one allocation, a view per layer
    cache = kv.register_layer_caches([buffer[i] for i in range(3)])
    assert cache.cache_desc.num_tensors == 6
    assert cache.tensor_addrs[0] == buffer.data_ptr()


LAYOUT_CASES = [
    ("not a layout", lambda: kv.register_layer_caches([torch.zeros(4, 4)]), kv.LLMParamInvalidError),
    ("ambiguous 2x2", lambda: kv.register_layer_caches([torch.zeros(2, 2, B, H, D)]), kv.LLMParamInvalidError),
    (
        "unknown layout name",
        lambda: kv.register_layer_caches([torch.zeros(N, B, D)], layout="paged"),
        kv.LLMParamInvalidError,
    ),
    (
        "layout that does not fit",
        lambda: kv.register_layer_caches([torch.zeros(N, B, D)], layout="flash_attn"),
        kv.LLMParamInvalidError,
    ),
    (
        "mixed layouts",
        lambda: kv.register_layer_caches([torch.zeros(2, N, B, H, D), torch.zeros(N, 2, B, H, D)]),
        kv.LLMParamInvalidError,
    ),
    (
        "mixed shapes",
        lambda: kv.register_layer_caches([torch.zeros(2, N, B, H, D), torch.zeros(2, N, B, H, 4)]),
        kv.LLMParamInvalidError,
    ),
    (
        "a strided view",
        lambda: kv.register_layer_caches([torch.zeros(2, N, B, H, 2 * D)[..., ::2]]),
        kv.LLMParamInvalidError,
    ),
    ("empty", lambda: kv.register_layer_caches({}), kv.LLMParamInvalidError),
    ("not tensors", lambda: kv.register_layer_caches({"a": [1, 2]}), kv.LLMTypeError),
    ("a string", lambda: kv.register_layer_caches("layers"), kv.LLMTypeError),
    ("non-str names", lambda: kv.register_layer_caches({1: torch.zeros(N, B, D)}), kv.LLMTypeError),
    (
        "unknown layer name",
        lambda: kv.register_layer_caches({"a": torch.zeros(N, B, D)}).layer("b"),
        kv.LLMParamInvalidError,
    ),
]


@pytest.mark.parametrize("name,call,error", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_unrecognised_input_is_refused_and_changes_nothing(kv, name, call, error):
    before = (kv.usage(), kv.registered_caches())
    with pytest.raises(error):
        call()
    if name != "unknown layer name":  # that one registered a cache, then asked for a wrong name
        assert (kv.usage(), kv.registered_caches()) == before
