"""The LLM status table and the data-type table are written out in several places (Python
enums, the internal C++ headers, the public C++ header, the C++ dtype table, the expected
values in test_types.py): every copy agrees with every other on every name and value, in
both directions, and so does what the native module does with them at run time. The option
table (torch_kvreg/options.py) and its C++ copy (csrc/options.cpp) agree row for row, and
read every option dict alike.

The reference is the Python enum (torch_kvreg/errors.py LLMStatusCode, torch_kvreg/types.py
DataType); the C++ copies are parsed as text, and, where a compiler is present, also
compiled against static_asserts of the Python values. A failure names the copy and each
name whose value differs or that is missing from one side."""

import importlib
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import _C, DataType, LLMException, LLMStatusCode, options
from torch_kvreg.errors import translate
from torch_kvreg.options import Form
from torch_kvreg.types import _TO_TORCH

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The expected values that other tests write out (pytest puts tests/ on sys.path).
test_types = importlib.import_module("test_types")
test_cpp_api = importlib.import_module("test_cpp_api")
STATUS_H = "csrc/status.h"
CACHE_DESC_H = "csrc/cache_desc.h"
CACHE_DESC_CPP = "csrc/cache_desc.cpp"
LLM_DATADIST_CPP = "csrc/llm_datadist.cpp"
PUBLIC_H = "torch_kvreg/include/llm_datadist/llm_datadist.h"
needs_cxx = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")

# torch's own names for its scalar types (c10::ScalarType), to read cache_desc.cpp's table.
AT_SCALAR_TYPES = {
    "kFloat": torch.float32,
    "kHalf": torch.float16,
    "kChar": torch.int8,
    "kInt": torch.int32,
    "kByte": torch.uint8,
    "kShort": torch.int16,
    "kUInt16": torch.uint16,
    "kUInt32": torch.uint32,
    "kLong": torch.int64,
    "kUInt64": torch.uint64,
    "kDouble": torch.float64,
    "kBool": torch.bool,
    "kBFloat16": torch.bfloat16,
    "kFloat8_e5m2": torch.float8_e5m2,
    "kFloat8_e4m3fn": torch.float8_e4m3fn,
}


def source(path: str) -> str:
    return (ROOT / path).read_text()


def without_comments(text: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def c_int(text: str, where: str) -> int:
    literal = text.strip().rstrip("uUlL")
    try:
        return int(literal, 0)
    except ValueError:
        raise AssertionError(f"{where}: {text.strip()!r} is not an integer literal") from None


def enum_block(path: str, head: str) -> dict[str, int]:
    """NAME = VALUE entries of the enum that starts with ``head`` in ``path`` (every entry
    must have an explicit value)."""
    text = without_comments(source(path))
    match = re.search(re.escape(head) + r"\s*\{(.*?)\};", text, re.S)
    assert match is not None, f"{path}: no `{head} {{...}};` found"
    table: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in match.group(1).split(","))):
        parsed = re.fullmatch(r"(\w+)\s*=\s*(.+)", entry, re.S)
        assert parsed is not None, f"{path} ({head}): entry {entry!r} has no explicit value"
        name = parsed.group(1)
        assert name not in table, f"{path} ({head}): {name} twice"
        table[name] = c_int(parsed.group(2), f"{path} ({head}) {name}")
    return table


def public_statuses() -> dict[str, int]:
    table: dict[str, int] = {}
    for name, value in re.findall(r"constexpr\s+Status\s+(\w+)\s*=\s*([^;]+);", without_comments(source(PUBLIC_H))):
        assert name not in table, f"{PUBLIC_H}: {name} twice"
        table[name] = c_int(value, f"{PUBLIC_H} {name}")
    return table


def python_members(enum_cls) -> dict[str, int]:
    # __members__ keeps aliases: a value written twice makes the second name an alias,
    # which iterating the enum would silently drop.
    return {name: int(member) for name, member in enum_cls.__members__.items()}


def describe(value) -> str:
    return f"0x{value:X}" if isinstance(value, int) and value > 0xFFFF else repr(value)


def assert_same_table(label: str, copy: dict, reference_label: str, reference: dict) -> None:
    problems = []
    for name in sorted(reference.keys() | copy.keys()):
        if name not in copy:
            problems.append(f"{name} = {describe(reference[name])} is missing from {label}")
        elif name not in reference:
            problems.append(f"{name} = {describe(copy[name])} is in {label} but not in {reference_label}")
        elif copy[name] != reference[name]:
            problems.append(
                f"{name} is {describe(copy[name])} in {label} but {describe(reference[name])} in {reference_label}"
            )
    assert not problems, f"{label} disagrees with {reference_label}:\n  " + "\n  ".join(problems)


