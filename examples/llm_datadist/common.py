"""What the four LLM-DataDist-style programs here share: arguments, the process group that
stands in for the samples' barriers, and a log line a test can read back."""

import argparse
import datetime
import json
import logging
import os

import torch
import torch.distributed as dist

from torch_kvreg.llm_datadist import BlocksCacheKey, CacheDesc, DataType, Placement

logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
PROMPT_CLUSTER_ID = 0
DECODER_CLUSTER_ID = 1
NUM_TENSORS, BLOCKS_NUM, KV_SHAPE = 2, 3, 10


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--role", choices=["p", "d"], required=True, help="p: prompt, d: decoder")
    parser.add_argument("--local_host_ip", default="127.0.0.1")
    parser.add_argument("--remote_host_ip", default="127.0.0.1")
    parser.add_argument("--prompt_port", type=int, default=26000, help="the prompt's listen port")
    parser.add_argument("--decoder_port", type=int, default=26001, help="the decoder's listen port")
    parser.add_argument("--master_port", type=int, default=29500, help="torch.distributed rendezvous port")
    parser.add_argument("--device", default="cpu", help="cpu (Placement.HOST) or cuda (Placement.DEVICE)")
    return parser.parse_args()


def init_process_group(rank: int, args: argparse.Namespace) -> None:
    """Two ranks (prompt 0, decoder 1) whose barriers order the two programs' steps."""
    os.environ["MASTER_ADDR"] = min(args.local_host_ip, args.remote_host_ip)
    os.environ["MASTER_PORT"] = str(args.master_port)
    dist.init_process_group(backend="gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))


def log_tensor(label: str, tensor: torch.Tensor) -> None:
    """Logs the tensor as the samples do, plus a machine-readable line for tests."""
    logging.info(f"{label}, tensor={tensor.cpu()}")
    logging.info("RESULT %s %s", label.replace(" ", "_"), json.dumps(tensor.cpu().tolist()))


def cache_memory(fill: float, args: argparse.Namespace):
    """The samples' cache: its CacheDesc and two float tensors of [BLOCKS_NUM, KV_SHAPE]."""
    placement = Placement.HOST if args.device == "cpu" else Placement.DEVICE
    desc = CacheDesc(
        num_tensors=NUM_TENSORS, shape=[BLOCKS_NUM, KV_SHAPE], data_type=DataType.DT_FLOAT, placement=placement
    )
    tensors = [
        torch.full((BLOCKS_NUM, KV_SHAPE), fill, dtype=torch.float, device=args.device) for _ in range(NUM_TENSORS)
    ]
    return desc, tensors


def register_blocks(datadist, fill: float, own_cluster_id: int, args: argparse.Namespace):
    """A blocks cache that peers find as BlocksCacheKey(own_cluster_id, 0); keep the tensors."""
    desc, tensors = cache_memory(fill, args)
    cache = datadist.cache_manager.register_blocks_cache(
        desc, [int(t.data_ptr()) for t in tensors], BlocksCacheKey(own_cluster_id, 0)
    )
    logging.info("register_blocks_cache success")
    return cache, tensors
