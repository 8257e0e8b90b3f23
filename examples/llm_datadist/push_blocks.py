"""LLM-DataDist style: the decoder links to the prompt and pushes blocks into the prompt's
blocks cache, found by BlocksCacheKey. Run one process per role:

    python examples/llm_datadist/push_blocks.py --role p &
    python examples/llm_datadist/push_blocks.py --role d
"""

import logging

import torch.distributed as dist

from torch_kvreg.llm_datadist import (
    BlocksCacheKey,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMRole,
    LLMStatusCode,
)

from common import DECODER_CLUSTER_ID, PROMPT_CLUSTER_ID, init_process_group, log_tensor, parse_args, register_blocks


def start(role, cluster_id, args):
    init_process_group(cluster_id, args)
    datadist = LLMDataDist(role, cluster_id)
    config = LLMConfig()
    config.device_id = 0
    config.local_comm_res = ""
    port = args.prompt_port if role == LLMRole.PROMPT else args.decoder_port
    config.listen_ip_info = f"{args.local_host_ip}:{port}"
    datadist.init(config.generate_options())
    logging.info(f"init {role} success, cluster_id={cluster_id}")
    return datadist


def prompt(datadist, args):
    cache, (tensor, tensor2) = register_blocks(datadist, 1, PROMPT_CLUSTER_ID, args)
    dist.barrier()  # registered
    dist.barrier()  # the decoder pushed
    log_tensor("after decoder push", tensor)
    log_tensor("after decoder push tensor2", tensor2)
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = DECODER_CLUSTER_ID
    ret, _ = datadist.unlink_clusters([cluster], 5000, force=True)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(datadist, args):
    cache, tensors = register_blocks(datadist, 0, DECODER_CLUSTER_ID, args)  # keep the memory alive
    dist.barrier()  # registered
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = PROMPT_CLUSTER_ID
    cluster.append_local_ip_info(args.local_host_ip, args.decoder_port)
    cluster.append_remote_ip_info(args.remote_host_ip, args.prompt_port)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    datadist.cache_manager.push_blocks(
        BlocksCacheKey(PROMPT_CLUSTER_ID, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2]
    )
    dist.barrier()  # pushed
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
