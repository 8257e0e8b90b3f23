// The Python bindings of the geometry planner (part of torch_kvreg._C, not of the core).
#pragma once

#include <pybind11/pybind11.h>

namespace kvreg {

// Adds plan_geometry and copy_geometry to the module.
void bind_geometry(pybind11::module_& m);

}  // namespace kvreg
