"""Disaggregated prefill/decode with torch_kvreg over NIXL, end to end, on one machine.

A small decoder-only transformer (plain torch, random weights, fixed seed) with a paged KV
cache. The prefill process runs the prompt, registers its KV cache and listens; the decode
process links to it, pulls exactly the prompt's blocks into its own cache (at other block
ids) and generates tokens. The tokens must equal a single-process run.

    python examples/disaggregated_prefill_decode.py [--new-tokens 24]

Across two "hosts" on one Linux machine (root; network namespaces A and B joined by a veth
pair, UCX on TCP), the prefill worker in A listening on A's address:

    UCX_TLS=tcp ip netns exec B python examples/disaggregated_prefill_decode.py \
        --prefill-netns A --listen 10.213.1.1:0
"""

import argparse
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F

import torch_kvreg as kv

VOCAB, D_MODEL, LAYERS, HEADS, HEAD_DIM, BLOCK = 512, 256, 4, 4, 64, 16
NUM_BLOCKS = 64
PREFILL_CLUSTER, DECODE_CLUSTER = 1, 2


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, D_MODEL)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(D_MODEL, 3 * HEADS * HEAD_DIM) for _ in range(LAYERS))
        self.out = torch.nn.ModuleList(torch.nn.Linear(HEADS * HEAD_DIM, D_MODEL) for _ in range(LAYERS))
        self.mlp = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.Linear(D_MODEL, 4 * D_MODEL), torch.nn.GELU(), torch.nn.Linear(4 * D_MODEL, D_MODEL)
            )
            for _ in range(LAYERS)
        )
        self.norm = torch.nn.LayerNorm(D_MODEL)
        self.head = torch.nn.Linear(D_MODEL, VOCAB)

    @torch.no_grad()
    def forward(self, tokens, positions, kv_cache, block_table):
        """Runs ``tokens`` at ``positions``, writing their K/V into the paged cache first."""
        x = self.embed(tokens) + torch.sin(positions[:, None] / 10000 ** (torch.arange(D_MODEL) / D_MODEL))
        length = int(positions[-1]) + 1
        slots = torch.tensor(block_table)[positions // BLOCK] * BLOCK + positions % BLOCK
        for layer in range(LAYERS):
            q, k, v = self.qkv[layer](x).view(len(tokens), 3, HEADS, HEAD_DIM).unbind(1)
            k_cache, v_cache = kv_cache[2 * layer], kv_cache[2 * layer + 1]
            k_cache.view(-1, HEADS, HEAD_DIM)[slots] = k
            v_cache.view(-1, HEADS, HEAD_DIM)[slots] = v
            all_slots = torch.tensor(block_table)[torch.arange(length) // BLOCK] * BLOCK + torch.arange(length) % BLOCK
            keys = k_cache.view(-1, HEADS, HEAD_DIM)[all_slots].transpose(0, 1)
            values = v_cache.view(-1, HEADS, HEAD_DIM)[all_slots].transpose(0, 1)
            mask = positions[:, None] >= torch.arange(length)[None, :]
            attn = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask)
            x = x + self.out[layer](attn.transpose(0, 1).reshape(len(tokens), -1))
            x = x + self.mlp[layer](x)
        return self.head(self.norm(x[-1]))


def new_cache():
    return [torch.zeros(NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM) for _ in range(2 * LAYERS)]


def prefill(model, prompt, kv_cache, block_table):
    positions = torch.arange(len(prompt))
    return int(model(torch.tensor(prompt), positions, kv_cache, block_table).argmax())


def decode(model, first_token, length, kv_cache, block_table, new_tokens):
    tokens = [first_token]
    for step in range(new_tokens - 1):
        position = torch.tensor([length + step])
        tokens.append(int(model(torch.tensor([tokens[-1]]), position, kv_cache, block_table).argmax()))
    return tokens


def prompt_blocks_needed(prompt_len, new_tokens):
    return (prompt_len + new_tokens + BLOCK - 1) // BLOCK


def enter_netns(name):
    """Moves this process (before it starts any thread) into network namespace ``name``."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"cannot enter network namespace {name}")
    finally:
        os.close(fd)
    # As `ip netns exec` does: a private mount namespace whose /sys shows this namespace's
    # interfaces (UCX looks for its network devices there).
    if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "cannot unshare the mount namespace")
    libc.mount(b"none", b"/", None, 0x4000 | 0x80000, None)  # MS_REC | MS_SLAVE
    libc.umount2(b"/sys", 2)  # MNT_DETACH
    if libc.mount(name.encode(), b"/sys", b"sysfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot mount sysfs for the namespace")


def prefill_worker(prompt, block_table, to_decoder, from_decoder, listen="127.0.0.1:0", netns=None):
    if netns is not None:
        enter_netns(netns)
    kv.initialize(
        PREFILL_CLUSTER, kv.LlmRole.PROMPT, options={"llm.ListenIpInfo": listen, "llm.SyncKvCacheWaitTime": "5000"}
    )
    model = TinyLM()
    kv_cache = new_cache()
    first = prefill(model, prompt, kv_cache, block_table)
    cache = kv.register_kv_cache(kv_cache, kv.RegisterCfg(remote_accessible=True))
    to_decoder.put((kv.listen_address(), cache.cache_id, first))
    from_decoder.get()  # the decoder has pulled: the prefill worker may free its blocks
    kv.finalize()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=45)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--listen", default="127.0.0.1:0", help="the prefill worker's llm.ListenIpInfo")
    parser.add_argument("--prefill-netns", help="run the prefill worker in this network namespace (root)")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (args.prompt_len,), generator=gen).tolist()
    needed = prompt_blocks_needed(args.prompt_len, args.new_tokens)
    prompt_table = [3 * i + 1 for i in range(needed)]  # scattered blocks in the prefill cache
    decode_table = [NUM_BLOCKS - 1 - 2 * i for i in range(needed)]  # elsewhere in the decode cache
    prompt_used = (args.prompt_len + BLOCK - 1) // BLOCK

    # The reference: prefill and decode in one process.
    model = TinyLM()
    ref_cache = new_cache()
    ref_first = prefill(model, prompt, ref_cache, prompt_table)
    reference = decode(model, ref_first, args.prompt_len, ref_cache, prompt_table, args.new_tokens)

    ctx = mp.get_context("spawn")
    to_decoder, from_decoder = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(
        target=prefill_worker, args=(prompt, prompt_table, to_decoder, from_decoder, args.listen, args.prefill_netns)
    )
    worker.start()
    address, remote_cache_id, first = to_decoder.get(timeout=300)

    kv.initialize(DECODE_CLUSTER, kv.LlmRole.DECODER, options={"llm.SyncKvCacheWaitTime": "5000"})
    host, port = address.split(":")
    status, _ = kv.link_clusters([kv.ClusterInfo(PREFILL_CLUSTER, host, int(port))])
    assert status == kv.LLMStatusCode.LLM_SUCCESS, status
    kv_cache = new_cache()
    cache = kv.register_kv_cache(kv_cache)
    start = time.perf_counter()
    moved = kv.pull_kv_blocks(
        kv.CacheIndex(PREFILL_CLUSTER, remote_cache_id), cache, prompt_table[:prompt_used], decode_table[:prompt_used]
    )
    seconds = time.perf_counter() - start
    from_decoder.put("pulled")
    tokens = decode(model, first, args.prompt_len, kv_cache, decode_table, args.new_tokens)
    kv.unlink_clusters([kv.ClusterInfo(PREFILL_CLUSTER, host, int(port))])
    kv.finalize()
    worker.join(timeout=60)

    print(
        f"prompt: {args.prompt_len} tokens in {prompt_used} blocks; pulled {moved / 2**20:.2f} MiB "
        f"in {seconds * 1e3:.1f} ms ({moved / seconds / 1e9:.2f} GB/s, incl. the control round trips)"
    )
    print("decoded:", tokens)
    print("single-process reference:", reference)
    assert tokens == reference, "disaggregated decode differs from the single-process run"
    print("OK: disaggregated tokens equal the single-process run")


if __name__ == "__main__":
    main()
