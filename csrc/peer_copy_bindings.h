// The Python bindings of same-host copies (part of torch_kvreg._C, not of the core).
#pragma once

#include <pybind11/pybind11.h>

namespace kvreg {

// Adds PeerCopyJob, PeerRoute and the peer_copy_* functions to the module.
void bind_peer_copy(pybind11::module_& m);

}  // namespace kvreg
