// Same-host copies between processes with process_vm_readv/writev on native worker threads.
#include "peer_copy.h"

#include "host_copy.h"
#include "status.h"

#include <pthread.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>

namespace kvreg::peer_copy {
namespace {
class Pool;
}  // namespace

struct Job::Shared {
  Shared(
      Pool& pool, int64_t pid, bool read, int64_t pause_us, bool watched, uint64_t nbytes,
      std::shared_ptr<const void> mapping);
  ~Shared();
  Shared(const Shared&) = delete;
  Shared& operator=(const Shared&) = delete;

  Pool& pool;  // the pool of the process that made it: the one whose threads copy for it
  const int64_t pid;
  const bool read;
  const int64_t pause_us;  // before each system call: tests make copies slow enough to cut
  const bool watched;      // its end counts in ends() and ends wait_ends()
  const uint64_t nbytes;
  int64_t tasks = 0;  // set when submitted
  // Set: the peer's memory is mapped here and pieces are copied in this process.
  const std::shared_ptr<const void> mapping;
  std::atomic<bool> cancelled{false};
  std::atomic<int64_t> error{0};  // -errno of the first failure
  int64_t tasks_left = 0;         // under Pool::mutex_
  bool ended = false;             // under Pool::mutex_
};

namespace {

// The kernel takes at most this many iovecs per call (IOV_MAX on Linux).
constexpr size_t kMaxIovecs = 1024;
// A job is split into tasks of these sizes, about four per worker: enough for a waiting
// caller to take some (help()), small enough that a deadline passes between two.
constexpr uint64_t kMinTaskBytes = 256 << 10;
constexpr uint64_t kMaxTaskBytes = 4 << 20;

struct Task {
  std::shared_ptr<Job::Shared> job;  // the job's state outlives its handle while a task holds it
  std::vector<Piece> pieces;
  std::function<int64_t()> body;  // set: the task's whole work, instead of pieces
};

// Runs a task's body: 0, -errno, or kCancelled for a job cancelled before it started.
int64_t run_body(const Job::Shared& job, const std::function<int64_t()>& body) {
  if (job.pause_us > 0) {
    std::this_thread::sleep_for(std::chrono::microseconds(job.pause_us));
  }
  if (job.cancelled.load(std::memory_order_relaxed)) {
    return kCancelled;
  }
  try {
    return body();
  } catch (...) {
    return -static_cast<int64_t>(EIO);  // nothing may escape a worker thread
  }
}

// Copies `pieces` of a job whose peer memory is mapped here; 0 or kCancelled.
int64_t copy_mapped(const Job::Shared& job, const std::vector<Piece>& pieces) {
  constexpr size_t kRunsPerStep = 256;  // between two looks at a pause or a cancel
  HostRun runs[kRunsPerStep];
  size_t next = 0;
  while (next < pieces.size()) {
    if (job.pause_us > 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(job.pause_us));
    }
    if (job.cancelled.load(std::memory_order_relaxed)) {
      return kCancelled;
    }
    const size_t count = std::min(kRunsPerStep, pieces.size() - next);
    for (size_t i = 0; i < count; ++i) {
      const Piece& piece = pieces[next + i];
      auto* local = reinterpret_cast<char*>(piece.local);
      auto* remote = reinterpret_cast<char*>(piece.remote);
      runs[i] = job.read ? HostRun{remote, local, static_cast<int64_t>(piece.nbytes)}
                         : HostRun{local, remote, static_cast<int64_t>(piece.nbytes)};
    }
    copy_host_runs(runs, count);
    next += count;
  }
  return 0;
}

// Moves `pieces` for `job`; returns 0 or -errno.
int64_t move_pieces(const Job::Shared& job, std::vector<Piece>& pieces) {
  if (job.mapping) {
    return copy_mapped(job, pieces);
  }
  iovec local[kMaxIovecs];
  iovec remote[kMaxIovecs];
  size_t next = 0;
  while (next < pieces.size()) {
    if (job.pause_us > 0) {
      std::this_thread::sleep_for(std::chrono::microseconds(job.pause_us));
    }
    if (job.cancelled.load(std::memory_order_relaxed)) {
      return kCancelled;
    }
    const size_t count = std::min(kMaxIovecs, pieces.size() - next);
    uint64_t wanted = 0;
    for (size_t i = 0; i < count; ++i) {
      const Piece& piece = pieces[next + i];
      local[i] = {reinterpret_cast<void*>(piece.local), static_cast<size_t>(piece.nbytes)};
      remote[i] = {reinterpret_cast<void*>(piece.remote), static_cast<size_t>(piece.nbytes)};
      wanted += piece.nbytes;
    }
    const ssize_t moved =
        job.read ? process_vm_readv(static_cast<pid_t>(job.pid), local, count, remote, count, 0)
                 : process_vm_writev(static_cast<pid_t>(job.pid), local, count, remote, count, 0);
    if (moved < 0) {
      if (errno == EINTR) {
        continue;
      }
      return -static_cast<int64_t>(errno);
    }
    if (moved == 0 && wanted > 0) {
      return -static_cast<int64_t>(EFAULT);  // nothing moved: an address the kernel refused
    }
    // A partial move stops at a page the kernel could not reach or at its own limit:
    // go on from where it stopped (a second refusal is then reported as an error).
    uint64_t left = static_cast<uint64_t>(moved);
    while (left > 0) {
      Piece& piece = pieces[next];
      const uint64_t step = std::min(left, piece.nbytes);
      piece.local += step;
      piece.remote += step;
      piece.nbytes -= step;
      left -= step;
      if (piece.nbytes == 0) {
        ++next;
      }
    }
    while (next < pieces.size() && pieces[next].nbytes == 0) {
      ++next;
    }
  }
  return 0;
}

class Pool {
 public:
  // Every start, look and wait comes here: no system call and no shared lock on the way
  // (getpid() is one, on every call, since glibc 2.25).
  static Pool& instance() {
    Pool* pool = current_.load(std::memory_order_acquire);
    return pool != nullptr ? *pool : make_instance();
  }

