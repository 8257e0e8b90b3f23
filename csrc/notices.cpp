// The process's box of completion notices (notices.h).
#include "notices.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>

namespace kvreg::notices {
namespace {

struct Box {
  std::mutex lock;
  std::condition_variable landed;
  std::deque<std::pair<int64_t, std::string>> queue;
  uint64_t wakes = 0;  // counts wake(): a waiter returns on one that came after it started
  int64_t dropped = 0;
};

Box& box() {
  // Never destroyed: reader threads of peers' links may still put at interpreter exit.
  static Box* instance = new Box();
  return *instance;
}

}  // namespace

bool put(int64_t cluster_id, std::string message) {
  Box& b = box();
  {
    std::lock_guard<std::mutex> guard(b.lock);
    if (b.queue.size() >= kMaxQueued) {
      ++b.dropped;
      return false;
    }
    b.queue.emplace_back(cluster_id, std::move(message));
  }
  b.landed.notify_all();
  return true;
}

std::vector<std::pair<int64_t, std::string>> take() {
  Box& b = box();
  std::lock_guard<std::mutex> guard(b.lock);
  std::vector<std::pair<int64_t, std::string>> out(
      std::make_move_iterator(b.queue.begin()), std::make_move_iterator(b.queue.end()));
  b.queue.clear();
  return out;
}

int64_t wait(int64_t timeout_ms) {
  Box& b = box();
  std::unique_lock<std::mutex> guard(b.lock);
  const uint64_t wakes = b.wakes;
  auto ready = [&] { return !b.queue.empty() || b.wakes != wakes; };
  if (timeout_ms < 0) {
    b.landed.wait(guard, ready);
  } else if (timeout_ms > 0) {
    b.landed.wait_for(guard, std::chrono::milliseconds(std::min(timeout_ms, kMaxWaitMs)), ready);
  }
  if (!b.queue.empty()) {
    return kQueued;
  }
  return b.wakes != wakes ? kWoken : kTimedOut;
}

void wake() {
  Box& b = box();
  {
    std::lock_guard<std::mutex> guard(b.lock);
    ++b.wakes;
  }
  b.landed.notify_all();
}

int64_t dropped() {
  Box& b = box();
  std::lock_guard<std::mutex> guard(b.lock);
  return b.dropped;
}

int64_t queued() {
  Box& b = box();
  std::lock_guard<std::mutex> guard(b.lock);
  return static_cast<int64_t>(b.queue.size());
}

void clear() {
  Box& b = box();
  {
    std::lock_guard<std::mutex> guard(b.lock);
    b.queue.clear();
    ++b.wakes;
  }
  b.landed.notify_all();
}

}  // namespace kvreg::notices
