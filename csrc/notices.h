// Completion notices that peers sent, queued for whoever waits for them: one box per process,
// filled by the threads that read peers' control links and drained by get_notifications()
// and wait_notices(). A waiter blocks on a condition variable, without the GIL, until a
// notice is put or its timeout passes.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace kvreg::notices {

// At most this many notices wait in the box; further ones are dropped (and counted) until
// someone drains it, so that a peer flooding notices nobody reads cannot exhaust memory.
constexpr size_t kMaxQueued = 1 << 16;

// Queues a notice from `cluster_id` (-1: a sender this process has no link with) and wakes
// every waiter. False when the box is full and the notice was dropped.
bool put(int64_t cluster_id, std::string message);

// Every queued notice, oldest first; the box is left empty.
std::vector<std::pair<int64_t, std::string>> take();

// What wait() ended on.
constexpr int64_t kQueued = 1;    // the box holds a notice
constexpr int64_t kTimedOut = 0;  // timeout_ms passed with none
constexpr int64_t kWoken = -1;    // wake() or clear() came first (finalize)

// Blocks until the box holds a notice, wake() is called, or `timeout_ms` passes (-1: no
// limit; 0: only looks; longer than kMaxWaitMs waits kMaxWaitMs). Returns kQueued, kTimedOut
// or kWoken.
int64_t wait(int64_t timeout_ms);

// The longest one wait() blocks (about 24.8 days; the clock never overflows).
constexpr int64_t kMaxWaitMs = (int64_t{1} << 31) - 1;

// Wakes every waiter now (finalize, or a notice that arrived by another route).
void wake();

// Notices dropped because the box was full, since the process started.
int64_t dropped();

// How many notices wait in the box now.
int64_t queued();

// Empties the box (finalize).
void clear();

}  // namespace kvreg::notices
