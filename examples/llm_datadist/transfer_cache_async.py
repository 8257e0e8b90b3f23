"""LLM-DataDist style: the prompt links to the decoder and pushes its blocks cache to the
decoder's, layer by layer, each layer only once a LayerSynchronizer says it is computed.
One process per role:

    python examples/llm_datadist/transfer_cache_async.py --role p &
    python examples/llm_datadist/transfer_cache_async.py --role d
"""

import logging

import torch.distributed as dist

from torch_kvreg.llm_datadist import (
    BlocksCacheKey,
    LayerSynchronizer,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMRole,
    LLMStatusCode,
    TransferWithCacheKeyConfig,
)

from common import DECODER_CLUSTER_ID, PROMPT_CLUSTER_ID, init_process_group, log_tensor, parse_args, register_blocks


class ReadyLayers(LayerSynchronizer):
    """Reports every layer as computed (or none, with ready=False)."""

    def __init__(self, ready=True):
        self._ready = ready

    def synchronize_layer(self, layer_index: int, timeout_in_millis: int | None) -> bool:
        return self._ready


def start(role, cluster_id, args):
    init_process_group(cluster_id, args)
    datadist = LLMDataDist(role, cluster_id)
    config = LLMConfig()
    config.device_id = 0
    # Here the decoder listens and the prompt links to it.
    port = args.prompt_port if role == LLMRole.DECODER else args.decoder_port
    config.listen_ip_info = f"{args.local_host_ip}:{port}"
    config.enable_cache_manager = True
    config.enable_remote_cache_accessible = True
    datadist.init(config.generate_options())
    logging.info(f"init {role} success, cluster_id={cluster_id}")
    return datadist


def prompt(datadist, args):
    cache, tensors = register_blocks(datadist, 1, PROMPT_CLUSTER_ID, args)
    dist.barrier()  # registered
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = DECODER_CLUSTER_ID
    cluster.append_local_ip_info(args.local_host_ip, args.decoder_port)
    cluster.append_remote_ip_info(args.remote_host_ip, args.prompt_port)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    config = TransferWithCacheKeyConfig(BlocksCacheKey(DECODER_CLUSTER_ID, 0), range(0, 1), range(0, 1))
    task = datadist.cache_manager.transfer_cache_async(cache, ReadyLayers(True), [config])
    logging.info(f"transfer_cache_async results: {task.get_results()}")
    dist.barrier()  # transferred
    ret, _ = datadist.unlink_clusters([cluster], 5000, force=True)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(datadist, args):
    cache, (tensor, tensor2) = register_blocks(datadist, 0, DECODER_CLUSTER_ID, args)
    dist.barrier()  # registered
    dist.barrier()  # the prompt transferred
    log_tensor("after prompt transfer cache", tensor)
    log_tensor("after prompt transfer cache tensor2", tensor2)
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = PROMPT_CLUSTER_ID
    ret, _ = datadist.unlink_clusters([cluster], 5000, force=True)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    args = parse_args(__doc__)
    role = LLMRole.PROMPT if args.role == "p" else LLMRole.DECODER
    cluster_id = PROMPT_CLUSTER_ID if args.role == "p" else DECODER_CLUSTER_ID
    datadist = start(role, cluster_id, args)
    (prompt if role == LLMRole.PROMPT else decoder)(datadist, args)
    logging.info("Sample end")
