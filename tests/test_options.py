"""The option table (torch_kvreg/options.py) and its Python consumers: torch_kvreg.initialize
takes exactly its native keys, LLMDataDist.init and switch_role exactly its upstream keys
(and other ge.* keys), LLMConfig generates only its keys and every key it names; a bad value
gets LLM_PARAM_INVALID from every consumer and changes nothing. (The C++ copy of the table:
tests/test_sources_of_truth.py; the C++ API as a consumer: tests/test_cpp_api.py.)"""

import pytest

import torch_kvreg as kv
from torch_kvreg import options
from torch_kvreg.llm_datadist import LLMConfig, LLMDataDist, LLMRole
from torch_kvreg.options import NATIVE, OPTIONS, UPSTREAM, Check, Form

P = kv.LLMStatusCode.LLM_PARAM_INVALID
# A value each check takes, one it refuses for each way a value can be wrong.
GOOD = {
    Check.DEVICE_ID: "0",
    Check.WAIT_MS: "1500",
    Check.LISTEN_ADDRESS: "127.0.0.1:0",
    Check.LINK_SECRET: "s3cret",
    Check.SWITCH: "1",
}
BAD = {
    Check.DEVICE_ID: ["", "x", "-1", "+1", " 1", "1.0", "0x1", "²", "٣", "2147483648", "1" * 40],
    Check.WAIT_MS: ["", "0", "-5", "+5", "5 ", "1e3", "²", "2147483648", "9" * 40],
    Check.LISTEN_ADDRESS: ["", "localhost:1", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:65536", "127.0.0.1:-1", "1.2.3:4"],
    Check.LINK_SECRET: ["", "s" * (options.MAX_LINK_SECRET_BYTES + 1)],
    Check.SWITCH: ["", "2", "true", "on", " 1", "01", "١"],
}


def native_value(option):
    """A good value of an upstream key, as the facades read it, and the native value it sets."""
    check = NATIVE[option.sets]
    value = GOOD[check]
    if option.form is Form.DEVICE_LIST:
        return value + ";3", value
    return value, value


def state():
    return kv.is_initialized(), kv.is_initialized() and kv.registry.cluster_id(), kv.usage()


# --- the table --------------------------------------------------------------------------------
def test_the_table_is_well_formed():
    keys = [option.key for option in OPTIONS]
    assert len(keys) == len(set(keys)), "a key twice"
    assert set(NATIVE) == {
        options.OPTION_DEVICE_ID,
        options.OPTION_LISTEN_IP_INFO,
        options.OPTION_SYNC_KV_CACHE_WAIT_TIME,
        options.OPTION_LINK_SECRET,
        options.OPTION_VERIFY_TRANSFERS,
    }
    for option in OPTIONS:
        assert option.check is not None or option.form is not None, option
        if option.form is not None and option.form is not Form.IGNORED:
            assert option.sets in NATIVE, option  # every upstream key that acts sets a native key
        else:
            assert option.sets is None, option
        assert option.key.startswith(("llm.", "ge.")), option
    assert set(NATIVE.values()) == set(Check)
    assert set(GOOD) == set(BAD) == set(Check)


@pytest.mark.parametrize("check", list(Check))
def test_each_check_takes_its_good_value_and_refuses_bad_ones(check):
    options.check_value("key", GOOD[check], check)
    for value in BAD[check]:
        with pytest.raises(kv.LLMParamInvalidError):
            options.check_value("key", value, check)


# --- torch_kvreg.initialize --------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(NATIVE))
def test_initialize_takes_each_native_key(key):
    value = GOOD[NATIVE[key]]
    if key == options.OPTION_LISTEN_IP_INFO and not kv.remote.nixl_available():
        pytest.skip("listening needs the nixl extra")
    kv.initialize(options={key: value})
    kept = kv.registry.option(key)
    assert kept == value or (key == options.OPTION_LINK_SECRET and kept.startswith("digest:"))


@pytest.mark.parametrize("key", sorted(UPSTREAM.keys() - NATIVE.keys()) + ["llm.Bogus", "ge.exec.deviceId"])
def test_initialize_refuses_every_other_key(key):
    with pytest.raises(kv.LLMParamInvalidError, match="unknown option"):
        kv.initialize(options={key: "1"})
    assert not kv.is_initialized()


@pytest.mark.parametrize("key", sorted(NATIVE))
def test_bad_native_values_are_refused_and_change_nothing(key):
    for value in BAD[NATIVE[key]]:
        with pytest.raises(kv.LLMParamInvalidError) as info:
            kv.initialize(cluster_id=4, options={key: value})
        assert info.value.status_code == P and not kv.is_initialized(), value
        kv.initialize(cluster_id=2)  # a second initialize with a bad value changes nothing either
        before = state()
        with pytest.raises(kv.LLMParamInvalidError):
            kv.initialize(cluster_id=2, options={key: value})
        assert state() == before and kv.registry.option(key) is None, value
        kv.finalize()


# --- LLMDataDist.init and switch_role -----------------------------------------------------------
@pytest.mark.parametrize("key", sorted(UPSTREAM))
def test_the_facade_takes_each_upstream_key(key):
    option = UPSTREAM[key]
    datadist = LLMDataDist(LLMRole.DECODER, 1)
    if option.form is Form.IGNORED:
        datadist.init({key: "anything"})
        assert kv.is_initialized() and kv.registry.cluster_id() == 1
    elif option.form is Form.ADDRESS:
        datadist.init({key: ""})  # upstream's LLMConfig default: not listening
        assert kv.is_initialized() and kv.registry.option(options.OPTION_LISTEN_IP_INFO) is None
    else:
        given, native = native_value(option)
        datadist.init({key: given})
        assert kv.registry.option(option.sets) == native
    datadist.finalize()


@pytest.mark.parametrize("key", ["llm.Bogus", options.OPTION_LINK_SECRET, "llm.listenipinfo", "LLM.DeviceId"])
def test_the_facade_refuses_keys_not_in_the_table(key):
    datadist = LLMDataDist(LLMRole.DECODER, 1)
    with pytest.raises(kv.LLMParamInvalidError):
        datadist.init({key: "1"})
    assert not kv.is_initialized()
    datadist.init({"ge.anything.else": "x"})  # other ge.* keys: accepted, ignored
    with pytest.raises(kv.LLMParamInvalidError):
        datadist.switch_role(LLMRole.DECODER, {key: "1"})
    datadist.finalize()


@pytest.mark.parametrize("key", sorted(k for k, o in UPSTREAM.items() if o.form is not Form.IGNORED))
def test_bad_upstream_values_are_refused_and_change_nothing(key):
    option = UPSTREAM[key]
    bad = [v for v in BAD[NATIVE[option.sets]] if not (option.form is Form.ADDRESS and v == "")]
    for value in bad:
        datadist = LLMDataDist(LLMRole.DECODER, 1)
        with pytest.raises(kv.LLMParamInvalidError) as info:
            datadist.init({key: value})
        assert info.value.status_code == P and not kv.is_initialized(), value
        datadist.init({})
        before = state()
        with pytest.raises(kv.LLMParamInvalidError):
            datadist.switch_role(LLMRole.DECODER, {key: value})
        assert state() == before and datadist.role == LLMRole.DECODER, value
        datadist.finalize()


def test_two_keys_that_set_one_native_key_must_agree():
    assert options.from_upstream({"ge.exec.deviceId": "1;2", "ge.session_device_id": "1"}) == {"llm.DeviceId": "1"}
    with pytest.raises(kv.LLMParamInvalidError, match="disagrees"):
        LLMDataDist(LLMRole.DECODER, 1).init({"ge.exec.deviceId": "1", "llm.DeviceId": "2"})
    assert not kv.is_initialized()


# --- LLMConfig ---------------------------------------------------------------------------------
def test_llm_config_generates_the_table_keys_and_only_them():
    config = LLMConfig()
    generated_by = {option.config: option.key for option in OPTIONS if option.config is not None}
    for name in generated_by:
        assert isinstance(getattr(LLMConfig, name), property), name
    config.device_id = [1, 2]
    config.listen_ip_info = "127.0.0.1:26000"
    config.sync_kv_timeout = 1500
    config.enable_switch_role = True
    for name in ("local_comm_res", "mem_pool_cfg", "host_mem_pool_cfg", "buf_pool_cfg", "transfer_backend"):
        setattr(config, name, "x")
    config.deploy_res_path = config.cluster_info = config.global_resource_config = "x"
    config.enable_cache_manager = config.enable_remote_cache_accessible = True
    config.link_total_time, config.link_retry_count = 5, 2
    config.rdma_traffic_class, config.rdma_service_level, config.output_max_size = 1, 2, 3
    generated = config.generate_options()
    assert set(generated_by.values()) <= generated.keys()
    assert all(key in UPSTREAM for key in generated), sorted(generated.keys() - UPSTREAM.keys())
    assert options.from_upstream(generated) == {
        "llm.DeviceId": "1",
        "llm.ListenIpInfo": "127.0.0.1:26000",
        "llm.SyncKvCacheWaitTime": "1500",
    }


def test_llm_config_checks_as_the_table_does():
    config = LLMConfig()
    config.sync_kv_timeout = str(options.MAX_SYNC_KV_CACHE_WAIT_TIME_MS)
    config.device_id = options.MAX_DEVICE_ID
    for value in [*BAD[Check.WAIT_MS], 0, options.MAX_SYNC_KV_CACHE_WAIT_TIME_MS + 1]:
        with pytest.raises(kv.LLMParamInvalidError):
            config.sync_kv_timeout = value
    with pytest.raises(kv.LLMParamInvalidError):
        config.device_id = options.MAX_DEVICE_ID + 1