def assert_values_distinct(label: str, table: dict) -> None:
    seen: dict = {}
    for name, value in table.items():
        assert value not in seen, f"{label}: {name} and {seen[value]} share the value {describe(value)}"
        seen[value] = name


# --- the status table -------------------------------------------------------------------

STATUS_REFERENCE = "torch_kvreg/errors.py (LLMStatusCode)"
STATUS_COPIES = {
    f"{STATUS_H} (kvreg::Status)": lambda: enum_block(STATUS_H, "enum class Status : uint32_t"),
    f"{PUBLIC_H} (llm_datadist::LLM_*)": public_statuses,
    "tests/test_types.py (EXPECTED_STATUS)": lambda: dict(test_types.EXPECTED_STATUS),
}


def test_status_reference_is_the_upstream_table():
    statuses = python_members(LLMStatusCode)
    assert_values_distinct(STATUS_REFERENCE, statuses)
    assert len(statuses) == 18 and statuses["LLM_SUCCESS"] == 0 and statuses["LLM_FAILED"] == 0xFFFFFFFF
    assert all(0 <= value <= 0xFFFFFFFF for value in statuses.values())  # a uint32_t in C++


@pytest.mark.parametrize("label", sorted(STATUS_COPIES))
def test_status_copy_agrees(label):
    copy = STATUS_COPIES[label]()
    assert_values_distinct(label, copy)
    assert_same_table(label, copy, STATUS_REFERENCE, python_members(LLMStatusCode))


def test_statuses_the_native_code_raises_are_table_names():
    """KVREG_CHECK names its status as a kvreg::Status enumerator (the compiler checks it); the
    scan shows the names are the table's and finds the statuses raised today."""
    statuses = python_members(LLMStatusCode)
    raised = set()
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            code = without_comments(path.read_text())
            raised |= set(re.findall(r"KVREG_CHECK\s*\((?:[^;]*?),\s*(LLM_\w+)\s*,", code, re.S))
    assert {"LLM_FAILED", "LLM_KV_CACHE_NOT_EXIST", "LLM_OUT_OF_MEMORY"} <= raised  # the scan finds them
    assert raised <= statuses.keys(), f"csrc raises {sorted(raised - statuses.keys())}, not LLMStatusCode names"


def test_statuses_travel_as_values_never_read_from_text():
    """A failed check carries its status as a value (kvreg::StatusError): the C++ API returns
    it (its values equal kvreg::Status's: the header tests below), Python reads the
    `status_code` the native module sets. Neither looks at the message's status name."""
    api = without_comments(source(LLM_DATADIST_CPP))
    assert re.search(
        r"catch\s*\(\s*const\s+kvreg::StatusError&\s*(\w+)\s*\)\s*\{\s*return\s+static_cast<Status>"
        r"\(\s*\1\.status\(\)\s*\)",
        api,
    ), f"{LLM_DATADIST_CPP}: guarded() does not return a StatusError's status"
    for text_search in ("strncmp", "strcmp", "what_without_backtrace", '"LLM_'):
        assert text_search not in api, f"{LLM_DATADIST_CPP} reads statuses from text ({text_search})"
    errors_py = source("torch_kvreg/errors.py")
    assert "import re" not in errors_py and "LLM_[" not in errors_py
    for name in LLMStatusCode.__members__:
        assert translate(RuntimeError(f"{name}: looks like a status")) is None
        assert translate(ValueError(f"{name}: looks like a status")) is None


def test_raw_status_literals_in_csrc_are_the_status_they_name():
    """A status written as a number (bindings.cpp's bridge runs where status.h's names are
    not in scope) is a value of the table, and that of the status its line names."""
    values = set(python_members(LLMStatusCode).values())
    found = 0
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in (".cpp", ".h", ".cu", ".cuh") or path.name == "status.h":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for literal in re.findall(r"\b0x(?:5010B0[0-9A-Fa-f]{2}|FFFFFFFF)U?\b", line):
                found += 1
                value = c_int(literal, f"{path.name}:{number}")
                assert value in values, f"{path.name}:{number}: {literal} is no status: {line.strip()}"
                for name in re.findall(r"\bLLM_\w+", line):
                    assert LLMStatusCode[name] == value, f"{path.name}:{number}: {literal} is not {name}"
    assert found >= 2  # bindings.cpp's LLM_FEATURE_NOT_ENABLED and LLM_FAILED