  std::shared_ptr<Job::Shared> start(
      int64_t pid, bool read, std::vector<Piece> pieces, bool watched, std::shared_ptr<const void> mapping) {
    uint64_t total = 0;
    for (const Piece& piece : pieces) {
      total += piece.nbytes;
    }
    auto job =
        std::make_shared<Job::Shared>(*this, pid, read, test_pause_us(), watched, total, std::move(mapping));
    std::vector<Task> tasks;
    const uint64_t per_task = task_bytes(total);
    Task current{job, {}, {}};
    uint64_t in_current = 0;
    for (Piece piece : pieces) {
      while (piece.nbytes > 0) {
        const uint64_t step = std::min(piece.nbytes, per_task - in_current);
        current.pieces.push_back({piece.local, piece.remote, step});
        piece.local += step;
        piece.remote += step;
        piece.nbytes -= step;
        in_current += step;
        if (in_current == per_task) {
          tasks.push_back(std::move(current));
          current = Task{job, {}, {}};
          in_current = 0;
        }
      }
    }
    if (!current.pieces.empty()) {
      tasks.push_back(std::move(current));
    }
    return submit(job, std::move(tasks));
  }

  std::shared_ptr<Job::Shared> start_bodies(
      uint64_t nbytes, std::vector<std::function<int64_t()>> bodies, bool watched,
      std::shared_ptr<const void> mapping) {
    auto job =
        std::make_shared<Job::Shared>(*this, 0, false, test_pause_us(), watched, nbytes, std::move(mapping));
    std::vector<Task> tasks;
    tasks.reserve(bodies.size());
    for (auto& body : bodies) {
      tasks.push_back(Task{job, {}, std::move(body)});
    }
    return submit(job, std::move(tasks));
  }

  uint64_t task_bytes(uint64_t total) const {
    return std::clamp<uint64_t>(total / (4 * static_cast<uint64_t>(workers_)), kMinTaskBytes, kMaxTaskBytes);
  }

  std::shared_ptr<Job::Shared> submit(const std::shared_ptr<Job::Shared>& job, std::vector<Task> tasks) {
    std::unique_lock<std::mutex> lock(mutex_);
    start_workers_locked();
    job->tasks_left = static_cast<int64_t>(tasks.size());
    job->tasks = job->tasks_left;
    if (tasks.empty()) {
      job->ended = true;
      ended_.notify_all();
      if (job->watched) {
        ++ends_;
        watchers_.notify_all();
      }
    }
    for (Task& task : tasks) {
      queue_.push_back(std::move(task));
    }
    // Only idle workers need a wake-up (a busy one takes the next task without sleeping):
    // a burst of small starts then costs no system call per start while the workers copy.
    const size_t wake = std::min(tasks.size(), idle_workers_);
    lock.unlock();
    if (wake >= static_cast<size_t>(workers_)) {
      work_.notify_all();
    } else {
      for (size_t i = 0; i < wake; ++i) {
        work_.notify_one();
      }
    }
    return job;
  }

