// LLM-DataDist status codes and the checks that raise them with the right Python type.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace kvreg {

// Values exactly as LLM-DataDist's llm_datadist::LLMStatusCode.
enum class Status : uint32_t {
  LLM_SUCCESS = 0x0,
  LLM_FAILED = 0xFFFFFFFF,
  LLM_WAIT_PROC_TIMEOUT = 0x5010B001,
  LLM_KV_CACHE_NOT_EXIST = 0x5010B002,
  LLM_PARAM_INVALID = 0x5010B005,
  LLM_NOT_YET_LINK = 0x5010B007,
  LLM_ALREADY_LINK = 0x5010B008,
  LLM_LINK_FAILED = 0x5010B009,
  LLM_UNLINK_FAILED = 0x5010B00A,
  LLM_NOTIFY_PROMPT_UNLINK_FAILED = 0x5010B00B,
  LLM_CLUSTER_NUM_EXCEED_LIMIT = 0x5010B00C,
  LLM_PROCESSING_LINK = 0x5010B00D,
  LLM_DEVICE_OUT_OF_MEMORY = 0x5010B00E,
  LLM_EXIST_LINK = 0x5010B018,
  LLM_FEATURE_NOT_ENABLED = 0x5010B019,
  LLM_TIMEOUT = 0x5010B01A,
  LLM_LINK_BUSY = 0x5010B01B,
  LLM_OUT_OF_MEMORY = 0x5010B01C,
};

}  // namespace kvreg

// Every message starts with the status name; the Python layer maps the name back to
// LLMStatusCode. The Python type comes from the c10 error class:
//   KVREG_CHECK_ARG   -> ValueError  (LLM_PARAM_INVALID)
//   KVREG_CHECK_INDEX -> IndexError  (LLM_PARAM_INVALID, block or batch index out of range)
//   KVREG_CHECK_TYPE  -> TypeError   (LLM_PARAM_INVALID, wrong type)
//   KVREG_CHECK       -> RuntimeError(any other status, named explicitly)
#define KVREG_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, "LLM_PARAM_INVALID: ", __VA_ARGS__)
#define KVREG_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, "LLM_PARAM_INVALID: ", __VA_ARGS__)
#define KVREG_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, "LLM_PARAM_INVALID: ", __VA_ARGS__)
#define KVREG_CHECK(cond, status, ...) TORCH_CHECK(cond, #status ": ", __VA_ARGS__)