def native_error(call, expected_type):
    """The error ``call`` raises: exactly ``expected_type`` (what torch makes of the c10
    type), its message the status name and the detail, the status as a value on it."""
    with pytest.raises(expected_type) as info:
        call()
    error = info.value
    assert type(error) is expected_type, type(error)
    assert (
        isinstance(error.status_code, int) and str(error) == f"{LLMStatusCode(error.status_code).name}: {error.detail}"
    )
    return error


def test_status_crosses_from_native_errors():
    """An error the native module or a raw op raises carries its status as a value, and
    comes out as the LLMException of that status."""
    kv.initialize()
    src, dst = (int(torch.ops.llm.register_kv_cache([torch.zeros(4, 2)])) for _ in range(2))
    cases = [
        (lambda: _C.get_cache(987654), RuntimeError, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, KeyError),
        (
            lambda: _C.plan_blocks((1, DataType.DT_UNDEFINED, [2, 1], 0, -1), 1, (1, 0, [2, 1], 0, -1), 2, *blocks()),
            ValueError,
            LLMStatusCode.LLM_PARAM_INVALID,
            ValueError,
        ),
        (
            lambda: torch.ops.llm.unregister_kv_cache(987654),
            RuntimeError,
            LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
            KeyError,
        ),
        (
            lambda: torch.ops.llm.copy_kv_blocks(src, dst, torch.tensor([4]), torch.tensor([0])),
            IndexError,
            LLMStatusCode.LLM_PARAM_INVALID,
            IndexError,
        ),
        (
            lambda: torch.ops.llm.copy_kv_blocks(src, dst, torch.tensor([0.5]), torch.tensor([0])),
            TypeError,
            LLMStatusCode.LLM_PARAM_INVALID,
            TypeError,
        ),
        (
            lambda: _C.copy_blocks(src, dst, torch.tensor([0, 1]), torch.tensor([3, 3])),
            ValueError,
            LLMStatusCode.LLM_PARAM_INVALID,
            ValueError,
        ),
    ]
    for call, raw_type, status, llm_type in cases:
        error = native_error(call, raw_type)
        assert error.status_code == status
        translated = translate(error)
        assert isinstance(translated, LLMException) and isinstance(translated, llm_type)
        assert translated.status_code == status and translated.detail == error.detail
    kv.finalize()
    with pytest.raises(kv.LLMException) as info:  # through a public wrapper: LLM_FAILED, not initialized
        kv.register_kv_cache(torch.zeros(2))
    assert info.value.status_code == LLMStatusCode.LLM_FAILED


# --- the data-type table ----------------------------------------------------------------

DTYPE_REFERENCE = "torch_kvreg/types.py (DataType)"
DTYPE_COPIES = {
    f"{CACHE_DESC_H} (kvreg::DataType)": lambda: enum_block(CACHE_DESC_H, "enum class DataType : int64_t"),
    f"{PUBLIC_H} (llm_datadist::DataType)": lambda: enum_block(PUBLIC_H, "enum DataType : int32_t"),
    "tests/test_types.py (EXPECTED_DTYPES + DT_UNDEFINED)": lambda: {
        **{name: value for name, (value, _) in test_types.EXPECTED_DTYPES.items()},
        "DT_UNDEFINED": 28,  # test_enum_values
    },
}


def cache_desc_table() -> dict[str, tuple[int, torch.dtype, int]]:
    """cache_desc.cpp's kDataTypes: name -> (value, torch dtype, element size)."""
    enum = enum_block(CACHE_DESC_H, "enum class DataType : int64_t")
    text = without_comments(source(CACHE_DESC_CPP))
    body = re.search(r"kDataTypes\[\]\s*=\s*\{(.*?)\n\};", text, re.S)
    assert body is not None, f"{CACHE_DESC_CPP}: no kDataTypes table"
    rows = re.findall(r"\{\s*DataType::(\w+)\s*,\s*at::(\w+)\s*,\s*(\d+)\s*,\s*\"(\w+)\"\s*\}", body.group(1))
    assert len(rows) == body.group(1).count("{"), f"{CACHE_DESC_CPP}: a kDataTypes row does not parse"
    table = {}
    for name, scalar, size, text_name in rows:
        assert text_name == name, f"{CACHE_DESC_CPP} kDataTypes: DataType::{name} is named {text_name!r}"
        assert scalar in AT_SCALAR_TYPES, f"{CACHE_DESC_CPP} kDataTypes: {name} -> at::{scalar}, unknown here"
        assert name not in table, f"{CACHE_DESC_CPP} kDataTypes: {name} twice"
        table[name] = (enum[name], AT_SCALAR_TYPES[scalar], int(size))
    return table


