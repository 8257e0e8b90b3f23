// Every torch.ops.llm schema and its registration, nothing else.
#include "kernels.h"
#include "status.h"

#include <torch/library.h>

#include <memory>
#include <utility>

namespace kvreg {

namespace {

StatusReporter status_reporter = nullptr;  // set once, before any op can run

// A kernel whose failed checks go to status_reporter first.
template <auto Kernel>
struct Reported;

template <typename Result, typename... Args, Result (*Kernel)(Args...)>
struct Reported<Kernel> {
  static Result call(Args... args) {
    try {
      return Kernel(std::forward<Args>(args)...);
    } catch (const StatusError& error) {
      if (status_reporter != nullptr) {
        status_reporter(error);
      }
      throw;
    }
  }
};

}  // namespace

// The library is defined when Python imports torch_kvreg._C, not by a static initializer:
// a second copy of this library (a JIT build, a stale build folder) loaded into the same
// process then fails that import with a Python ImportError instead of aborting the process.
void register_ops(StatusReporter report) {
  static bool done = false;
  if (done) {
    return;
  }
  status_reporter = report;
  // Leaked on purpose: the registrations must outlive every static destructor.
  auto* m = new torch::Library(torch::Library::DEF, "llm", std::nullopt, __FILE__, __LINE__);
  m->set_python_module("torch_kvreg._ops");

  // Caches are resolved by id inside the kernels, never passed as mutable Tensor(a!)
  // arguments: functionalization would hand the kernel a clone and the registry would
  // see the clone's data_ptr. Ids are SymInt so that compiled graphs can pass an id
  // returned by one op into the next without a graph break.
  m->def(
      "register_kv_cache(Tensor[] caches, bool pin_host_memory=True, int remote_accessible=-1)"
      " -> SymInt");
  m->def(
      "register_kv_cache.addrs(int num_tensors, int data_type, int[] shape, int placement,"
      " int device_index, int[] addrs, bool pin_host_memory=True, int remote_accessible=-1)"
      " -> SymInt");
  m->def("unregister_kv_cache(SymInt cache_id) -> ()");
  m->def(
      "copy_kv_blocks(SymInt src_cache_id, SymInt dst_cache_id, Tensor src_blocks,"
      " Tensor dst_blocks) -> ()");
  m->def(
      "copy_kv_cache(SymInt src_cache_id, SymInt dst_cache_id, int src_batch_index=0,"
      " int dst_batch_index=0, int offset=0, int size=-1) -> ()");

  // Between processes: kernels are Python (torch_kvreg/_ops.py), the data path is NIXL.
  m->def(
      "pull_kv_blocks(int cluster_id, SymInt src_cache_id, SymInt dst_cache_id, Tensor src_blocks,"
      " Tensor dst_blocks) -> ()");
  m->def(
      "push_kv_blocks(SymInt src_cache_id, int cluster_id, SymInt dst_cache_id, Tensor src_blocks,"
      " Tensor dst_blocks) -> ()");
  m->def(
      "pull_kv_cache(int cluster_id, SymInt src_cache_id, int src_batch_index, SymInt dst_cache_id,"
      " int batch_index=0, int size=-1) -> ()");
  // Asynchronous: start returns a transfer id that wait_transfer consumes, exactly once, so a
  // compiled layer can start the next layer's load and wait for its own.
  m->def(
      "start_pull_kv_blocks(int cluster_id, SymInt src_cache_id, SymInt dst_cache_id, Tensor src_blocks,"
      " Tensor dst_blocks) -> SymInt");
  m->def("wait_transfer(SymInt transfer_id) -> ()");

  // One kernel for every device: the registry, not the argument tensors, says where the
  // cache memory lives.
  constexpr auto key = c10::DispatchKey::CompositeExplicitAutograd;
  m->impl("register_kv_cache", torch::dispatch(key, TORCH_FN(Reported<&register_kv_cache>::call)));
  m->impl(
      "register_kv_cache.addrs", torch::dispatch(key, TORCH_FN(Reported<&register_kv_cache_addrs>::call)));
  m->impl("unregister_kv_cache", torch::dispatch(key, TORCH_FN(Reported<&unregister_kv_cache>::call)));
  m->impl("copy_kv_blocks", torch::dispatch(key, TORCH_FN(Reported<&copy_kv_blocks>::call)));
  m->impl("copy_kv_cache", torch::dispatch(key, TORCH_FN(Reported<&copy_kv_cache>::call)));
  done = true;
}

}  // namespace kvreg