  int64_t state(const Job::Shared& job) {
    std::lock_guard<std::mutex> lock(mutex_);
    return state_locked(job);
  }

  int64_t wait(const Job::Shared& job, int64_t timeout_ms) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto ended = [&] { return job.ended; };
    if (timeout_ms < 0) {
      ended_.wait(lock, ended);
    } else {
      ended_.wait_for(lock, std::chrono::milliseconds(timeout_ms), ended);
    }
    return state_locked(job);
  }

  int64_t help(const Job::Shared& job, int64_t timeout_ms) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(std::max<int64_t>(timeout_ms, 0));
    std::unique_lock<std::mutex> lock(mutex_);
    while (!job.ended && !queue_.empty() && (timeout_ms < 0 || std::chrono::steady_clock::now() < deadline)) {
      run_one_locked(lock);
    }
    // The rest is on the workers: wait for it.
    auto ended = [&] { return job.ended; };
    if (timeout_ms < 0) {
      ended_.wait(lock, ended);
    } else {
      ended_.wait_until(lock, deadline, ended);
    }
    return state_locked(job);
  }

  int64_t wakes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return wakes_;
  }

  int64_t ends() {
    std::lock_guard<std::mutex> lock(mutex_);
    return ends_;
  }

  bool wait_ends(int64_t ends_seen, int64_t wakes_seen, int64_t timeout_ms) {
    using Clock = std::chrono::steady_clock;
    std::unique_lock<std::mutex> lock(mutex_);
    const auto until =
        timeout_ms < 0 ? Clock::time_point::max() : Clock::now() + std::chrono::milliseconds(timeout_ms);
    while (true) {
      if (ends_ != ends_seen || wakes_ != wakes_seen) {
        return true;
      }
      const auto now = Clock::now();
      if (now >= watch_at_) {
        watch_at_ = Clock::time_point::max();  // one watch, one return
        return true;
      }
      if (now >= until) {
        return false;
      }
      watchers_.wait_until(lock, std::min(until, watch_at_));
    }
  }

  void watch(int64_t delay_ms) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto at = std::chrono::steady_clock::now() + std::chrono::milliseconds(delay_ms);
      if (at >= watch_at_) {
        return;  // an earlier look is set already (every start of a burst asks for one)
      }
      watch_at_ = at;
    }
    watchers_.notify_all();  // a wait_ends() under way takes the earlier time, without returning now
  }

  void wake() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++wakes_;
    }
    watchers_.notify_all();
  }

  int64_t live_jobs() const { return live_.load(); }
  void count_job(int64_t change) { live_.fetch_add(change); }

  int64_t workers() const { return workers_; }

 private:
  Pool() : workers_(configured_workers()) {}

  // TORCH_KVREG_PEER_COPY_TEST_PAUSE_US (0 to 10 s): a pause before every system call of a
  // job, read when it is submitted. For tests that cut a peer or a deadline mid-copy.
  static int64_t test_pause_us() {
    const char* text = std::getenv("TORCH_KVREG_PEER_COPY_TEST_PAUSE_US");
    if (text == nullptr || *text == '\0') {
      return 0;
    }
    char* end = nullptr;
    const long long value = std::strtoll(text, &end, 10);
    return *end == '\0' && value > 0 && value <= 10000000 ? value : 0;
  }

  static int64_t configured_workers() {
    const char* text = std::getenv("TORCH_KVREG_PEER_COPY_THREADS");
    if (text != nullptr && *text != '\0') {
      char* end = nullptr;
      const long value = std::strtol(text, &end, 10);
      KVREG_CHECK_ARG(
          *end == '\0' && value >= 1 && value <= 64, "TORCH_KVREG_PEER_COPY_THREADS must be 1 to 64, got '",
          text, "'");
      return value;
    }
    // One core is left to the threads that compute beside the copies (a prefill pushing
    // layer by layer); a caller that waits for a copy works on it too (help()).
    const int64_t cores = static_cast<int64_t>(std::thread::hardware_concurrency());
    return std::clamp<int64_t>(cores - 1, 1, 4);
  }

  void start_workers_locked() {
    if (!threads_.empty()) {
      return;
    }
    for (int64_t i = 0; i < workers_; ++i) {
      threads_.emplace_back([this] { work(); });
      threads_.back().detach();
    }
  }

  static int64_t state_locked(const Job::Shared& job) {
    if (!job.ended) {
      return kRunning;
    }
    const int64_t error = job.error.load();
    return error != 0 ? error : kDone;
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      while (queue_.empty()) {
        ++idle_workers_;
        work_.wait(lock);
        --idle_workers_;
      }
      run_one_locked(lock);
    }
  }

  static Pool& make_instance() {
    std::lock_guard<std::mutex> lock(guard_);
    Pool* pool = current_.load(std::memory_order_acquire);
    if (pool == nullptr) {
      static std::once_flag registered;
      // A forked child has none of its parent's threads: it starts a pool of its own (the
      // parent's object is left as it is, its mutex possibly held by a thread that is gone).
      // The child's guard is made anew too: a thread of the parent may have held it.
      std::call_once(registered, [] {
        pthread_atfork(nullptr, nullptr, [] {
          new (&guard_) std::mutex();
          current_.store(nullptr);
        });
      });
      pool = new Pool();  // never freed: worker threads may outlive static destruction
      current_.store(pool, std::memory_order_release);
    }
    return *pool;
  }

  static inline std::atomic<Pool*> current_{nullptr};  // this process's pool, once made
  static inline std::mutex guard_;                     // making it

  // Runs the task at the head of the queue (not empty) without the lock. The task, and with
  // it perhaps the job's last reference, goes before the lock is let go: whoever sees the
  // job ended sees no task of it holding its state.
  void run_one_locked(std::unique_lock<std::mutex>& lock) {
    Task task = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    Job::Shared& job = *task.job;
    if (job.error.load() == 0) {
      const int64_t result = task.body ? run_body(job, task.body) : move_pieces(job, task.pieces);
      if (result != 0) {
        int64_t none = 0;
        job.error.compare_exchange_strong(none, result);
      }
    }
    lock.lock();
    if (--job.tasks_left > 0) {
      return;
    }
    job.ended = true;
    if (job.watched) {
      ++ends_;
      watchers_.notify_all();
    }
    ended_.notify_all();
  }

  const int64_t workers_;
  std::mutex mutex_;
  std::condition_variable work_;
  std::condition_variable ended_;     // a job ended: its waiters (wait(), help())
  std::condition_variable watchers_;  // a watched job ended, wake() or watch(): wait_ends()
  std::deque<Task> queue_;
  std::vector<std::thread> threads_;
  std::atomic<int64_t> live_{0};  // Job::Shared objects alive
  size_t idle_workers_ = 0;       // workers waiting for a task (under mutex_)
  int64_t wakes_ = 0;             // wake() calls so far
  int64_t ends_ = 0;              // watched jobs ended so far
  // When a wait_ends() returns though nothing ended and nobody woke it (watch()).
  std::chrono::steady_clock::time_point watch_at_ = std::chrono::steady_clock::time_point::max();
};

