// CacheDesc: the dtype table (CANN GE values) and size arithmetic with overflow checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kvreg {

// CANN GE DataType values, as LLM-DataDist uses them.
enum class DataType : int64_t {
  DT_FLOAT = 0,
  DT_FLOAT16 = 1,
  DT_INT8 = 2,
  DT_INT32 = 3,
  DT_UINT8 = 4,
  DT_INT16 = 6,
  DT_UINT16 = 7,
  DT_UINT32 = 8,
  DT_INT64 = 9,
  DT_UINT64 = 10,
  DT_DOUBLE = 11,
  DT_BOOL = 12,
  DT_BF16 = 27,
  DT_UNDEFINED = 28,
  DT_FLOAT8_E5M2 = 35,
  DT_FLOAT8_E4M3FN = 36,
};

enum class Placement : int64_t { HOST = 0, DEVICE = 1 };

constexpr int64_t kMaxAddrsPerCall = 240;
constexpr int64_t kMaxRank = 32;

std::optional<DataType> data_type_from_scalar_type(at::ScalarType scalar_type);
// The torch dtype of a data type; LLM_PARAM_INVALID for DT_UNDEFINED.
at::ScalarType scalar_type_from_data_type(DataType data_type);
// Bytes per element; 0 for DT_UNDEFINED and values outside the table.
int64_t data_type_size(int64_t data_type);
std::string data_type_name(int64_t data_type);

// a * b, or LLM_PARAM_INVALID naming `what` when it does not fit in int64.
int64_t checked_mul(int64_t a, int64_t b, const char* what);
int64_t checked_add(int64_t a, int64_t b, const char* what);

struct CacheDesc {
  int64_t num_tensors = 0;
  DataType data_type = DataType::DT_UNDEFINED;
  std::vector<int64_t> shape;
  Placement placement = Placement::DEVICE;
  int64_t device_index = -1;

  // Filled in by validated(): sizes in bytes.
  int64_t element_size = 0;
  int64_t block_nbytes = 0;   // one dim-0 slice of one tensor
  int64_t tensor_nbytes = 0;  // one tensor
  int64_t nbytes = 0;         // all tensors

  int64_t num_blocks() const { return shape.empty() ? 0 : shape[0]; }

  // Checks every field (LLM_PARAM_INVALID on failure) and computes the sizes.
  static CacheDesc validated(
      int64_t num_tensors, int64_t data_type, std::vector<int64_t> shape, int64_t placement,
      int64_t device_index);

  std::string str() const;
};

}  // namespace kvreg
