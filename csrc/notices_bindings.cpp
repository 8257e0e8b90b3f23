// The Python bindings of the notice box: control-link readers put, waiters block without the GIL.
#include "notices_bindings.h"

#include "notices.h"

#include <pybind11/stl.h>

#include <string>
#include <utility>

namespace py = pybind11;

namespace kvreg {

void bind_notices(py::module_& m) {
  m.def(
      "notices_put",
      [](int64_t cluster_id, py::bytes message) { return notices::put(cluster_id, std::string(message)); },
      py::arg("cluster_id"), py::arg("message"),
      "Queues a peer's notice (cluster_id -1: no link) and wakes waiters; False if the box was full.");
  m.def(
      "notices_take",
      [] {
        auto taken = notices::take();
        py::list out(taken.size());
        for (size_t i = 0; i < taken.size(); ++i) {
          out[i] = py::make_tuple(taken[i].first, py::bytes(taken[i].second));
        }
        return out;
      },
      "Every queued notice as (cluster_id, message), oldest first; the box is left empty.");
  m.def(
      "notices_wait", &notices::wait, py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>(),
      "Blocks without the GIL until a notice is queued (1), timeout_ms passes (0; -1: no limit) or "
      "notices_wake() / notices_clear() (-1).");
  m.def("notices_wake", &notices::wake, "Wakes every thread in notices_wait now.");
  m.def("notices_dropped", &notices::dropped, "Notices dropped because the box was full.");
  m.def("notices_queued", &notices::queued, "Notices waiting in the box.");
  m.def("notices_clear", &notices::clear, "Empties the box and wakes waiters.");
}

}  // namespace kvreg
