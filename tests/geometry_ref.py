"""A pure-torch reference for transfers between caches of different geometry: each cache's
tensors viewed as logical (blocks, tokens, heads, dim) K and V per layer, tokens copied by
indexing."""

import torch

from torch_kvreg import KVGeometry


def cache_tensors(geometry: KVGeometry, num_layers: int, num_blocks: int, dtype=torch.float32, seed=0):
    """The tensors a cache of this geometry registers, filled with distinct random bytes."""
    gen = torch.Generator().manual_seed(seed)
    count = num_layers * geometry.tensors_per_layer
    shape = (num_blocks, *geometry.block_shape)
    out = []
    for _ in range(count):
        raw = torch.randint(0, 256, (torch.Size(shape).numel() * dtype.itemsize,), dtype=torch.uint8, generator=gen)
        out.append(raw.view(dtype).reshape(shape))
    return out


def logical(tensors, geometry: KVGeometry):
    """Per layer (K, V), each a (blocks, tokens, heads held, dim) view of the tensors' memory."""
    layers = []
    per_layer = geometry.tensors_per_layer
    for i in range(0, len(tensors), per_layer):
        kv = []
        for k in range(2):
            order = geometry.orders[k]
            tensor = tensors[i + (0 if per_layer == 1 else k)]
            view = tensor.reshape(tensor.shape[0], *geometry.part_shape(k))
            if "k" in order:
                view = view.select(1 + order.index("k"), k)
                order = order.replace("k", "")
            kv.append(view.permute(0, *(1 + order.index(axis) for axis in "thd")))
        layers.append(tuple(kv))
    return layers


def expected_after(
    src_tensors,
    src_geometry,
    dst_tensors,
    dst_geometry,
    src_blocks,
    dst_blocks,
    num_tokens=-1,
    src_offset=0,
    dst_offset=0,
    layers=None,
    dst_layers=None,
    heads=None,
):
    """Clones of dst_tensors with the tokens copied as copy_kv_tokens promises."""
    expected = [t.clone() for t in dst_tensors]
    src_layers, dst_layer_views = logical(src_tensors, src_geometry), logical(expected, dst_geometry)
    if num_tokens == -1:
        num_tokens = len(src_blocks) * src_geometry.block_size - src_offset
    layers = range(len(src_layers)) if layers is None else layers
    dst_layers = layers if dst_layers is None else dst_layers
    shared = range(
        max(src_geometry.heads.start, dst_geometry.heads.start), min(src_geometry.heads.stop, dst_geometry.heads.stop)
    )
    heads = shared if heads is None else heads
    s = torch.arange(num_tokens) + src_offset
    d = torch.arange(num_tokens) + dst_offset
    sb = torch.tensor(src_blocks, dtype=torch.long)[s // src_geometry.block_size]
    st = s % src_geometry.block_size
    db = torch.tensor(dst_blocks, dtype=torch.long)[d // dst_geometry.block_size]
    dt = d % dst_geometry.block_size
    sh = slice(heads.start - src_geometry.heads.start, heads.stop - src_geometry.heads.start)
    dh = slice(heads.start - dst_geometry.heads.start, heads.stop - dst_geometry.heads.start)
    for sl, dl in zip(layers, dst_layers):
        for k in range(2):
            dst_view, src_view = dst_layer_views[dl][k], src_layers[sl][k]
            dst_view[db, dt, dh] = src_view[sb, st, sh]
    return expected


def same_bytes(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True))