def python_torch_table() -> dict[str, tuple[int, torch.dtype, int]]:
    return {data_type.name: (int(data_type), dtype, dtype.itemsize) for data_type, dtype in _TO_TORCH.items()}


def test_dtype_reference_is_consistent():
    data_types = python_members(DataType)
    assert_values_distinct(DTYPE_REFERENCE, data_types)
    assert len(data_types) == 16 and data_types["DT_UNDEFINED"] == 28
    # Every data type but DT_UNDEFINED has a torch dtype, each its own.
    assert set(python_torch_table()) == set(data_types) - {"DT_UNDEFINED"}
    assert_values_distinct("torch_kvreg/types.py (_TO_TORCH)", {d.name: t for d, t in _TO_TORCH.items()})
    for data_type, dtype in _TO_TORCH.items():
        assert DataType.from_torch(dtype) is data_type and data_type.itemsize == dtype.itemsize


@pytest.mark.parametrize("label", sorted(DTYPE_COPIES))
def test_dtype_copy_agrees(label):
    copy = DTYPE_COPIES[label]()
    assert_values_distinct(label, copy)
    assert_same_table(label, copy, DTYPE_REFERENCE, python_members(DataType))


TORCH_COPIES = {
    f"{CACHE_DESC_CPP} (kDataTypes)": cache_desc_table,
    "tests/test_types.py (EXPECTED_DTYPES)": lambda: {
        name: (value, dtype, dtype.itemsize) for name, (value, dtype) in test_types.EXPECTED_DTYPES.items()
    },
}


@pytest.mark.parametrize("label", sorted(TORCH_COPIES))
def test_torch_dtype_mapping_agrees(label):
    """(value, torch dtype, element size) of every data type that has a torch dtype."""
    assert_same_table(label, TORCH_COPIES[label](), "torch_kvreg/types.py (_TO_TORCH)", python_torch_table())


def test_other_test_constants_agree():
    assert (test_cpp_api.DT_FLOAT, test_cpp_api.DT_FLOAT16) == (DataType.DT_FLOAT, DataType.DT_FLOAT16)


def blocks():
    return torch.tensor([0]), torch.tensor([1]), 1 << 20


def test_native_element_sizes_and_refusals_agree():
    """What the compiled C++ table does: every data type with a torch dtype has its element
    size, DT_UNDEFINED and every value outside the table are refused."""
    sizes = {}
    for value in range(0, 64):
        desc = (1, value, [2, 1], 0, -1)
        try:
            segments = _C.plan_blocks(desc, 1, desc, 1, *blocks(), True)
        except ValueError as exc:
            assert "LLM_PARAM_INVALID" in str(exc)
            continue
        sizes[value] = int(segments[0, 2])
    expected = {int(data_type): dtype.itemsize for data_type, dtype in _TO_TORCH.items()}
    assert_same_table("the native module (plan_blocks element sizes)", sizes, "torch_kvreg/types.py", expected)


def test_native_scalar_types_map_to_the_python_data_types():
    kv.initialize()
    found = {}
    for dtype in [*_TO_TORCH.values(), torch.complex64, torch.complex128]:
        try:
            cache_id = int(torch.ops.llm.register_kv_cache([torch.zeros(2, 4, dtype=dtype)]))
        except ValueError as exc:
            assert "no LLM DataType" in str(exc)
            continue
        found[str(dtype)] = _C.get_cache(cache_id).data_type
        torch.ops.llm.unregister_kv_cache(cache_id)
    expected = {str(dtype): int(data_type) for data_type, dtype in _TO_TORCH.items()}
    assert_same_table("the native module (register_kv_cache data_type)", found, "torch_kvreg/types.py", expected)


# --- the option table -------------------------------------------------------------------