// The pool that runs `job`; raises for a job of the process this one was forked from.
Pool& pool_of(const Job::Shared& job) {
  Pool& pool = Pool::instance();
  KVREG_CHECK_ARG(
      &job.pool == &pool, "a same-host copy job of the process this one was forked from has no threads here");
  return pool;
}

}  // namespace

Job::Shared::Shared(
    Pool& pool, int64_t pid, bool read, int64_t pause_us, bool watched, uint64_t nbytes,
    std::shared_ptr<const void> mapping)
    : pool(pool),
      pid(pid),
      read(read),
      pause_us(pause_us),
      watched(watched),
      nbytes(nbytes),
      mapping(std::move(mapping)) {
  pool.count_job(1);
}

Job::Shared::~Shared() {
  pool.count_job(-1);
}

Job::Job(int64_t pid, bool read, std::vector<Piece> pieces, bool watched) {
  KVREG_CHECK_ARG(pid > 0, "a same-host copy needs the peer's pid, got ", pid);
  for (const Piece& piece : pieces) {
    KVREG_CHECK_ARG(
        piece.local + piece.nbytes >= piece.local && piece.remote + piece.nbytes >= piece.remote,
        "a same-host copy piece wraps the address space");
  }
  shared_ = Pool::instance().start(pid, read, std::move(pieces), watched, nullptr);
}

