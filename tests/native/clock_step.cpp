// The sampler's buffer lane across steps of the host's CLOCK_REALTIME, built by
// tests/test_native_sanitizers.py with -Wl,--wrap=clock_gettime and run against the emulated NVML
// (LLM_DVFS_NVML_LIBRARY). A step moves both clocks that matter, as on a real host: the
// sampler's (our clock_gettime wrapper adds the step to CLOCK_REALTIME) and the driver's (the
// emulator stamps samples taken after fake_nvml_set_realtime_offset_us with the step).
// The emulated GPU runs a trace with a different power every 100 ms, so every buffer record can
// be checked against the true power at the time the sampler put it: no sample may be lost,
// repeated or misplaced, before or after the step.
// Usage: clock_step  -> prints "OK clock steps" on success, exits 1 otherwise.
#include <dlfcn.h>
#include <time.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "sampler.h"

using namespace llm_dvfs;

namespace {

std::atomic<int64_t> g_step_ns{0};

}  // namespace

extern "C" int __real_clock_gettime(clockid_t id, struct timespec* ts);
extern "C" int __wrap_clock_gettime(clockid_t id, struct timespec* ts) {
  const int r = __real_clock_gettime(id, ts);
  if (r == 0 && id == CLOCK_REALTIME) {
    const int64_t ns = static_cast<int64_t>(ts->tv_sec) * 1000000000LL + ts->tv_nsec +
                       g_step_ns.load(std::memory_order_relaxed);
    ts->tv_sec = static_cast<time_t>(ns / 1000000000LL);
    ts->tv_nsec = static_cast<long>(ns % 1000000000LL);
  }
  return r;
}

namespace {

using ResetFn = int (*)();
using OffsetFn = int (*)(long long);
using TraceFn = int (*)(unsigned, const double*, const double*, unsigned);
using PowerAtFn = double (*)(unsigned, double);

struct Fake {
  ResetFn reset;
  OffsetFn set_offset;
  TraceFn set_trace;
  PowerAtFn power_at;
};

int64_t unstepped_offset_ns() {  // host realtime - monotonic, without the step
  timespec a, r, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  __real_clock_gettime(CLOCK_REALTIME, &r);
  clock_gettime(CLOCK_MONOTONIC, &b);
  const int64_t ma = a.tv_sec * 1000000000LL + a.tv_nsec, mb = b.tv_sec * 1000000000LL + b.tv_nsec;
  return r.tv_sec * 1000000000LL + r.tv_nsec - (ma + (mb - ma) / 2);
}

// One sampler run with a step of step_ms in the middle; returns 0 when every sample is right.
int run(const Fake& fake, int step_ms) {
  fake.reset();
  g_step_ns.store(0);
  std::vector<double> t_s, w;
  for (int k = 0; k < 40; ++k) {  // 100 ms segments of distinct power: 100, 110, ... W
    t_s.push_back(0.1 * k);
    w.push_back(100.0 + 10.0 * k);
  }
  fake.set_trace(0, t_s.data(), w.data(), static_cast<unsigned>(t_s.size()));
  SamplerConfig cfg;
  cfg.nvml_indices = {0};
  cfg.buffer_period_s = 0.1;
  cfg.poll_period_s = 0.05;
  cfg.counter_period_s = 1.0;
  PowerSampler s(cfg);
  s.start();
  const int64_t t_start = monotonic_ns();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const int64_t t_step = monotonic_ns();
  fake.set_offset(static_cast<long long>(step_ms) * 1000);  // the driver's clock ...
  g_step_ns.store(static_cast<int64_t>(step_ms) * 1000000);  // ... and ours
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  s.flush(1.0);
  s.stop();
  const int64_t t_end = monotonic_ns();
  std::vector<Record> recs(1 << 16);
  recs.resize(s.drain(recs.data(), recs.size()));
  const int64_t off = unstepped_offset_ns();
  int bad = 0, after = 0, n = 0;
  int64_t prev = 0;
  for (const Record& r : recs) {
    if (r.kind != static_cast<uint8_t>(RecordKind::kBufferPower)) continue;
    // the true power 1 ms after the sample's time (samples fall on the segments' starts)
    const double truth = fake.power_at(0, (r.t_ns + off) * 1e-9 + 0.001);
    const bool spaced = prev == 0 || (r.t_ns - prev > 19000000 && r.t_ns - prev < 21000000);
    if (r.value != truth || !spaced || r.t_ns > t_end) {
      if (bad++ < 5)
        std::fprintf(stderr, "step %+d ms: sample at %+.3f s: %.1f W (true %.1f W), %.1f ms after the last\n",
                     step_ms, (r.t_ns - t_step) * 1e-9, r.value, truth, (r.t_ns - prev) * 1e-6);
    }
    if (r.t_ns > t_step) ++after;
    prev = r.t_ns;
    ++n;
  }
  const int expect_after = static_cast<int>((t_end - t_step) / 20000000);
  std::printf("step %+6d ms: %d samples over %.2f s, %d after the step (expected ~%d), %d wrong\n",
              step_ms, n, (t_end - t_start) * 1e-9, after,
              expect_after, bad);
  if (bad != 0 || after < expect_after - 3 || n < static_cast<int>((t_end - t_start) / 20000000) - 4) {
    std::fprintf(stderr, "FAIL: step %+d ms\n", step_ms);
    return 1;
  }
  return 0;
}

}  // namespace

int main() {
  const char* path = std::getenv("LLM_DVFS_NVML_LIBRARY");
  void* h = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : nullptr;  // the sampler's very handle
  if (!h) {
    std::fprintf(stderr, "FAIL: cannot load the emulator (LLM_DVFS_NVML_LIBRARY)\n");
    return 1;
  }
  Fake fake{reinterpret_cast<ResetFn>(dlsym(h, "fake_nvml_reset")),
            reinterpret_cast<OffsetFn>(dlsym(h, "fake_nvml_set_realtime_offset_us")),
            reinterpret_cast<TraceFn>(dlsym(h, "fake_nvml_set_trace")),
            reinterpret_cast<PowerAtFn>(dlsym(h, "fake_nvml_power_at"))};
  if (!fake.reset || !fake.set_offset || !fake.set_trace || !fake.power_at) {
    std::fprintf(stderr, "FAIL: the emulator lacks a control function\n");
    return 1;
  }
  int failed = 0;
  // back past the buffer's depth, back within it, forward; and no step (the reference)
  for (int step_ms : {0, -5000, -300, 3000, 300}) failed += run(fake, step_ms);
  dlclose(h);
  if (failed) return 1;
  std::printf("OK clock steps\n");
  return 0;
}
