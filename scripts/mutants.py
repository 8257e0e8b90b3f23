"""Plants small bugs, one at a time, in a copy of the tree and checks that the suite catches
each one (``make test-mutants``).

Every mutant replaces one exact piece of text (which must occur exactly once) by a wrong
one: off-by-one bounds, dropped checks, swapped arguments, wrong defaults, skipped waits.
The copy is built once; a C++ mutant rebuilds only its file. The suite runs with ``-x``,
the tests most likely to catch the mutant first, so a killed mutant costs seconds. Prints
one line per mutant and exits 1 if any survived (or no longer applies).

    python scripts/mutants.py              # all of them
    python scripts/mutants.py -k lease     # those whose name contains "lease"
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (name, file, original text, planted text, test files to run first)
MUTANTS = [
    # --- the registry (C++) ---------------------------------------------------------------
    (
        "overlap: a range ending where a live one starts counts",
        "csrc/registry.cpp",
        "auto it = intervals_.lower_bound(end);",
        "auto it = intervals_.upper_bound(end);",
        ["tests/test_registry.py"],
    ),
    (
        "overlap: a range starting where a live one ends counts",
        "csrc/registry.cpp",
        "return it->second.end > start ? it->second.cache_id : 0;",
        "return it->second.end >= start ? it->second.cache_id : 0;",
        ["tests/test_registry.py"],
    ),
    (
        "overlap within one call: touching refused",
        "csrc/registry.cpp",
        "starts[k - 1].first + span <= starts[k].first",
        "starts[k - 1].first + span < starts[k].first",
        ["tests/test_registry.py"],
    ),
    (
        "address cap off by one",
        "csrc/registry.cpp",
        "total_addrs <= limits.max_addrs, LLM_OUT_OF_MEMORY",
        "total_addrs < limits.max_addrs, LLM_OUT_OF_MEMORY",
        ["tests/test_registry.py", "tests/test_model_based.py"],
    ),
    (
        "byte cap off by one",
        "csrc/registry.cpp",
        "total_bytes <= max_bytes, LLM_OUT_OF_MEMORY",
        "total_bytes < max_bytes, LLM_OUT_OF_MEMORY",
        ["tests/test_registry.py", "tests/test_model_based.py"],
    ),
    (
        "unregister forgets the address count",
        "csrc/registry.cpp",
        "usage_.num_addrs -= desc.num_tensors;",
        "usage_.num_addrs -= 1;",
        ["tests/test_model_based.py"],
    ),
    (
        "unregister ignores a transfer in flight",
        "csrc/registry.cpp",
        "if (!idle && it != entries_.end()) {",
        "if (false && !idle && it != entries_.end()) {",
        ["tests/test_model_based.py", "tests/test_control.py"],
    ),
    (
        "a block both read and written within one cache allowed",
        "csrc/copy_blocks.cpp",
        'shared < 0, "block "',
        'true, "block "',
        ["tests/test_bad_inputs.py"],
    ),
    (
        "cache keys may repeat across registrations",
        "csrc/registry.cpp",
        'it == keys_.end(), "cache key \'"',
        'true, "cache key \'"',
        ["tests/test_llm_datadist.py"],
    ),
    (
        "end of a transfer not counted (skipped wake-up)",
        "csrc/registry.cpp",
        "      it->second.in_flight -= 1;\n    }\n  }\n  transfers_done_.notify_all();",
        "    }\n  }\n  transfers_done_.notify_all();",
        ["tests/test_model_based.py"],
    ),
    (
        "finalize does not wait for transfers",
        "csrc/registry.cpp",
        "    transfers_done_.wait_for(lock, std::chrono::milliseconds(std::max",
        "    if (false) transfers_done_.wait_for(lock, std::chrono::milliseconds(std::max",
        ["tests/test_stress.py"],
    ),
    # --- block plans (C++) ----------------------------------------------------------------
    (
        "the memcpy strategy drops each block's last byte",
        "csrc/copy_blocks.cpp",
        "std::memcpy(item.dst, item.src, static_cast<size_t>(item.nbytes));",
        "std::memcpy(item.dst, item.src, static_cast<size_t>(item.nbytes) - 1);",
        ["tests/test_copy_blocks.py"],
    ),
    (
        "the copy after measuring skips an item",
        "csrc/copy_blocks.cpp",
        "  copy_range(done, num_items, strategy, single);",
        "  copy_range(done + 1, num_items, strategy, single);",
        ["tests/test_copy_blocks.py"],
    ),
    (
        "block index bound off by one",
        "csrc/copy_blocks.cpp",
        "blocks[j] >= 0 && blocks[j] < num_blocks,",
        "blocks[j] >= 0 && blocks[j] <= num_blocks,",
        ["tests/test_bad_inputs.py", "tests/test_copy_blocks.py"],
    ),
    (
        "duplicate destinations allowed",
        "csrc/copy_blocks.cpp",
        'KVREG_CHECK_ARG(repeated < 0, "dst_blocks names block "',
        'KVREG_CHECK_ARG(true, "dst_blocks names block "',
        ["tests/test_bad_inputs.py"],
    ),
    (
        "copy_kv_cache size check off by one",
        "csrc/copy_blocks.cpp",
        "nbytes >= 0 && nbytes <= block_nbytes - offset,",
        "nbytes >= 0 && nbytes <= block_nbytes - offset + 1,",
        ["tests/test_bad_inputs.py"],
    ),
    # --- Python layers --------------------------------------------------------------------
    (
        "swap_blocks swaps its arguments",
        "torch_kvreg/transfer.py",
        "copy_kv_blocks(src, dst, list(src_to_dst.keys()), list(src_to_dst.values()), verify=verify)",
        "copy_kv_blocks(src, dst, list(src_to_dst.values()), list(src_to_dst.keys()), verify=verify)",
        ["tests/test_copy_blocks.py"],
    ),
    (
        "default wait time of 10 s instead of 1 s",
        "torch_kvreg/options.py",
        "DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS = 1000",
        "DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS = 10000",
        ["tests/test_sources_of_truth.py", "tests/test_registry.py"],
    ),
    (
        "host caches remotely reachable by default",
        "csrc/registry.cpp",
        "options.remote_accessible == -1 ? !on_host",
        "options.remote_accessible == -1 ? true",
        ["tests/test_control.py", "tests/test_remote.py"],
    ),
    # --- the remote layer -----------------------------------------------------------------
    (
        "protocol accepts version true",
        "torch_kvreg/remote/protocol.py",
        "if type(version) is not int or version != VERSION:",
        "if version != VERSION:",
        ["tests/test_control.py"],
    ),
    (
        "peer cache entry wrap-around check dropped",
        "torch_kvreg/remote/protocol.py",
        "if addr + desc.tensor_nbytes > 2**64:",
        "if addr + desc.tensor_nbytes > 2**65:",
        ["tests/test_control.py"],
    ),
    (
        "a stranger may release another connection's lease",
        "torch_kvreg/remote/engine.py",
        "if request.lease in link.leases:",
        "if True:",
        ["tests/test_control.py"],
    ),
    (
        "private caches served to peers",
        "torch_kvreg/remote/leases.py",
        "    if not record.remote_accessible:\n",
        "    if False:\n",
        ["tests/test_control.py", "tests/test_remote.py"],
    ),
    (
        "a closed connection keeps its leases",
        "torch_kvreg/remote/control.py",
        "            for lease in list(self.leases):\n                self.owner.end_lease(lease)",
        "            for lease in []:\n                pass",
        ["tests/test_control.py"],
    ),
    (
        "finalize leaves peers connected",
        "torch_kvreg/remote/engine.py",
        "        for connection in connections:\n            connection.close()",
        "",
        ["tests/test_control.py"],
    ),
    (
        "link time: the phases overlap (each timed from the link's start)",
        "torch_kvreg/remote/handshake.py",
        "        self.ms[phase] = (now - self.mark) * 1000.0\n        self.mark = now",
        "        self.ms[phase] = (now - self.mark) * 1000.0",
        ["tests/test_link_time.py"],
    ),
    (
        "link time: the round trips pay a fixed wait",
        "torch_kvreg/remote/handshake.py",
        '    phases.lap("handshake")\n',
        '    time.sleep(0.12)\n    phases.lap("handshake")\n',
        ["tests/test_link_time.py"],
    ),
    (
        "link time: a peer whose metadata NIXL refused stays linked",
        "torch_kvreg/remote/control.py",
        "                    return  # the peer's next request finds the link closed",
        "                    pass",
        ["tests/test_link_time.py"],
    ),
    (
        "link time: the linker does not wait for the peer to have loaded its metadata",
        "torch_kvreg/remote/handshake.py",
        "    link.request(protocol.Ping(loaded=True), timeout_s)  # answered once the peer loaded ours\n",
        "",
        ["tests/test_link_time.py"],
    ),
    (
        "background load: a same-host link waits for its NIXL metadata load",
        "torch_kvreg/remote/handshake.py",
        "        return load  # the peer loads ours meanwhile, as it does for every linker\n",
        "        load.run()\n        return None\n",
        ["tests/test_link_background_load.py"],
    ),
    (
        "background load: the peer loads the linker's metadata on its reader, before answering it",
        "torch_kvreg/remote/handshake.py",
        "    link.nixl.start()\n",
        "    link.nixl.run()\n",
        ["tests/test_link_background_load.py"],
    ),
    (
        "background load: a NIXL transfer does not wait for its link's load",
        "torch_kvreg/remote/engine.py",
        "                    link.nixl.wait(deadline - time.monotonic(), cluster_id)\n",
        "                    pass\n",
        ["tests/test_link_background_load.py"],
    ),
    (
        "background load: a failed load lets NIXL transfers go ahead",
        "torch_kvreg/remote/agent.py",
        "        if self.error is not None:\n            raise make_error(LLMStatusCode.LLM_LINK_FAILED",
        "        if False:\n            raise make_error(LLMStatusCode.LLM_LINK_FAILED",
        ["tests/test_link_background_load.py"],
    ),
    (
        "background load: a forced unlink during a load leaves the peer's agent loaded",
        "torch_kvreg/remote/agent.py",
        "            remove = self.forgotten and not self.keep_agent and self.error is None",
        "            remove = False",
        ["tests/test_link_background_load.py"],
    ),
    (
        "background load: finalize does not wait for loads still running",
        "torch_kvreg/remote/engine.py",
        "        if not self.loads.wait_all(self.wait_s + 1):",
        "        if not self.loads.wait_all(0.0):",
        ["tests/test_link_background_load.py"],
    ),
    (
        "link time: a finalize racing the background engine leaves one made",
        "torch_kvreg/remote/api.py",
        "generation in (None, _generation)",
        "True",
        ["tests/test_link_time.py"],
    ),
    (
        "any proof passes the link secret check",
        "torch_kvreg/remote/auth.py",
        "        return hmac.compare_digest(expected, proof)",
        "        return True",
        ["tests/test_auth.py"],
    ),
    (
        "requests served before the handshake",
        "torch_kvreg/remote/engine.py",
        "link = Link(self, sock, None, self.wait_s, authenticated=self.secret is None)",
        "link = Link(self, sock, None, self.wait_s, authenticated=True)",
        ["tests/test_auth.py"],
    ),
    (
        "the acceptor's nonce is not fresh",
        "torch_kvreg/remote/auth.py",
        "    ours = new_nonce()\n    link.challenge",
        "    ours = bytes(32)\n    link.challenge",
        ["tests/test_auth.py"],
    ),
    # --- same-host copies ------------------------------------------------------------------
    (
        "same-host copy: a partial move does not advance the remote side",
        "csrc/peer_copy.cpp",
        "      piece.remote += step;\n      piece.nbytes -= step;\n      left -= step;",
        "      piece.nbytes -= step;\n      left -= step;",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: a job's last task does not end it",
        "csrc/peer_copy.cpp",
        "if (--job.tasks_left > 0) {",
        "if (--job.tasks_left > 1) {",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: a job's last, partly filled task is dropped",
        "csrc/peer_copy.cpp",
        "    if (!current.pieces.empty()) {\n      tasks.push_back(std::move(current));",
        "    if (false) {\n      tasks.push_back(std::move(current));",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: the peer's nonce is not compared",
        "torch_kvreg/remote/same_host.py",
        "if status != 0 or found != nonce:",
        "if status != 0:",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: pushes read instead of write",
        "torch_kvreg/remote/engine.py",
        'link.peer_pid, operation == "READ", local_addrs, remote_addrs, *segments',
        "link.peer_pid, True, local_addrs, remote_addrs, *segments",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: a timed-out copy lets go of its memory at once",
        "torch_kvreg/remote/jobs.py",
        "        if self.code == COPY_RUNNING and native.state() == COPY_RUNNING:\n            return False",
        "        if False:\n            return False",
        ["tests/test_same_host.py"],
    ),
    (
        "notices: a transfer's notice is not sent",
        "torch_kvreg/remote/jobs.py",
        "        if state == DONE and job.notify:",
        "        if False:",
        ["tests/test_notices.py", "tests/test_async.py"],
    ),
    (
        "notices: a notice goes out before its transfer is done",
        "torch_kvreg/remote/jobs.py",
        "        if state == DONE and job.notify:",
        "        if job.notify:",
        ["tests/test_notices.py", "tests/test_async.py"],
    ),
    (
        "notices: the box does not wake its waiters",
        "csrc/notices.cpp",
        "    b.queue.emplace_back(cluster_id, std::move(message));\n  }\n  b.landed.notify_all();",
        "    b.queue.emplace_back(cluster_id, std::move(message));\n  }",
        ["tests/test_notices.py"],
    ),
    (
        "notices: a full box grows",
        "csrc/notices.cpp",
        "    if (b.queue.size() >= kMaxQueued) {",
        "    if (b.queue.size() > kMaxQueued) {",
        ["tests/test_notices.py"],
    ),
    (
        "notices: the wait holds the GIL",
        "csrc/notices_bindings.cpp",
        '"notices_wait", &notices::wait, py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>(),',
        '"notices_wait", &notices::wait, py::arg("timeout_ms"),',
        ["tests/test_notices.py"],
    ),
    (
        "notices: a wait without limit ends at once",
        "torch_kvreg/remote/notices.py",
        "            left_ms = -1",
        "            left_ms = 0",
        ["tests/test_notices.py"],
    ),
    (
        "notices: finalize does not end a wait",
        "torch_kvreg/remote/notices.py",
        "        _C.notices_clear()",
        "        pass",
        ["tests/test_notices.py"],
    ),
    (
        "notices: a negative timeout is taken",
        "torch_kvreg/remote/notices.py",
        "        if not 0 <= timeout_ms <= MAX_WAIT_MS:",
        "        if not -(2**40) <= timeout_ms <= MAX_WAIT_MS:",
        ["tests/test_notices.py"],
    ),
    (
        "notices: a link's notice is answered (the peer drops the link)",
        "torch_kvreg/remote/control.py",
        "nothing is answered\n                continue",
        "nothing is answered",
        ["tests/test_notices.py"],
    ),
    (
        "notices: a notice is queued under the wrong cluster",
        "torch_kvreg/remote/engine.py",
        "        if not _C.notices_put(-1 if link.cluster_id is None else link.cluster_id, message):",
        "        if not _C.notices_put(-1, message):",
        ["tests/test_notices.py"],
    ),
    (
        "same-host copy: done() does not complete an ended copy",
        "torch_kvreg/inflight.py",
        "            self.assist(0)  # a same-host copy that has ended is completed here, at once",
        "            pass",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: a notice's copy does not wake the progress thread",
        "torch_kvreg/remote/engine.py",
        "remote_addrs, *segments, bool(notify)\n",
        "remote_addrs, *segments, False\n",
        ["tests/test_same_host.py", "tests/test_async.py"],
    ),
    (
        "same-host route: a start does not check its lease is still held",
        "torch_kvreg/remote/engine.py",
        "                self._stale(route)\n                or not link.alive",
        "                False\n                or not link.alive",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host route: a pull lands at the source's offsets",
        "csrc/peer_route.cpp",
        "local[j] = read_ ? dst_offset : src_offset;",
        "local[j] = src_offset;",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host route: its block lists take bools",
        "csrc/peer_copy_bindings.cpp",
        "if (!PyLong_CheckExact(item)) {",
        "if (!PyLong_Check(item)) {",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host route: it lets go of its holds while a job is still out",
        "torch_kvreg/remote/same_host.py",
        "                if route.ended != route.started or not route.holding:",
        "                if not route.holding:",
        ["tests/test_same_host.py", "tests/test_churn.py"],
    ),
    (
        "a job is completed by both the waiter and the progress thread",
        "torch_kvreg/remote/progress.py",
        "        if not job.claim_lock.acquire(False):\n            return False",
        "        if not (job.claim_lock.acquire(False) or True):\n            return False",
        ["tests/test_same_host.py", "tests/test_async.py"],
    ),
    (
        "same-host route: a routed copy's notice is not sent",
        "torch_kvreg/remote/engine.py",
        "job = SameHostJob(transfer, link, time.monotonic() + self.wait_s, notify, route.job_ended, native)",
        'job = SameHostJob(transfer, link, time.monotonic() + self.wait_s, b"", route.job_ended, native)',
        ["tests/test_same_host.py"],
    ),
    (
        "same-host route: its last copy does not let go of the cache",
        "torch_kvreg/remote/same_host.py",
        "            route.holding = False\n            self.busy.discard(route)\n            return True",
        "            return False",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: a dropped job handle does not cancel its job",
        "csrc/peer_copy.cpp",
        "next system call.\n  shared_->cancelled.store(true);",
        "next system call.\n",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: help() only waits",
        "csrc/peer_copy.cpp",
        "    while (!job.ended && !queue_.empty() &&",
        "    while (false && !queue_.empty() &&",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: a job's state is never counted out",
        "csrc/peer_copy.cpp",
        "  pool.count_job(-1);",
        "",
        ["tests/test_same_host.py"],
    ),
    (
        "same-host copy: a start wakes no idle worker",
        "csrc/peer_copy.cpp",
        "const size_t wake = std::min(tasks.size(), idle_workers_);",
        "const size_t wake = 0;",
        ["tests/test_same_host.py", "tests/test_async.py"],
    ),
    (
        "same-host copy: a forked child keeps its parent's pool",
        "csrc/peer_copy.cpp",
        "          current_.store(nullptr);\n",
        "",
        ["tests/test_copy_blocks.py", "tests/test_same_host.py"],
    ),
    (
        "same-host start: a burst's later starts ask no look though the one set has passed",
        "torch_kvreg/remote/progress.py",
        "        if now >= self.look_due:",
        "        if self.look_due == 0.0:",
        ["tests/test_async.py", "tests/test_same_host.py"],
    ),
    (
        "same-host copy: a watch never ends a wait for ends",
        "csrc/peer_copy.cpp",
        "      if (now >= watch_at_) {",
        "      if (false) {",
        ["tests/test_same_host.py"],
    ),
    (
        "Transfer.wait spends its timeout twice",
        "torch_kvreg/inflight.py",
        "left = None if until is None else max(0.0, until - time.monotonic())",
        "left = None if until is None else timeout_ms / 1000",
        ["tests/test_same_host.py"],
    ),
    # --- the LLM-DataDist facade ----------------------------------------------------------
    (
        "blocks keys ignore the model id",
        "torch_kvreg/llm_datadist/types.py",
        'return f"{KEY_PREFIX}/blocks/{self._model_id}"',
        'return f"{KEY_PREFIX}/blocks/0"',
        ["tests/test_llm_datadist.py"],
    ),
    (
        "IP ints decoded big-endian",
        "torch_kvreg/llm_datadist/config.py",
        'int(value).to_bytes(4, "little")',
        'int(value).to_bytes(4, "big")',
        ["tests/test_llm_datadist.py"],
    ),
    (
        "a False layer synchronizer is ignored",
        "torch_kvreg/llm_datadist/cache_manager.py",
        "                    if not ready:",
        "                    if False:",
        ["tests/test_llm_datadist.py"],
    ),
    (
        "copy_cache keeps upstream's argument order the wrong way",
        "torch_kvreg/llm_datadist/cache_manager.py",
        "            src.cache_id, dst.cache_id, src_batch_index, dst_batch_index, offset, size, verify=verify",
        "            dst.cache_id, src.cache_id, src_batch_index, dst_batch_index, offset, size, verify=verify",
        ["tests/test_llm_datadist.py"],
    ),
    # --- the option table -------------------------------------------------------------------
    (
        "options: initialize takes an upstream-only key",
        "torch_kvreg/options.py",
        "{option.key: option.check for option in OPTIONS if option.check is not None}",
        "{option.key: option.check for option in OPTIONS}",
        ["tests/test_options.py"],
    ),
    (
        "options: the facade reads a device list's last id",
        "torch_kvreg/options.py",
        '            value = value.split(";")[0]',
        '            value = value.split(";")[-1]',
        ["tests/test_options.py", "tests/test_sources_of_truth.py"],
    ),
    (
        "options: the C++ API reads a device list's last id",
        "csrc/options.cpp",
        "value.substr(0, value.find(';'))",
        "value.substr(value.find(';') + 1)",
        ["tests/test_sources_of_truth.py", "tests/test_cpp_api.py"],
    ),
    (
        "options: the C++ API takes a wait time of 0",
        "csrc/options.cpp",
        "digits_in(value, 1, kMaxSyncKvCacheWaitTimeMs)",
        "digits_in(value, 0, kMaxSyncKvCacheWaitTimeMs)",
        ["tests/test_sources_of_truth.py", "tests/test_cpp_api.py"],
    ),
    # --- records across pybind -------------------------------------------------------------
    (
        "a cache record's device_index reads another field",
        "csrc/bindings.cpp",
        '.def_property_readonly("device_index", [](const CacheRecord& r) { return r.desc.device_index; })',
        '.def_property_readonly("device_index", [](const CacheRecord& r) { return r.desc.num_tensors; })',
        ["tests/test_registry.py"],
    ),
    # --- statuses as values -----------------------------------------------------------------
    (
        "the C++ API reads every failed check as LLM_FAILED",
        "csrc/llm_datadist.cpp",
        "return static_cast<Status>(error.status());",
        "return LLM_FAILED;",
        ["tests/test_cpp_api.py"],
    ),
    (
        "a native error reaches Python without its status",
        "csrc/bindings.cpp",
        'exception.attr("status_code") = static_cast<uint32_t>(error.status());',
        'exception.attr("status_code") = static_cast<uint32_t>(kvreg::Status::LLM_FAILED);',
        ["tests/test_sources_of_truth.py", "tests/test_bad_inputs.py"],
    ),
    (
        "a translated error loses its Python type",
        "torch_kvreg/errors.py",
        "    return make_error(status, detail, type(exc))",
        "    return make_error(status, detail)",
        ["tests/test_bad_inputs.py"],
    ),
    (
        "transfer deadline 20 times too long",
        "torch_kvreg/remote/engine.py",
        "            deadline = time.monotonic() + self.wait_s\n",
        "            deadline = time.monotonic() + 20 * self.wait_s\n",
        ["tests/test_remote.py"],
    ),
    (
        "failed pull keeps the peer's lease",
        "torch_kvreg/remote/leases.py",
        "    def give_back(expired: list[SharedLease]) -> None:\n        for shared in expired:",
        "    def give_back(expired: list[SharedLease]) -> None:\n        for shared in []:",
        ["tests/test_remote.py"],
    ),
    (
        "a finished transfer's waiter wakes before its lease is released",
        "torch_kvreg/remote/jobs.py",
        "        freed = self._free(job, members)\n",
        "        freed = True\n",
        ["tests/test_async.py"],
    ),
    (
        "a notice does not end its group (it may arrive before later riders' data)",
        "torch_kvreg/remote/progress.py",
        "                not group[-1].notify\n                and i < len(waiting)",
        "                i < len(waiting)",
        ["tests/test_async.py"],
    ),
    (
        "grouped rows joined when adjacent on one side only",
        "torch_kvreg/remote/agent.py",
        "        & (remote_rows[1:, 0] == remote_rows[:-1, 0] + lengths[:-1])\n",
        "\n",
        ["tests/test_async.py"],
    ),
    (
        "riders of a failed group succeed",
        "torch_kvreg/remote/jobs.py",
        "        for member in members:\n            member.transfer.assist = None",
        "        for member in [job]:\n            member.transfer.assist = None",
        ["tests/test_async.py"],
    ),
    (
        "local layers copy every tensor",
        "torch_kvreg/transfer.py",
        "            _C.copy_blocks_of_tensors(src_id, dst_id, src_list, dst_list, *selected)",
        "            _C.copy_blocks(src_id, dst_id, src_list, dst_list)",
        ["tests/test_copy_blocks.py"],
    ),
    (
        "HND views registered as they look, not as they are",
        "torch_kvreg/layouts.py",
        "        physical = tensor.permute(*_HND)\n",
        "        physical = tensor.contiguous()\n",
        ["tests/test_layouts.py"],
    ),
    (
        "finalize frees a cache a transfer still uses",
        "csrc/registry.cpp",
        "      if (entries_.at(cache_id).in_flight == 0) {",
        "      if (true) {",
        ["tests/test_registry.py"],
    ),
    (
        "finalize waits without bound again",
        "csrc/registry.cpp",
        "std::chrono::milliseconds(std::max<int64_t>(config_.wait_ms, 0))",
        "std::chrono::hours(1)",
        ["tests/test_registry.py"],
    ),
    (
        "a lingering lease is not reused",
        "torch_kvreg/remote/leases.py",
        "if shared is not None and shared.link is link and link.alive:",
        "if shared is not None and shared.link is link and link.alive and shared.refs:",
        ["tests/test_remote.py"],
    ),
    (
        "a lingering lease never expires",
        "torch_kvreg/remote/leases.py",
        "                if everything or left <= 0 or not shared.link.alive:",
        "                if everything or not shared.link.alive:",
        ["tests/test_remote.py"],
    ),
    (
        "descriptor rows give every tensor the first tensor's address",
        "torch_kvreg/remote/plan.py",
        "    rows[:, :, 0] = bases[:, None] + offsets[None, :]",
        "    rows[:, :, 0] = bases[:1, None] + offsets[None, :]",
        ["tests/test_plan.py"],
    ),
    (
        "unlink removes the peer's NIXL agent (its UCX connection stays open)",
        "torch_kvreg/remote/engine.py",
        "        self._forget(link, keep_agent=said_bye)",
        "        self._forget(link, keep_agent=False)",
        ["tests/test_churn.py"],
    ),
    (
        "unlink leaves the link's same-host routes behind",
        "torch_kvreg/remote/engine.py",
        "            self.routes.drop(lambda route: route.link is link)",
        "            pass",
        ["tests/test_churn.py"],
    ),
    (
        "unlink leaves the link's unused leases behind",
        "torch_kvreg/remote/leases.py",
        "                if shared.link is link and shared.refs == 0:",
        "                if shared.link is link and shared.refs < 0:",
        ["tests/test_churn.py"],
    ),
    (
        "the in-flight table keeps an entry for every cache ever used",
        "torch_kvreg/remote/leases.py",
        "            self.in_flight.pop(cache_id, None)",
        "            self.in_flight[cache_id] = 0",
        ["tests/test_soak.py"],
    ),
    (
        "vanished peers stay listed without bound",
        "torch_kvreg/remote/engine.py",
        "            if len(dead) <= MAX_DEAD_LINKS:",
        "            if True:",
        ["tests/test_churn.py"],
    ),
    (
        "UCX memory events left on (0.4 s of every first link)",
        "torch_kvreg/remote/agent.py",
        '    os.environ.setdefault("UCX_MEM_EVENTS", "no")',
        "    pass",
        ["tests/test_remote.py"],
    ),
    (
        "notices name only senders still linked when they are read",
        "torch_kvreg/remote/engine.py",
        "            clusters = dict(self.senders)",
        "            clusters = {link.agent_name: link.cluster_id for link in self.links.values()}",
        ["tests/test_churn.py"],
    ),
    # --- the vLLM connector ------------------------------------------------------------------
    (
        "vllm: loads ignore the locally cached prefix",
        "torch_kvreg/vllm/settings.py",
        "        remote = list(self.source.block_ids[self.first_block :])",
        "        remote = list(self.source.block_ids)",
        ["tests/test_vllm_connector.py", "tests/test_vllm.py"],
    ),
    # --- verified transfers -------------------------------------------------------------
    (
        "verify: the landed CRCs are not compared",
        "torch_kvreg/verify.py",
        "zip(dst_blocks, expected, landed) if want != got]",
        "zip(dst_blocks, expected, landed) if False]",
        ["tests/test_verify.py"],
    ),
    (
        "verify: the wrong block is reported",
        "torch_kvreg/verify.py",
        "failed = [int(block) for block, want, got in",
        "failed = [int(dst_blocks[0]) for block, want, got in",
        ["tests/test_verify.py"],
    ),
    (
        "verify: a block's CRC stops one byte short",
        "csrc/checksum.cpp",
        "crc = crc32c(crc, slice(j, i), static_cast<size_t>(nbytes));",
        "crc = crc32c(crc, slice(j, i), static_cast<size_t>(nbytes - 1));",
        ["tests/test_verify.py"],
    ),
    (
        "verify: the three CRC streams are joined without moving the first past the others",
        "csrc/checksum.cpp",
        "crc = shift(shift(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(c);",
        "crc = static_cast<uint32_t>(a) ^ static_cast<uint32_t>(b) ^ static_cast<uint32_t>(c);",
        ["tests/test_verify.py"],
    ),
    (
        "verify: PCLMULQDQ folding swaps the constants of a lane's two halves",
        "csrc/checksum.cpp",
        "_mm_set_epi64x(static_cast<int64_t>(kFold512Low), static_cast<int64_t>(kFold512High));",
        "_mm_set_epi64x(static_cast<int64_t>(kFold512High), static_cast<int64_t>(kFold512Low));",
        ["tests/test_verify.py"],
    ),
    (
        "verify: PCLMULQDQ folding drops the last lane",
        "csrc/checksum.cpp",
        "__m128i x = fold(fold(fold(x0, k128, x1), k128, x2), k128, x3);",
        "__m128i x = fold(fold(x0, k128, x1), k128, x2);",
        ["tests/test_verify.py"],
    ),
    (
        "verify: the second of the three CRC streams reads the first's words",
        "csrc/checksum.cpp",
        "b = _mm_crc32_u64(b, wb);",
        "b = _mm_crc32_u64(b, wa);",
        ["tests/test_verify.py"],
    ),
    (
        "verify: forcing the SSE4.2 CRC (test hook) runs the table code",
        "csrc/checksum.cpp",
        "    impl = Impl::kSse42;",
        "    impl = Impl::kPortable;",
        ["tests/test_verify.py"],
    ),
    (
        "tensor selection: an index one past the cache's tensors is taken",
        "csrc/copy_blocks.cpp",
        "tensors[i] >= 0 && tensors[i] < record.desc.num_tensors, name,",
        "tensors[i] >= 0 && tensors[i] <= record.desc.num_tensors, name,",
        ["tests/test_verify.py", "tests/test_copy_blocks.py"],
    ),
    (
        "verify: a negative remote block goes to the peer in a checksums request",
        "torch_kvreg/remote/verify.py",
        "        if block < 0:",
        "        if block < -1:",
        ["tests/test_verify.py"],
    ),
    (
        "verify: the one-pass copy reads the landed CRC from the source",
        "csrc/checksum.cpp",
        "got = crc32c(got, dst_slice(i, j), n);",
        "got = crc32c(got, src_slice(i, j), n);",
        ["tests/test_verify.py"],
    ),
    (
        "verify: the one-pass copy compares what landed with itself",
        "csrc/checksum.cpp",
        "sums[j] = expected;",
        "sums[j] = got;",
        ["tests/test_verify.py"],
    ),
    (
        "verify: a one-pass copy's differences are not looked at",
        "torch_kvreg/verify.py",
        "    if bool(differ.any()):",
        "    if False:",
        ["tests/test_verify.py"],
    ),
    (
        "verify: the facade's pull_blocks drops its verify",
        "torch_kvreg/llm_datadist/cache_manager.py",
        "            per_layer,\n            verify=verify,\n        )\n\n    @raises_llm\n    def push_blocks(",
        "            per_layer,\n        )\n\n    @raises_llm\n    def push_blocks(",
        ["tests/test_llm_datadist.py"],
    ),
    (
        "verify: the facade's copies drop their verify",
        "torch_kvreg/llm_datadist/cache_manager.py",
        "transfer.swap_blocks(src_cache.cache_id, dst_cache.cache_id, src_to_dst, verify=verify)",
        "transfer.swap_blocks(src_cache.cache_id, dst_cache.cache_id, src_to_dst)",
        ["tests/test_llm_datadist.py"],
    ),
    (
        "verify: the C++ API ignores KvCacheExtParam::verify",
        "csrc/llm_datadist.cpp",
        "transfer.verify = ext_param.verify == 1;",
        "transfer.verify = false;",
        ["tests/test_cpp_api.py"],
    ),
    (
        "verify: the C++ API takes any KvCacheExtParam::verify",
        "csrc/llm_datadist.cpp",
        "        ext_param.verify > 1) {",
        "        false) {",
        ["tests/test_cpp_api.py"],
    ),
    (
        "verify: the peer takes a landed block's CRC as a source's",
        "torch_kvreg/remote/verify.py",
        "take = verification.landed_checksums if request.landed else verification.source_checksums",
        "take = verification.source_checksums",
        ["tests/test_verify.py"],
    ),
    (
        "verify: a pull asks for its source CRCs as landed ones",
        "torch_kvreg/remote/verify.py",
        "expected = ask(link, remote_ref, src_list.tolist(), remote_layers, tensors_per_layer, -1, landed=False)",
        "expected = ask(link, remote_ref, src_list.tolist(), remote_layers, tensors_per_layer, -1, landed=True)",
        ["tests/test_verify.py"],
    ),
    (
        "verify: verified transfers take same-host routes",
        "torch_kvreg/remote/verify.py",
        "return verify is False and not verification.always",
        "return not verification.always",
        ["tests/test_verify.py"],
    ),
    (
        "verify: a truthy verify counts as a bool",
        "torch_kvreg/verify.py",
        "if type(verify) is not bool:",
        "if False:",
        ["tests/test_verify.py"],
    ),
    (
        "verify: the process option is ignored",
        "torch_kvreg/verify.py",
        'always = options.get(OPTION_VERIFY_TRANSFERS) == "1"',
        'always = options.get(OPTION_VERIFY_TRANSFERS) == "on"',
        ["tests/test_verify.py"],
    ),
    (
        "verify: an asynchronous local copy is not compared",
        "torch_kvreg/transfer.py",
        "            if expected is not None:\n                landed = verification.landed_checksums(dst_id",
        "            if False:\n                landed = verification.landed_checksums(dst_id",
        ["tests/test_verify.py"],
    ),
    (
        "vllm: a failed load's blocks are not reported",
        "torch_kvreg/vllm/worker.py",
        "                    self._load_errors.update(result.local_block_ids)",
        "                    pass",
        ["tests/test_vllm_connector.py", "tests/test_vllm.py"],
    ),
    (
        "vllm: stale params are loaded anyway",
        "torch_kvreg/vllm/worker.py",
        "            if left_s < self.settings.transfer_timeout_ms / 1000:",
        "            if left_s < -1e9:",
        ["tests/test_vllm.py"],
    ),
    (
        "vllm: the producer offers its blocks beyond the prompt",
        "torch_kvreg/vllm/scheduler.py",
        "        blocks = flatten_block_ids(block_ids)[: -(-num_tokens // self.block_size)]",
        "        blocks = flatten_block_ids(block_ids)",
        ["tests/test_vllm_connector.py"],
    ),
    (
        "vllm: the producer frees blocks on any notice",
        "torch_kvreg/vllm/worker.py",
        "            if request_id in self._sends and len(seen) >= readers:",
        "            if True:",
        ["tests/test_vllm_connector.py"],
    ),
    (
        "vllm: the producer frees blocks on the first of several decoder ranks' notices",
        "torch_kvreg/vllm/worker.py",
        "            if request_id in self._sends and len(seen) >= readers:",
        "            if request_id in self._sends:",
        ["tests/test_vllm_connector.py::test_tp2_decoder_ranks_each_pull_their_half_of_the_heads"],
    ),
    (
        "vllm: every decoder rank signs its notice as the first reader",
        "torch_kvreg/vllm/worker.py",
        "notify=source.notice(own.geometry.tp_rank % readers, readers),",
        "notify=source.notice(0, readers),",
        ["tests/test_vllm_connector.py::test_tp2_decoder_ranks_each_pull_their_half_of_the_heads"],
    ),
    (
        "vllm: token loads ignore the locally cached prefix",
        "torch_kvreg/vllm/worker.py",
        "            spec.first_block * self.block_size,",
        "            0,",
        ["tests/test_vllm_connector.py::test_decoder_with_larger_blocks_pulls_the_prompt_tokens"],
    ),
    (
        "vllm: caches of other block sizes taken as the same blocks",
        "torch_kvreg/vllm/shapes.py",
        "        return self.dtype == other.dtype and self.geometry == dataclasses.replace(",
        "        return self.dtype == other.dtype or self.geometry == dataclasses.replace(",
        ["tests/test_vllm_connector.py::test_decoder_with_larger_blocks_pulls_the_prompt_tokens"],
    ),
    (
        "vllm: the scheduler does not ask the planner whether shapes map",
        "torch_kvreg/vllm/scheduler.py",
        '        return None if error is None else f"its KV cannot map into ours: {error}"',
        "        return None",
        ["tests/test_vllm_connector.py::test_scheduler_side_consumer_refuses_shapes_that_cannot_map"],
    ),
    (
        "vllm: malformed params are trusted",
        "torch_kvreg/vllm/settings.py",
        "        if -(-num_tokens // block_size) > len(blocks):",
        "        if False:",
        ["tests/test_vllm_connector.py"],
    ),
    # --- transfers between geometries (C++ planner, remote lanes) --------------------------
    (
        "geometry: destination token slot off by one",
        "csrc/geometry.cpp",
        "(d % dg.block_size) * dl.stride_t + dst_head;",
        "((d + 1) % dg.block_size) * dl.stride_t + dst_head;",
        ["tests/test_geometry.py::test_plan_merges_runs", "tests/test_geometry.py"],
    ),
    (
        "geometry: tokens that exactly fill the source blocks refused",
        "csrc/geometry.cpp",
        "selection.src_offset <= src_slots - n, n,",
        "selection.src_offset < src_slots - n, n,",
        ["tests/test_geometry.py"],
    ),
    (
        "geometry: head slice start ignored on the source",
        "csrc/geometry.cpp",
        "const int64_t src_head = (plan.first_head - sg.first_head()) * sl.stride_h;",
        "const int64_t src_head = 0 * sl.stride_h;",
        ["tests/test_geometry.py"],
    ),
    (
        "geometry: runs adjacent only in the source merged",
        "csrc/geometry.cpp",
        "last.src_offset + last.nbytes == src && last.dst_offset + last.nbytes == dst &&",
        "last.src_offset + last.nbytes == src &&",
        ["tests/test_geometry.py::test_plan_merges_runs", "tests/test_geometry.py"],
    ),
    (
        "geometry: a TP size that does not divide the heads accepted",
        "csrc/geometry.cpp",
        "g.num_kv_heads % g.tp_size == 0, side,",
        "g.num_kv_heads >= g.tp_size, side,",
        ["tests/test_geometry.py::test_tp_that_does_not_divide_the_heads_is_refused_even_when_the_desc_fits"],
    ),
    (
        "geometry: NIXL rows ignore the lanes' shifts",
        "torch_kvreg/remote/agent.py",
        "local_addrs = local_addrs + np.asarray(shifts[0], dtype=np.uint64)",
        "local_addrs = local_addrs + 0 * np.asarray(shifts[0], dtype=np.uint64)",
        ["tests/test_geometry_remote.py"],
    ),
    (
        "geometry: remote lanes whose K and V runs differ all take K's runs",
        "torch_kvreg/remote/geometry.py",
        "lane_runs=planned.lane_runs if planned.differ() else None,",
        "lane_runs=None,",
        ["tests/test_geometry_remote.py"],
    ),
    (
        "geometry remote: a mapped peer cache takes the plan's runs, not the box kernels",
        "torch_kvreg/remote/geometry.py",
        'boxes = None if os.environ.get("TORCH_KVREG_GEOMETRY_COPY") == "runs" else planned.mapped_boxes',
        "boxes = None",
        ["tests/test_geometry_remote.py::test_mapped_pull_and_push"],
    ),
    (
        "geometry remote: mapped boxes check only a peer tensor's first byte against the region",
        "csrc/geometry_bindings.cpp",
        "region->contains(address, static_cast<uint64_t>(mapped_desc.tensor_nbytes))",
        "region->contains(address, 1)",
        ["tests/test_geometry_remote.py::test_mapped_geometry_copy_refuses_a_tensor_outside_the_region"],
    ),
    # --- the host kernels of transfers between geometries (csrc/geometry_copy.cpp) ------------
    (
        "geometry kernels: the box order leaves out every job's first lane",
        "csrc/geometry_copy.cpp",
        "for (int32_t lane = 0; lane < lanes; ++lane) {",
        "for (int32_t lane = 1; lane < lanes; ++lane) {",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry remote: a split box job drops its last, partly filled range",
        "csrc/geometry_copy.cpp",
        "  if (begin < boxes()) {\n    ranges.emplace_back(begin, boxes());",
        "  if (begin < 0) {\n    ranges.emplace_back(begin, boxes());",
        ["tests/test_geometry_remote.py"],
    ),
    (
        "geometry remote: a split box job's ranges skip the box each one ends at",
        "csrc/geometry_copy.cpp",
        "      ranges.emplace_back(begin, i + 1);\n      begin = i + 1;",
        "      ranges.emplace_back(begin, i);\n      begin = i + 1;",
        ["tests/test_geometry_remote.py"],
    ),
    (
        "geometry kernels: 8x8 transpose stores columns 0 and 1 swapped",
        "csrc/geometry_copy.cpp",
        "out[2 * i] = _mm_unpacklo_epi64(u[i], u[i + 4]);",
        "out[2 * i] = _mm_unpackhi_epi64(u[i], u[i + 4]);",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: the wide transpose's four tiles all read the first eight rows",
        "csrc/geometry_copy.cpp",
        "tile_8x8_2(rows + 8 * k, at, out[k]);",
        "tile_8x8_2(rows, at, out[k]);",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: gathered tokens read every head from the first",
        "csrc/geometry_copy.cpp",
        "rows[j] = src + token_src[j] + k * z.src;",
        "rows[j] = src + token_src[j] + 0 * z.src;",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: head slice start ignored on the source",
        "csrc/geometry.cpp",
        "const int64_t src_head = sl.stride_h * (plan.first_head - sg.first_head());",
        "const int64_t src_head = sl.stride_h * 0;",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: 4x4 transpose loads its third row from the second",
        "csrc/geometry_copy.cpp",
        "_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[2] + at));",
        "_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[1] + at));",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: transpose edge rows past the last full tile dropped",
        "csrc/geometry_copy.cpp",
        "transpose_scalar<E>(dst, rows, fx, nx, 0, ny, dst_x);",
        "transpose_scalar<E>(dst, rows, fx, nx, 0, fy, dst_x);",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: axes merged when contiguous in the source only",
        "csrc/geometry_copy.cpp",
        "if (outer.src == inner.n * inner.src && outer.dst == inner.n * inner.dst) {",
        "if (outer.src == inner.n * inner.src) {",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: the streamed row's 16-byte tail dropped",
        "csrc/geometry_copy.cpp",
        "for (; i < nbytes; i += 16) {",
        "for (; i + 16 < nbytes; i += 16) {",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: a chunk runs past the end of its destination block",
        "csrc/geometry.cpp",
        "std::min({sg.block_size - s % sg.block_size, dg.block_size - d % dg.block_size, plan.num_tokens - i});",
        "std::min({sg.block_size - s % sg.block_size, dg.block_size, plan.num_tokens - i});",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry kernels: V laid out apart from K copied with K's strides",
        "csrc/geometry.cpp",
        "const BlockLayout sl = block_layout(sg, src.desc.element_size, kv);\n"
        "  const BlockLayout dl = block_layout(dg, dst.desc.element_size, kv);\n  BoxCopy job;",
        "const BlockLayout sl = block_layout(sg, src.desc.element_size, 0);\n"
        "  const BlockLayout dl = block_layout(dg, dst.desc.element_size, 0);\n  BoxCopy job;",
        ["tests/test_geometry_kernels.py"],
    ),
    (
        "geometry: lanes with their own runs all land on the lowest local lane",
        "torch_kvreg/remote/plan.py",
        "pieces[0].append(local_offsets + np.uint64(local[lane] - local[low_local]))",
        "pieces[0].append(local_offsets)",
        ["tests/test_geometry_remote.py"],
    ),
    (
        "geometry: same-host lanes ignore the remote shifts",
        "torch_kvreg/remote/engine.py",
        "remote_addrs = [base + shift for base, shift in zip(remote_addrs, shifts[1], strict=True)]",
        "remote_addrs = [base for base, shift in zip(remote_addrs, shifts[1], strict=True)]",
        ["tests/test_geometry_remote.py"],
    ),
    # --- caches in shared memory (allocate_kv_cache, mapped by same-host peers) ---------------
    (
        "shared memory: a lease naming another memfd reuses the old mapping",
        "torch_kvreg/remote/shared_memory.py",
        "if mapping is not None and mapping.name == shared.name:",
        "if mapping is not None:",
        ["tests/test_allocate.py"],
    ),
    (
        "shared memory: idle mappings are kept",
        "torch_kvreg/remote/shared_memory.py",
        "                if left <= 0:",
        "                if left <= -3600:",
        ["tests/test_allocate.py"],
    ),
    (
        "shared memory: a forgotten link keeps its mappings",
        "torch_kvreg/remote/shared_memory.py",
        "for key in [key for key in self.table if key[0] is link]:",
        "for key in []:",
        ["tests/test_allocate.py"],
    ),
    (
        "shared memory: peers' caches are never mapped",
        "torch_kvreg/remote/shared_memory.py",
        "if shared is None or not self.on or link.peer_pid is None:",
        "if True:",
        ["tests/test_allocate.py"],
    ),
    (
        "shared memory: tensors not page-aligned",
        "torch_kvreg/allocate.py",
        "stride = -(-tensor_nbytes // _PAGE) * _PAGE",
        "stride = tensor_nbytes",
        ["tests/test_allocate.py"],
    ),
    (
        "shared memory: a peer's addresses are not checked against the mapping",
        "csrc/peer_copy_bindings.cpp",
        "region->contains(piece.remote, piece.nbytes)",
        "region->contains(piece.remote, 0)",
        ["tests/test_allocate.py"],
    ),
    (
        "shared memory: a mapped pull copies the wrong way",
        "csrc/peer_copy.cpp",
        "runs[i] = job.read ? HostRun{remote, local, static_cast<int64_t>(piece.nbytes)}",
        "runs[i] = !job.read ? HostRun{remote, local, static_cast<int64_t>(piece.nbytes)}",
        ["tests/test_allocate.py"],
    ),
    (
        "shared memory: an unsealed memfd is mapped",
        "csrc/shared_memory.cpp",
        "(static_cast<unsigned>(seals) & F_SEAL_SHRINK) == 0 ||",
        "false ||",
        ["tests/test_allocate.py"],
    ),
    # --- the scaling and Mooncake benchmarks (smoke-run by tests/test_benchmarks.py) --------
    (
        "benchmarks: bench_fanin: a fan-in pull lands in the blocks of another prefill's",
        "benchmarks/bench_fanin.py",
        "dst[i * blocks : (i + 1) * blocks]) for i in range(len(targets))",
        "dst[:blocks]) for i in range(len(targets))",
        ["tests/test_benchmarks.py::test_bench_fanin_small"],
    ),
    (
        "benchmarks: bench_fanin: an async pull's time is counted once for all of them",
        "benchmarks/bench_fanin.py",
        "latencies += [transfer.elapsed_s for transfer in transfers]",
        "latencies.append(transfers[-1].elapsed_s)",
        ["tests/test_benchmarks.py::test_bench_fanin_small"],
    ),
    (
        "benchmarks: Mooncake column: coalesced reads land at the start of each tensor",
        "benchmarks/mooncake_te.py",
        "[a + dst_blocks[0] * block_nbytes for a in local_addrs]",
        "[a for a in local_addrs]",
        ["tests/test_benchmarks.py::test_bench_remote_mooncake_column"],
    ),
    (
        "benchmarks: Mooncake column: ours is compared with Mooncake's slowest variant",
        "benchmarks/bench_remote.py",
        "best = min(measured.values())",
        "best = max(measured.values())",
        ["tests/test_benchmarks.py::test_bench_remote_mooncake_column"],
    ),
    # --- the build's object cache (scripts/object_cache.py) ------------------------------
    (
        "object cache: the key keeps the tree's own paths (no reuse across trees)",
        "scripts/object_cache.py",
        "key.update(tree_relative(source.read(), folders))",
        "key.update(source.read())",
        ["tests/test_build.py"],
    ),
    (
        "object cache: the key ignores the preprocessed source",
        "scripts/object_cache.py",
        "key.update(tree_relative(source.read(), folders))",
        'key.update(b"")',
        ["tests/test_build.py"],
    ),
    (
        "object cache: the key ignores the flags",
        "scripts/object_cache.py",
        'key.update(tree_relative("\\0".join(others).encode(), folders))',
        "pass",
        ["tests/test_build.py"],
    ),
]


def copy_tree(dst: pathlib.Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dst / name)


def build(tree: pathlib.Path) -> subprocess.CompletedProcess:
    # Through the object cache `make` fills: the copy's unmutated files are not compiled again.
    env = dict(os.environ, KVREG_OBJECT_CACHE=str(ROOT / "build" / "object-cache"))
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env, capture_output=True, text=True
    )


def run_suite(tree: pathlib.Path, first: list[str], timeout: int) -> tuple[str, str]:
    """The likely killers first, then (if they pass) the whole suite, each with -x."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    for selection in (first, ["tests"]):
        cmd = [sys.executable, "-P", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection]
        try:
            result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)", " ".join(selection)
        if result.returncode != 0:
            failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
            last = result.stdout.strip().splitlines()[-1:] or [f"exit status {result.returncode} (crashed)"]
            return "killed", failed[0] if failed else last[0]
    return "SURVIVED", result.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this (a|b: either)")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per test run of a mutant")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if any(part in m[0] for part in args.k.split("|"))]
    with tempfile.TemporaryDirectory(prefix="kvreg-mutants-") as tmp:
        tree = pathlib.Path(tmp)
        copy_tree(tree)
        print(f"building a copy of the tree for {len(chosen)} mutants ...", flush=True)
        if build(tree).returncode != 0:
            print("the unmutated copy does not build")
            return 1
        survivors, broken = [], []
        for name, path, old, new, first in chosen:
            target = tree / path
            original = target.read_text()
            if original.count(old) != 1:
                broken.append(name)
                print(f"NOT APPLICABLE  {name}: the text occurs {original.count(old)} times in {path}", flush=True)
                continue
            start = time.monotonic()
            target.write_text(original.replace(old, new))
            native = path.startswith("csrc/")
            try:
                if native and build(tree).returncode != 0:
                    broken.append(name)
                    print(f"NOT APPLICABLE  {name}: does not compile", flush=True)
                    continue
                verdict, detail = run_suite(tree, first, args.timeout)
            finally:
                target.write_text(original)
                if native:
                    build(tree)
            if verdict == "SURVIVED":
                survivors.append(name)
            print(f"{verdict:<15} {name} ({time.monotonic() - start:.0f} s): {detail}", flush=True)
    killed = len(chosen) - len(survivors) - len(broken)
    print(
        f"{killed} of {len(chosen)} mutants killed; survived: {survivors or 'none'}; not applicable: {broken or 'none'}"
    )
    return 1 if survivors or broken else 0


if __name__ == "__main__":
    sys.exit(main())
