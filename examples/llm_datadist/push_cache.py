"""LLM-DataDist style: both sides register batch caches; the decoder links to the prompt and
pushes its batch slot 0 into the prompt's cache, named by CacheKeyByIdAndIndex. One process
per role:

    python examples/llm_datadist/push_cache.py --role p &
    python examples/llm_datadist/push_cache.py --role d
"""

import logging

import torch.distributed as dist

from torch_kvreg.llm_datadist import (
    CacheKeyByIdAndIndex,
    LLMClusterInfo,
    LLMConfig,
    LLMDataDist,
    LLMRole,
    LLMStatusCode,
)

from common import DECODER_CLUSTER_ID, PROMPT_CLUSTER_ID, cache_memory, init_process_group, log_tensor, parse_args


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


def register(datadist, fill, args):
    desc, tensors = cache_memory(fill, args)
    cache = datadist.cache_manager.register_cache(desc, [int(t.data_ptr()) for t in tensors])
    logging.info(f"register_cache success, cache_id={cache.cache_id}")
    return cache, tensors


def prompt(datadist, args):
    cache, (tensor, tensor2) = register(datadist, 0, args)  # the first cache of this process: id 1
    dist.barrier()  # registered
    dist.barrier()  # the decoder pushed
    log_tensor("after decoder push", tensor)
    log_tensor("after decoder push tensor2", tensor2)
    dist.barrier()  # the decoder unlinked
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(datadist, args):
    cache, tensors = register(datadist, 1, args)
    dist.barrier()  # registered
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = PROMPT_CLUSTER_ID
    cluster.append_local_ip_info(args.local_host_ip, args.decoder_port)
    cluster.append_remote_ip_info(args.remote_host_ip, args.prompt_port)
    ret, _ = datadist.link_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"link failed: {ret}")
    datadist.cache_manager.push_cache(
        CacheKeyByIdAndIndex(cluster_id=PROMPT_CLUSTER_ID, cache_id=1, batch_index=0), cache, src_batch_index=0
    )
    dist.barrier()  # pushed
    ret, _ = datadist.unlink_clusters([cluster], 5000)
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"unlink failed: {ret}")
    dist.barrier()  # unlinked
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    args = parse_args(__doc__)
    role = LLMRole.PROMPT if args.role == "p" else LLMRole.DECODER
    cluster_id = PROMPT_CLUSTER_ID if args.role == "p" else DECODER_CLUSTER_ID
    datadist = start(role, cluster_id, args)
    (prompt if role == LLMRole.PROMPT else decoder)(datadist, args)
    logging.info("Sample end")
