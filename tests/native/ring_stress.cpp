// Stress of SpscRing (csrc/ring.h) under ThreadSanitizer, built and run by
// tests/test_native_sanitizers.py: a producer and a consumer run flat out while a third thread
// (neither of them, as the Python side calling PowerSampler::pending() is) reads size(), which
// must always lie in [0, capacity]. The ring is small so that head and tail wrap it constantly.
// Usage: ring_stress ITEMS SECONDS  -> stops after ITEMS pushes or SECONDS, whichever is first;
// prints "OK ring ..." on success, exits 1 otherwise.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "ring.h"

using namespace llm_dvfs;

int main(int argc, char** argv) {
  const uint64_t max_items = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 2000000;
  const double seconds = argc > 2 ? std::atof(argv[2]) : 10.0;
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(seconds));
  std::atomic<uint64_t> pushed{0};
  SpscRing<uint64_t> ring(8);
  std::atomic<bool> done{false};
  std::atomic<uint64_t> bad{0}, worst{0}, reads{0};
  std::thread producer([&] {
    uint64_t i = 0;
    while (i < max_items && ((i & 1023) != 0 || std::chrono::steady_clock::now() < deadline))
      if (ring.push(i)) ++i;
    pushed.store(i, std::memory_order_relaxed);
    done.store(true, std::memory_order_release);
  });
  std::thread consumer([&] {
    uint64_t next = 0, buf[4];
    for (;;) {
      const bool finished = done.load(std::memory_order_acquire);
      const size_t k = ring.pop(buf, 4);
      for (size_t j = 0; j < k; ++j)
        if (buf[j] != next++) bad.fetch_add(1, std::memory_order_relaxed);  // FIFO, no loss
      if (finished && k == 0) break;
    }
    if (next != pushed.load(std::memory_order_relaxed)) bad.fetch_add(1, std::memory_order_relaxed);
  });
  std::thread reader([&] {
    while (!done.load(std::memory_order_acquire)) {
      const size_t s = ring.size();
      reads.fetch_add(1, std::memory_order_relaxed);
      if (s > ring.capacity()) {
        bad.fetch_add(1, std::memory_order_relaxed);
        uint64_t w = worst.load(std::memory_order_relaxed);
        while (s > w && !worst.compare_exchange_weak(w, s)) {
        }
      }
    }
  });
  producer.join();
  consumer.join();
  reader.join();
  std::printf("ring: items=%llu size_reads=%llu bad=%llu worst_size=%llu capacity=%zu\n",
              (unsigned long long)pushed.load(), (unsigned long long)reads.load(),
              (unsigned long long)bad.load(), (unsigned long long)worst.load(), ring.capacity());
  if (bad.load() != 0) {
    std::fprintf(stderr, "FAIL: size() left [0, capacity] or the ring lost order\n");
    return 1;
  }
  std::printf("OK ring\n");
  return 0;
}
