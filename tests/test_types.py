import dataclasses

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import CacheDesc, DataType, LLMStatusCode, Placement

EXPECTED_STATUS = {
    "LLM_SUCCESS": 0x0,
    "LLM_FAILED": 0xFFFFFFFF,
    "LLM_WAIT_PROC_TIMEOUT": 0x5010B001,
    "LLM_KV_CACHE_NOT_EXIST": 0x5010B002,
    "LLM_PARAM_INVALID": 0x5010B005,
    "LLM_NOT_YET_LINK": 0x5010B007,
    "LLM_ALREADY_LINK": 0x5010B008,
    "LLM_LINK_FAILED": 0x5010B009,
    "LLM_UNLINK_FAILED": 0x5010B00A,
    "LLM_NOTIFY_PROMPT_UNLINK_FAILED": 0x5010B00B,
    "LLM_CLUSTER_NUM_EXCEED_LIMIT": 0x5010B00C,
    "LLM_PROCESSING_LINK": 0x5010B00D,
    "LLM_DEVICE_OUT_OF_MEMORY": 0x5010B00E,
    "LLM_EXIST_LINK": 0x5010B018,
    "LLM_FEATURE_NOT_ENABLED": 0x5010B019,
    "LLM_TIMEOUT": 0x5010B01A,
    "LLM_LINK_BUSY": 0x5010B01B,
    "LLM_OUT_OF_MEMORY": 0x5010B01C,
}

EXPECTED_DTYPES = {
    "DT_FLOAT": (0, torch.float32),
    "DT_FLOAT16": (1, torch.float16),
    "DT_INT8": (2, torch.int8),
    "DT_INT32": (3, torch.int32),
    "DT_UINT8": (4, torch.uint8),
    "DT_INT16": (6, torch.int16),
    "DT_UINT16": (7, torch.uint16),
    "DT_UINT32": (8, torch.uint32),
    "DT_INT64": (9, torch.int64),
    "DT_UINT64": (10, torch.uint64),
    "DT_DOUBLE": (11, torch.float64),
    "DT_BOOL": (12, torch.bool),
    "DT_BF16": (27, torch.bfloat16),
    "DT_FLOAT8_E5M2": (35, torch.float8_e5m2),
    "DT_FLOAT8_E4M3FN": (36, torch.float8_e4m3fn),
}


def test_status_codes_exact():
    assert {s.name: s.value for s in LLMStatusCode} == EXPECTED_STATUS


def test_enum_values():
    assert (kv.Placement.HOST, kv.Placement.DEVICE) == (0, 1)
    assert (kv.LlmRole.PROMPT, kv.LlmRole.DECODER, kv.LlmRole.MIX) == (1, 2, 3)
    assert kv.LLMRole is kv.LlmRole
    assert DataType.DT_UNDEFINED == 28


@pytest.mark.parametrize("name", sorted(EXPECTED_DTYPES))
def test_data_type_round_trip(name):
    value, dtype = EXPECTED_DTYPES[name]
    assert DataType[name] == value
    assert DataType.from_torch(dtype) is DataType[name]
    assert DataType[name].to_torch() is dtype


def test_data_type_without_mapping():
    with pytest.raises(kv.LLMParamInvalidError) as info:
        DataType.from_torch(torch.complex64)
    assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(kv.LLMParamInvalidError):
        DataType.DT_UNDEFINED.to_torch()
    with pytest.raises(kv.LLMTypeError):
        DataType.from_torch("float16")


def test_cache_desc_sizes_and_value_semantics():
    desc = CacheDesc(64, DataType.DT_FLOAT16, [1024, 16, 8, 128])
    assert desc.shape == (1024, 16, 8, 128)
    assert desc.block_nbytes == 16 * 8 * 128 * 2 == 32768
    assert desc.tensor_nbytes == 1024 * 32768
    assert desc.nbytes == 64 * 1024 * 32768
    assert desc == CacheDesc(64, 1, (1024, 16, 8, 128), Placement.DEVICE, -1)
    assert hash(desc) == hash(CacheDesc(64, 1, (1024, 16, 8, 128)))
    assert "2.00 GiB" in repr(desc) and "DT_FLOAT16" in repr(desc)
    with pytest.raises(dataclasses.FrozenInstanceError):
        desc.num_tensors = 3  # immutable


def test_cache_desc_from_tensors():
    tensors = [torch.zeros(4, 3, 2, dtype=torch.bfloat16) for _ in range(3)]
    desc = CacheDesc.from_tensors(tensors)
    assert desc == CacheDesc(3, DataType.DT_BF16, (4, 3, 2), Placement.HOST, -1)
    assert CacheDesc.from_tensors(tensors[0]).num_tensors == 1
    with pytest.raises(kv.LLMParamInvalidError):
        CacheDesc.from_tensors([tensors[0], torch.zeros(4, 3, 2)])


def test_cache_desc_rejects_wrong_types():
    with pytest.raises(kv.LLMTypeError):
        CacheDesc(1.5, DataType.DT_FLOAT, (2,))
    with pytest.raises(kv.LLMTypeError):
        CacheDesc(1, DataType.DT_FLOAT, "22")
    with pytest.raises(kv.LLMParamInvalidError):
        CacheDesc(1, 99, (2,))


def test_reprs_and_equality():
    assert repr(kv.Limits(240, 50 * 2**30, 20 * 2**30)) == (
        "Limits(max_addrs=240, max_device_bytes=50.00 GiB, max_host_bytes=20.00 GiB)"
    )
    assert kv.Usage(0, 0, 0, 0) == kv.Usage(0, 0, 0, 0)
    assert "host_bytes=1.50 KiB" in repr(kv.Usage(1, 1, 0, 1536))
    assert kv.CacheIndex(1, 2) == kv.CacheIndex(1, 2, 0)
    assert kv.RegisterCfg() == kv.RegisterCfg(True, None)
    assert kv.ClusterInfo(1, "127.0.0.1", 1) == kv.ClusterInfo(1, "127.0.0.1", 1)
    cache = kv.Cache(7, CacheDesc(3, DataType.DT_INT8, (4,), Placement.HOST), (16, 32, 48))
    assert "cache_id=7" in repr(cache) and "0x10" in repr(cache) and "3 in all" in repr(cache)


def test_exception_family():
    e = kv.LLMKVCacheNotExistError(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "cache id 3 is not registered")
    assert isinstance(e, KeyError) and isinstance(e, kv.LLMException) and isinstance(e, RuntimeError)
    assert str(e) == "LLM_KV_CACHE_NOT_EXIST: cache id 3 is not registered"
    assert issubclass(kv.LLMParamInvalidError, ValueError)
    assert issubclass(kv.LLMIndexError, IndexError)
    assert issubclass(kv.LLMTypeError, TypeError)