Job::Job(std::shared_ptr<const void> mapping, bool read, std::vector<Piece> pieces, bool watched) {
  KVREG_CHECK_ARG(mapping != nullptr, "a copy from mapped peer memory needs its mapping");
  for (const Piece& piece : pieces) {
    KVREG_CHECK_ARG(
        piece.local + piece.nbytes >= piece.local && piece.remote + piece.nbytes >= piece.remote,
        "a same-host copy piece wraps the address space");
  }
  shared_ = Pool::instance().start(0, read, std::move(pieces), watched, std::move(mapping));
}

Job::Job(
    std::shared_ptr<const void> mapping, uint64_t nbytes, std::vector<std::function<int64_t()>> bodies,
    bool watched) {
  KVREG_CHECK_ARG(mapping != nullptr, "a copy from mapped peer memory needs its mapping");
  for (const auto& body : bodies) {
    KVREG_CHECK_ARG(body != nullptr, "a copy from mapped peer memory needs its work");
  }
  shared_ = Pool::instance().start_bodies(nbytes, std::move(bodies), watched, std::move(mapping));
}

Job::~Job() {
  // A thread copying for the job keeps its state; the job stops at its next system call.
  shared_->cancelled.store(true);
}

int64_t Job::state() const {
  return pool_of(*shared_).state(*shared_);
}
int64_t Job::wait(int64_t timeout_ms) const {
  return pool_of(*shared_).wait(*shared_, timeout_ms);
}
int64_t Job::help(int64_t timeout_ms) const {
  return pool_of(*shared_).help(*shared_, timeout_ms);
}
void Job::cancel() const {
  shared_->cancelled.store(true);
}
uint64_t Job::nbytes() const {
  return shared_->nbytes;
}
int64_t Job::tasks() const {
  return shared_->tasks;  // set before the constructor returned, never changed
}

uint64_t task_bytes(uint64_t nbytes) {
  return Pool::instance().task_bytes(nbytes);
}

std::vector<Piece> segment_pieces(
    const std::vector<uint64_t>& local_bases, const std::vector<uint64_t>& remote_bases, size_t count,
    const uint64_t* local_offsets, const uint64_t* remote_offsets, const uint64_t* lengths) {
  std::vector<Piece> pieces;
  pieces.reserve(local_bases.size() * count);
  for (size_t t = 0; t < local_bases.size(); ++t) {
    for (size_t j = 0; j < count; ++j) {
      pieces.push_back({local_bases[t] + local_offsets[j], remote_bases[t] + remote_offsets[j], lengths[j]});
    }
  }
  return pieces;
}

int64_t wakes() {
  return Pool::instance().wakes();
}
int64_t ends() {
  return Pool::instance().ends();
}
bool wait_ends(int64_t ends_seen, int64_t wakes_seen, int64_t timeout_ms) {
  return Pool::instance().wait_ends(ends_seen, wakes_seen, timeout_ms);
}
void watch(int64_t delay_ms) {
  KVREG_CHECK_ARG(delay_ms >= 0, "a watch takes a delay of 0 ms or more, got ", delay_ms);
  Pool::instance().watch(delay_ms);
}
void wake() {
  Pool::instance().wake();
}
int64_t live_jobs() {
  return Pool::instance().live_jobs();
}
int64_t threads() {
  return Pool::instance().workers();
}

int64_t peek(int64_t pid, uint64_t address, size_t nbytes, std::string& out) {
  KVREG_CHECK_ARG(nbytes <= 4096, "peek reads at most 4096 bytes, asked for ", nbytes);
  if (pid <= 0) {
    return -static_cast<int64_t>(ESRCH);
  }
  out.assign(nbytes, '\0');
  iovec local{out.data(), nbytes};
  iovec remote{reinterpret_cast<void*>(address), nbytes};
  const ssize_t moved = process_vm_readv(static_cast<pid_t>(pid), &local, 1, &remote, 1, 0);
  if (moved < 0) {
    return -static_cast<int64_t>(errno);
  }
  return static_cast<size_t>(moved) == nbytes ? 0 : -static_cast<int64_t>(EFAULT);
}

}  // namespace kvreg::peer_copy
