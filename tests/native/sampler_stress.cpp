// Native stress test of PowerSampler, built with -fsanitize=thread or address,undefined by
// tests/test_native_sanitizers.py and run against the emulated NVML (LLM_DVFS_NVML_LIBRARY).
// Exercises: many start/stop cycles, a consumer draining while the producer runs, concurrent
// flush()/request_counter() callers (window-edge brackets and plain reads), and ring overflow with
// a tiny capacity.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "sampler.h"

using namespace llm_dvfs;

static int fail(const char* what) {
  std::fprintf(stderr, "FAIL: %s\n", what);
  return 1;
}

int main(int argc, char** argv) {
  const int cycles = argc > 1 ? std::atoi(argv[1]) : 1000;
  SamplerConfig cfg;
  cfg.nvml_indices = {0};
  cfg.buffer_period_s = 0.002;
  cfg.poll_period_s = 0.001;
  cfg.counter_period_s = 0.005;
  cfg.capacity = 1 << 12;

  // 1. start/stop cycles, each with a drain in between
  std::vector<Record> out(1 << 13);
  size_t total = 0;
  for (int i = 0; i < cycles; ++i) {
    PowerSampler s(cfg);
    s.start();
    s.start();  // idempotent
    if (i % 50 == 0) s.flush(1.0);
    total += s.drain(out.data(), out.size());
    s.stop();
    s.stop();  // idempotent
  }
  std::printf("cycles=%d records=%zu\n", cycles, total);

  // 2. concurrent consumer + control callers while the producer runs
  {
    PowerSampler s(cfg);
    s.start();
    std::atomic<bool> done{false};
    std::atomic<size_t> drained{0};
    std::thread consumer([&] {
      std::vector<Record> buf(1 << 10);
      int64_t last_t = INT64_MIN;
      while (!done.load(std::memory_order_acquire)) {
        size_t n = s.drain(buf.data(), buf.size());
        for (size_t k = 0; k < n; ++k)
          if (buf[k].kind == static_cast<uint8_t>(RecordKind::kBufferPower)) {
            if (buf[k].t_ns <= last_t) std::abort();  // buffer lane must be strictly increasing
            last_t = buf[k].t_ns;
          }
        drained += n;
      }
    });
    std::thread flusher([&] {
      for (int k = 0; k < 200; ++k) {
        s.flush(1.0);
        s.request_counter(k % 3 != 0);  // mostly brackets, some plain reads
      }
    });
    flusher.join();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    done.store(true, std::memory_order_release);
    consumer.join();
    SamplerStats st = s.stats();
    s.stop();
    std::printf("concurrent: drained=%zu polls=%llu drains=%llu counters=%llu brackets=%llu\n",
                drained.load(), (unsigned long long)st.polls, (unsigned long long)st.drains,
                (unsigned long long)st.counter_reads, (unsigned long long)st.brackets);
    if (st.polls == 0 || st.drains == 0 || st.counter_reads == 0) return fail("a lane never ran");
    if (st.brackets == 0 || st.bracket_reads < st.brackets) return fail("no window-edge bracket");
  }

  // 3. overflow: tiny ring, nobody drains; must count drops, never block or crash
  {
    SamplerConfig small = cfg;
    small.capacity = 16;
    PowerSampler s(small);
    s.start();
    for (int k = 0; k < 40; ++k) {
      s.flush(1.0);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    SamplerStats st = s.stats();
    s.stop();
    std::printf("overflow: pushed=%llu dropped=%llu\n", (unsigned long long)st.pushed,
                (unsigned long long)st.dropped);
    if (st.dropped == 0) return fail("overflow not counted");
    if (s.pending() > 16) return fail("ring exceeded its capacity");
  }
  std::printf("OK\n");
  return 0;
}
