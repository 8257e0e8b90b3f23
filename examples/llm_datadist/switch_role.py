"""LLM-DataDist style: the decoder links to the prompt and pulls blocks; both switch roles
(the prompt stops listening, the decoder starts); the new decoder links to the new prompt,
which pushes blocks back over that link, layer by layer. One process per role:

    python examples/llm_datadist/switch_role.py --role p &
    python examples/llm_datadist/switch_role.py --role d
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
    if role == LLMRole.PROMPT:
        config.listen_ip_info = f"{args.local_host_ip}:{args.prompt_port}"
    datadist.init(config.generate_options())
    logging.info(f"init {role} success, cluster_id={cluster_id}")
    return datadist


def cluster_info(remote_cluster_id, remote_ip=None, port=None, local_ip=None):
    cluster = LLMClusterInfo()
    cluster.remote_cluster_id = remote_cluster_id
    if local_ip is not None:
        cluster.append_local_ip_info(local_ip, port)
    if remote_ip is not None:
        cluster.append_remote_ip_info(remote_ip, port)
    return cluster


def check(ret, what):
    if ret != LLMStatusCode.LLM_SUCCESS:
        raise Exception(f"{what} failed: {ret}")


def prompt(datadist, args):
    cache, (tensor, tensor2) = register_blocks(datadist, 1, PROMPT_CLUSTER_ID, args)
    dist.barrier()  # registered
    logging.info("waiting for the decoder to link and pull")
    dist.barrier()  # the decoder pulled and unlinked
    datadist.switch_role(LLMRole.DECODER)  # stops listening
    dist.barrier()  # switched
    dist.barrier()  # the decoder switched to prompt and listens
    cluster = cluster_info(DECODER_CLUSTER_ID, args.remote_host_ip, args.prompt_port, args.local_host_ip)
    check(datadist.link_clusters([cluster], 5000)[0], "link")
    dist.barrier()  # linked
    dist.barrier()  # the decoder pushed
    log_tensor("after decoder push", tensor)
    log_tensor("after decoder push tensor2", tensor2)
    check(datadist.unlink_clusters([cluster_info(DECODER_CLUSTER_ID)], 5000, force=True)[0], "unlink")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


def decoder(datadist, args):
    cache, (tensor, tensor2) = register_blocks(datadist, 0, DECODER_CLUSTER_ID, args)
    dist.barrier()  # registered
    cluster = cluster_info(PROMPT_CLUSTER_ID, args.remote_host_ip, args.prompt_port, args.local_host_ip)
    check(datadist.link_clusters([cluster], 5000)[0], "link")
    datadist.cache_manager.pull_blocks(
        BlocksCacheKey(PROMPT_CLUSTER_ID, 0), cache, src_blocks=[0, 1], dst_blocks=[0, 2]
    )
    log_tensor("after decoder pull", tensor)
    log_tensor("after decoder pull tensor2", tensor2)
    check(datadist.unlink_clusters([cluster], 5000)[0], "unlink")
    dist.barrier()  # pulled and unlinked
    dist.barrier()  # the prompt switched to decoder
    config = LLMConfig()
    config.listen_ip_info = f"{args.local_host_ip}:{args.prompt_port}"
    datadist.switch_role(LLMRole.PROMPT, config.generate_options())
    logging.info("switched to prompt; waiting for the new decoder to link")
    dist.barrier()  # listening
    dist.barrier()  # the new decoder linked
    datadist.cache_manager.push_blocks(
        BlocksCacheKey(PROMPT_CLUSTER_ID, 0),
        cache,
        src_blocks=[0, 1, 2],
        dst_blocks=[0, 1, 2],
        src_layer_range=range(0, 2),
        dst_layer_range=range(0, 2),
        tensor_num_per_layer=1,
    )
    dist.barrier()  # pushed
    check(datadist.unlink_clusters([cluster_info(PROMPT_CLUSTER_ID)], 5000, force=True)[0], "unlink")
    datadist.cache_manager.unregister_cache(cache.cache_id)
    datadist.finalize()


if __name__ == "__main__":
    args = parse_args(__doc__)
    role = LLMRole.PROMPT if args.role == "p" else LLMRole.DECODER
    cluster_id = PROMPT_CLUSTER_ID if args.role == "p" else DECODER_CLUSTER_ID
    datadist = start(role, cluster_id, args)
    (prompt if role == LLMRole.PROMPT else decoder)(datadist, args)
    logging.info("Sample end")
