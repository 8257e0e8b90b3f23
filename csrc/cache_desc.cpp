// CacheDesc: the dtype table (CANN GE values) and size arithmetic with overflow checks.
#include "cache_desc.h"

#include "status.h"

#include <sstream>

namespace kvreg {

namespace {

struct DataTypeInfo {
  DataType data_type;
  at::ScalarType scalar_type;
  int64_t size;
  const char* name;
};

const DataTypeInfo kDataTypes[] = {
    {DataType::DT_FLOAT, at::kFloat, 4, "DT_FLOAT"},
    {DataType::DT_FLOAT16, at::kHalf, 2, "DT_FLOAT16"},
    {DataType::DT_INT8, at::kChar, 1, "DT_INT8"},
    {DataType::DT_INT32, at::kInt, 4, "DT_INT32"},
    {DataType::DT_UINT8, at::kByte, 1, "DT_UINT8"},
    {DataType::DT_INT16, at::kShort, 2, "DT_INT16"},
    {DataType::DT_UINT16, at::kUInt16, 2, "DT_UINT16"},
    {DataType::DT_UINT32, at::kUInt32, 4, "DT_UINT32"},
    {DataType::DT_INT64, at::kLong, 8, "DT_INT64"},
    {DataType::DT_UINT64, at::kUInt64, 8, "DT_UINT64"},
    {DataType::DT_DOUBLE, at::kDouble, 8, "DT_DOUBLE"},
    {DataType::DT_BOOL, at::kBool, 1, "DT_BOOL"},
    {DataType::DT_BF16, at::kBFloat16, 2, "DT_BF16"},
    {DataType::DT_FLOAT8_E5M2, at::kFloat8_e5m2, 1, "DT_FLOAT8_E5M2"},
    {DataType::DT_FLOAT8_E4M3FN, at::kFloat8_e4m3fn, 1, "DT_FLOAT8_E4M3FN"},
};

const DataTypeInfo* find_data_type(int64_t data_type) {
  for (const auto& info : kDataTypes) {
    if (static_cast<int64_t>(info.data_type) == data_type) {
      return &info;
    }
  }
  return nullptr;
}

}  // namespace

std::optional<DataType> data_type_from_scalar_type(at::ScalarType scalar_type) {
  for (const auto& info : kDataTypes) {
    if (info.scalar_type == scalar_type) {
      return info.data_type;
    }
  }
  return std::nullopt;
}

at::ScalarType scalar_type_from_data_type(DataType data_type) {
  const auto* info = find_data_type(static_cast<int64_t>(data_type));
  KVREG_CHECK_ARG(info != nullptr, "data type ", static_cast<int64_t>(data_type), " has no torch dtype");
  return info->scalar_type;
}

int64_t data_type_size(int64_t data_type) {
  const auto* info = find_data_type(data_type);
  return info ? info->size : 0;
}

std::string data_type_name(int64_t data_type) {
  if (data_type == static_cast<int64_t>(DataType::DT_UNDEFINED)) {
    return "DT_UNDEFINED";
  }
  const auto* info = find_data_type(data_type);
  return info ? info->name : "DataType(" + std::to_string(data_type) + ")";
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t result = 0;
  KVREG_CHECK_ARG(!__builtin_mul_overflow(a, b, &result), what, " overflows int64");
  return result;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t result = 0;
  KVREG_CHECK_ARG(!__builtin_add_overflow(a, b, &result), what, " overflows int64");
  return result;
}

CacheDesc CacheDesc::validated(
    int64_t num_tensors, int64_t data_type, std::vector<int64_t> shape, int64_t placement,
    int64_t device_index) {
  KVREG_CHECK_ARG(
      num_tensors >= 1 && num_tensors <= kMaxAddrsPerCall, "num_tensors is ", num_tensors, ", expected 1 to ",
      kMaxAddrsPerCall);
  const int64_t element_size = data_type_size(data_type);
  KVREG_CHECK_ARG(
      element_size > 0, "data_type ", data_type_name(data_type), " cannot be registered (no element size)");
  const int64_t rank = static_cast<int64_t>(shape.size());
  KVREG_CHECK_ARG(rank >= 1 && rank <= kMaxRank, "shape has rank ", rank, ", expected 1 to ", kMaxRank);
  for (int64_t d = 0; d < rank; ++d) {
    KVREG_CHECK_ARG(shape[d] > 0, "shape[", d, "] is ", shape[d], ", every dim must be positive");
  }
  KVREG_CHECK_ARG(
      placement == static_cast<int64_t>(Placement::HOST) ||
          placement == static_cast<int64_t>(Placement::DEVICE),
      "placement is ", placement, ", expected 0 (HOST) or 1 (DEVICE)");
  KVREG_CHECK_ARG(device_index >= -1, "device_index is ", device_index, ", expected -1 or more");

  CacheDesc desc;
  desc.num_tensors = num_tensors;
  desc.data_type = static_cast<DataType>(data_type);
  desc.placement = static_cast<Placement>(placement);
  desc.device_index = desc.placement == Placement::HOST ? -1 : device_index;
  desc.element_size = element_size;
  int64_t block_nbytes = element_size;
  for (int64_t d = 1; d < rank; ++d) {
    block_nbytes = checked_mul(block_nbytes, shape[d], "block size in bytes");
  }
  desc.block_nbytes = block_nbytes;
  desc.tensor_nbytes = checked_mul(block_nbytes, shape[0], "tensor size in bytes");
  desc.nbytes = checked_mul(desc.tensor_nbytes, num_tensors, "cache size in bytes");
  desc.shape = std::move(shape);
  return desc;
}

std::string CacheDesc::str() const {
  std::ostringstream out;
  out << "CacheDesc(num_tensors=" << num_tensors
      << ", data_type=" << data_type_name(static_cast<int64_t>(data_type)) << ", shape=[";
  for (size_t d = 0; d < shape.size(); ++d) {
    out << (d ? ", " : "") << shape[d];
  }
  out << "], placement=" << (placement == Placement::HOST ? "HOST" : "DEVICE")
      << ", device_index=" << device_index << ")";
  return out.str();
}

}  // namespace kvreg