OPTIONS_H = "csrc/options.h"
OPTIONS_CPP = "csrc/options.cpp"
CPP_FORMS = {"kSame": Form.SAME, "kDeviceList": Form.DEVICE_LIST, "kAddress": Form.ADDRESS, "kIgnored": Form.IGNORED}


def cpp_option_constants() -> dict[str, str]:
    """options.h's constexpr values by name, as text (string contents unquoted)."""
    text = without_comments(source(OPTIONS_H))
    found = dict(re.findall(r"constexpr\s+char\s+(\w+)\[\]\s*=\s*\"([^\"]*)\";", text))
    found |= {name: value for name, value in re.findall(r"constexpr\s+int64_t\s+(\w+)\s*=\s*(\w+);", text)}
    return found


def cpp_upstream_table() -> dict[str, tuple[Form, str | None]]:
    """options.cpp's kUpstreamOptions: key -> (form, native key set)."""
    constants = cpp_option_constants()
    text = without_comments(source(OPTIONS_CPP))
    body = re.search(r"kUpstreamOptions\[\]\s*=\s*\{(.*?)\n\};", text, re.S)
    assert body is not None, f"{OPTIONS_CPP}: no kUpstreamOptions table"
    rows = re.findall(r"\{\s*\"([^\"]+)\"\s*,\s*Form::(\w+)\s*,\s*(\w+)\s*\}", body.group(1))
    assert len(rows) == body.group(1).count("{"), f"{OPTIONS_CPP}: a kUpstreamOptions row does not parse"
    table = {}
    for key, form, sets in rows:
        assert key not in table, f"{OPTIONS_CPP}: {key} twice"
        assert form in CPP_FORMS, f"{OPTIONS_CPP}: {key} has Form::{form}, not one of options.py's forms"
        assert sets == "nullptr" or sets in constants, f"{OPTIONS_CPP}: {key} sets {sets}, not an options.h key"
        table[key] = (CPP_FORMS[form], None if sets == "nullptr" else constants[sets])
    prefix = re.search(r"kIgnoredPrefix\[\]\s*=\s*\"([^\"]*)\"", text)
    assert prefix is not None and prefix.group(1) == options.IGNORED_PREFIX, f"{OPTIONS_CPP}: kIgnoredPrefix"
    return table


def test_cpp_option_table_agrees():
    python = {key: (option.form, option.sets) for key, option in options.UPSTREAM.items()}
    assert_same_table(f"{OPTIONS_CPP} (kUpstreamOptions)", cpp_upstream_table(), "torch_kvreg/options.py", python)
    constants = cpp_option_constants()
    expected = {
        "kOptionDeviceId": options.OPTION_DEVICE_ID,
        "kOptionListenIpInfo": options.OPTION_LISTEN_IP_INFO,
        "kOptionSyncKvCacheWaitTime": options.OPTION_SYNC_KV_CACHE_WAIT_TIME,
        "kOptionVerifyTransfers": options.OPTION_VERIFY_TRANSFERS,
        "kDefaultSyncKvCacheWaitTimeMs": str(options.DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS),
        "kMaxDeviceId": str(options.MAX_DEVICE_ID),
        "kMaxSyncKvCacheWaitTimeMs": str(options.MAX_SYNC_KV_CACHE_WAIT_TIME_MS),
    }
    assert_same_table(OPTIONS_H, constants, "torch_kvreg/options.py", expected)
    # The public header's option names are the table's.
    public = dict(re.findall(r"constexpr\s+const\s+char\s+(OPTION_\w+)\[\]\s*=\s*\"([^\"]*)\";", source(PUBLIC_H)))
    assert public and set(public.values()) <= options.UPSTREAM.keys(), f"{PUBLIC_H}: {public}"


def upstream_corpus() -> list[dict[str, str]]:
    """Option dicts for both readers: each upstream key with good and bad values (listen
    addresses only good or empty: the C++ API leaves checking them to the Python layer),
    unknown keys, other ge.* keys, and keys that set one native key."""
    values = ["0", "7", "1;2", "3;x", ";1", "", "x", "-1", "+1", " 1", "1 ", "0x1", "1.5", "²", "٣", "007"]
    values += ["2147483647", "2147483648", "99999999999999999999"]
    corpus: list[dict[str, str]] = [{}]
    for key, option in options.UPSTREAM.items():
        if option.form is Form.ADDRESS:
            corpus += [{key: ""}, {key: "127.0.0.1:26000"}, {key: "[::1]:0"}]
        else:
            corpus += [{key: value} for value in values]
    for key in ("llm.Bogus", "ge.whatever", "ge.", "GE.exec.deviceId", "llm.listenipinfo", "llm.LinkSecret", ""):
        corpus.append({key: "1"})
    corpus += [
        {"ge.exec.deviceId": "1;2", "ge.session_device_id": "1", "llm.SyncKvCacheWaitTime": "10"},
        {"ge.exec.deviceId": "1", "llm.DeviceId": "2"},
        {"llm.listenIpInfo": "127.0.0.1:1", "llm.ListenIpInfo": "127.0.0.1:2"},
        {"llm.listenIpInfo": "127.0.0.1:1", "llm.ListenIpInfo": ""},
        {"llm.BufPoolCfg": "{}", "llm.MemoryUtilization": "0.9", "llm.DeviceId": "3"},
    ]
    return corpus


