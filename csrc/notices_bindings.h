// The Python bindings of the notice box (part of torch_kvreg._C, not of the core).
#pragma once

#include <pybind11/pybind11.h>

namespace kvreg {

// Adds the notices_* functions to the module.
void bind_notices(pybind11::module_& m);

}  // namespace kvreg
