// LLM-DataDist status codes and the checks that raise them with the right Python type.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>

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

// A failed check: its status as a value, and the c10 error type (`Base`) that torch turns
// into the Python type (c10::ValueError -> ValueError, and so on). Code that needs the status
// catches StatusError and reads status(); nothing reads it back out of the message. The
// message still starts with the status name: raw torch.ops.llm errors show only the message.
class C10_EXPORT StatusError {
 public:
  StatusError(Status status, std::string detail) : status_(status), detail_(std::move(detail)) {}
  virtual ~StatusError() = default;
  Status status() const noexcept { return status_; }
  // The message after "<status name>: ".
  const std::string& detail() const noexcept { return detail_; }

 private:
  Status status_;
  std::string detail_;
};

template <typename Base>
class C10_EXPORT TypedStatusError : public Base, public StatusError {
 public:
  TypedStatusError(Status status, const char* name, c10::SourceLocation where, std::string detail)
      : Base(where, std::string(name) + ": " + detail), StatusError(status, std::move(detail)) {}
};

}  // namespace kvreg

// The Python type comes from the c10 error class:
//   KVREG_CHECK_ARG   -> ValueError  (LLM_PARAM_INVALID)
//   KVREG_CHECK_INDEX -> IndexError  (LLM_PARAM_INVALID, block or batch index out of range)
//   KVREG_CHECK_TYPE  -> TypeError   (LLM_PARAM_INVALID, wrong type)
//   KVREG_CHECK       -> RuntimeError(any other status, named explicitly)
#define KVREG_FAIL_(ErrorType, status, ...)                                                    \
  throw ::kvreg::TypedStatusError<::c10::ErrorType>(                                           \
      ::kvreg::Status::status, #status, {__func__, __FILE__, static_cast<uint32_t>(__LINE__)}, \
      ::c10::str(__VA_ARGS__))
#define KVREG_CHECK_AS_(ErrorType, cond, status, ...) \
  do {                                                \
    if (C10_UNLIKELY(!(cond))) {                      \
      KVREG_FAIL_(ErrorType, status, __VA_ARGS__);    \
    }                                                 \
  } while (false)
#define KVREG_CHECK_ARG(cond, ...) KVREG_CHECK_AS_(ValueError, cond, LLM_PARAM_INVALID, __VA_ARGS__)
#define KVREG_CHECK_INDEX(cond, ...) KVREG_CHECK_AS_(IndexError, cond, LLM_PARAM_INVALID, __VA_ARGS__)
#define KVREG_CHECK_TYPE(cond, ...) KVREG_CHECK_AS_(TypeError, cond, LLM_PARAM_INVALID, __VA_ARGS__)
#define KVREG_CHECK(cond, status, ...) KVREG_CHECK_AS_(Error, cond, status, __VA_ARGS__)
