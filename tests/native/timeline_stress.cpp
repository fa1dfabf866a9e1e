// Stress of the native Timeline under sanitizers, against tests/fakes/fake_cuda.c (loaded via
// LLM_DVFS_CUDA_LIBRARY). No Python: the sanitizers see only our code.
//   event mode:    marks behind queued work, resolve, check against the fake's true times, clear
//   callback mode: marks whose host functions run on the fake's driver thread; some Timelines
//                  are destroyed while callbacks are still pending (the destructor must wait)
//   a concurrent reader calls stats()/size() throughout.
// Usage: timeline_stress CYCLES   -> prints "OK cycles=N" on success, exits 1 on a mismatch.
#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "timeline.h"

using namespace llm_dvfs;

namespace {

using EnqueueFn = int64_t (*)(uintptr_t, int64_t);
using LogFn = int (*)(uintptr_t*, int64_t*, int);
using ResetFn = void (*)();

int fail(const char* what, long a = 0, long b = 0) {
  std::fprintf(stderr, "FAIL: %s (%ld, %ld)\n", what, a, b);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  const int cycles = argc > 1 ? std::atoi(argv[1]) : 50;
  const char* path = std::getenv("LLM_DVFS_CUDA_LIBRARY");
  if (!path) return fail("LLM_DVFS_CUDA_LIBRARY not set");
  void* fake = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!fake) return fail("dlopen fake");
  auto enqueue = reinterpret_cast<EnqueueFn>(dlsym(fake, "fake_cuda_enqueue"));
  auto log = reinterpret_cast<LogFn>(dlsym(fake, "fake_cuda_log"));
  auto reset = reinterpret_cast<ResetFn>(dlsym(fake, "fake_cuda_reset"));
  if (!enqueue || !log || !reset) return fail("fake control symbols");

  std::vector<uintptr_t> streams(1 << 16);
  std::vector<int64_t> truth(1 << 16);
  for (int c = 0; c < cycles; ++c) {
    reset();
    const uintptr_t s = 0x1000 + static_cast<uintptr_t>(c);
    // -- event mode, with a concurrent reader
    auto tl = std::make_unique<Timeline>(TimelineMode::kEvent, 8, 0.002);
    std::atomic<bool> stop{false};
    std::thread reader([&] {
      while (!stop.load()) {
        (void)tl->stats();
        (void)tl->size();
        std::this_thread::yield();
      }
    });
    const int n = 40;
    for (int i = 0; i < n; ++i) {
      enqueue(s, 20'000);
      tl->mark(s, i);
    }
    Resolution r = tl->resolve(5.0);
    stop.store(true);
    reader.join();
    const int k = log(streams.data(), truth.data(), static_cast<int>(streams.size()));
    int j = 0;
    for (int i = 0; i < k; ++i) {
      if (streams[i] != s) continue;
      if (j >= n) return fail("too many records", j, n);
      const int64_t err = r.t_ns[j] - truth[i];
      if (err > r.uncertainty_ns[j] || -err > r.uncertainty_ns[j])
        return fail("event mark outside its bound", static_cast<long>(err), static_cast<long>(r.uncertainty_ns[j]));
      ++j;
    }
    if (j != n) return fail("records", j, n);
    tl->clear();
    for (int i = 0; i < 5; ++i) tl->mark(s, i);  // pooled events reused after clear
    tl.reset();                                  // destroyed with marks pending

    // -- callback mode
    Timeline cb(TimelineMode::kCallback, 4, 5.0);
    for (int i = 0; i < 20; ++i) {
      enqueue(s + 0x100000, 5'000);
      cb.mark(s + 0x100000, i);
    }
    Resolution rc = cb.resolve(5.0);
    for (size_t i = 1; i < rc.t_ns.size(); ++i)
      if (rc.t_ns[i] < rc.t_ns[i - 1]) return fail("callback marks out of order", static_cast<long>(i));
    {
      Timeline pending(TimelineMode::kCallback, 4, 5.0);
      enqueue(s + 0x200000, 2'000'000);
      for (int i = 0; i < 10; ++i) pending.mark(s + 0x200000, i);
    }  // destructor waits for the callbacks before freeing their slots
  }
  std::printf("OK cycles=%d\n", cycles);
  return 0;
}
