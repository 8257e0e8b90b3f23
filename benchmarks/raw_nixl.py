"""The raw NIXL baseline of the remote benchmarks: a plain nixl_cu12 agent pair over UCX
registering the same tensors as ours, with hand-made per-block descriptors in prepared
descriptor lists. The agent is made as torch_kvreg makes its own (make_agent: UCX, a
progress thread that pauses between polls), so both sides pay for the same threads."""

import numpy as np


def reg_rows(tensors):
    """NIXL registration rows (address, bytes, device 0, no name) of whole tensors."""
    return [(t.data_ptr(), t.numel() * t.element_size(), 0, "") for t in tensors]


def wait(agent, handle):
    """Posts transfer ``handle`` and polls it to its end (the way NIXL's examples do)."""
    state = agent.transfer(handle)
    while state == "PROC":
        state = agent.check_xfer_state(handle)
    assert state == "DONE", state


def per_block_rows(addrs, num_blocks, block_nbytes):
    """Descriptor rows (address, bytes, device 0) of every block of every tensor at
    ``addrs``, tensor-major: block b of tensor t is row t * num_blocks + b."""
    base = np.asarray(addrs, dtype=np.uint64)[:, None] + np.arange(num_blocks, dtype=np.uint64)[None, :] * block_nbytes
    rows = np.zeros((base.size, 3), dtype=np.uint64)
    rows[:, 0], rows[:, 1] = base.reshape(-1), block_nbytes
    return rows


def block_indices(num_tensors, num_blocks, blocks):
    """Indices into per_block_rows' list of ``blocks`` of every tensor, as NIXL takes them."""
    idx = np.arange(num_tensors)[:, None] * num_blocks + np.asarray(blocks)[None, :]
    return idx.reshape(-1).astype(np.int32)


class RawReader:
    """This process's raw agent, connected to one or more peers' raw agents, with prepared
    per-block lists of the local tensors and of each peer's; ``start`` posts a READ (or
    WRITE) of blocks and returns its handle (poll it with ``agent.check_xfer_state``)."""

    def __init__(self, name, tensors, num_blocks, block_nbytes):
        from torch_kvreg.remote.agent import make_agent

        self.agent = make_agent(name)
        self.agent.register_memory(reg_rows(tensors), "DRAM")
        self.num_tensors, self.num_blocks = len(tensors), num_blocks
        self.block_nbytes = block_nbytes
        self.local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", per_block_rows([t.data_ptr() for t in tensors], num_blocks, block_nbytes), "DRAM"
        )
        self.peers = {}

    def connect(self, key, metadata, remote_addrs):
        """Loads a peer's agent metadata and prepares the per-block list of its tensors."""
        name = self.agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else name
        self.agent.make_connection(name)
        self.peers[key] = (
            name,
            self.agent.prep_xfer_dlist(name, per_block_rows(remote_addrs, self.num_blocks, self.block_nbytes), "DRAM"),
        )
        return name

    def start(self, key, src_blocks, dst_blocks, operation="READ"):
        _, remote = self.peers[key]
        handle = self.agent.make_prepped_xfer(
            operation,
            self.local,
            block_indices(self.num_tensors, self.num_blocks, dst_blocks),
            remote,
            block_indices(self.num_tensors, self.num_blocks, src_blocks),
        )
        if self.agent.transfer(handle) == "ERR":
            raise RuntimeError("raw NIXL transfer failed to post")
        return handle