def read_upstream(reader, given: dict[str, str]):
    """What ``reader`` makes of ``given``: the native options, or the status it raised."""
    try:
        return reader(given)
    except (ValueError, TypeError, RuntimeError) as exc:
        error = translate(exc)
        assert error is not None, f"{given}: {exc!r} carries no status"
        return error.status_code


def test_cpp_reads_upstream_options_as_python_does():
    """The C++ API's reading of LLM-DataDist options (csrc/options.cpp) and the Python
    facade's (torch_kvreg.options.from_upstream), value for value."""
    corpus = upstream_corpus()
    assert len(corpus) > 300
    for given in corpus:
        expected = read_upstream(options.from_upstream, given)
        assert read_upstream(_C.upstream_options, given) == expected, given


# --- names and compiled values ----------------------------------------------------------


def test_every_status_and_dtype_name_written_is_a_real_one():
    """A status name in a message, a doc or the C++ code that is not in the table would go
    untranslated (errors.translate) or document nothing."""
    statuses, data_types = python_members(LLMStatusCode), python_members(DataType)
    paths = [ROOT / "README.md", ROOT / "SECURITY.md"]
    for folder in ("csrc", "torch_kvreg", "examples"):
        paths += [
            p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".pyi", ".cpp", ".h", ".cu", ".cuh", ".md")
        ]
    unknown = []
    for path in paths:
        text = path.read_text()
        unknown += [
            f"{path.relative_to(ROOT)}: {n}" for n in set(re.findall(r"\bLLM_[A-Z0-9_]+", text)) - statuses.keys()
        ]
        unknown += [
            f"{path.relative_to(ROOT)}: {n}" for n in set(re.findall(r"\bDT_[A-Z0-9_]+", text)) - data_types.keys()
        ]
    assert not unknown, "names that are no status or data type:\n  " + "\n  ".join(sorted(unknown))


def static_asserts(header: str, statuses: str | None, data_types: str) -> str:
    lines = [f'#include "{header}"', "#include <cstdint>"]
    for name, value in python_members(LLMStatusCode).items() if statuses else ():
        lines.append(
            f"static_assert(static_cast<uint32_t>({statuses.format(name)}) == 0x{value:X}U,"
            f' "{header}: {name} is not 0x{value:X} as in errors.py");'
        )
    for name, value in python_members(DataType).items():
        lines.append(
            f"static_assert(static_cast<int64_t>({data_types.format(name)}) == {value},"
            f' "{header}: {name} is not {value} as in types.py");'
        )
    return "\n".join(lines) + "\n"


def compile_check(tmp_path, code: str, *flags: str) -> None:
    path = tmp_path / "check.cpp"
    path.write_text(code)
    result = subprocess.run(["c++", "-fsyntax-only", *flags, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "error" in line)


@needs_cxx
def test_public_header_compiles_to_the_python_values(tmp_path):
    code = static_asserts("llm_datadist/llm_datadist.h", "llm_datadist::{}", "llm_datadist::{}")
    compile_check(tmp_path, code, "-std=c++17", f"-I{ROOT / 'torch_kvreg' / 'include'}")


@needs_cxx
def test_internal_headers_compile_to_the_python_values(tmp_path):
    from torch.utils.cpp_extension import include_paths

    code = static_asserts("status.h", "kvreg::Status::{}", "kvreg::DataType::{}")
    code = code.replace('#include "status.h"', '#include "status.h"\n#include "cache_desc.h"')
    compile_check(tmp_path, code, "-std=c++20", "-w", f"-I{ROOT / 'csrc'}", *(f"-I{p}" for p in include_paths()))
