// Bounded single-producer/single-consumer ring. The producer never blocks: when the ring is
// full the new element is dropped and counted (a meter must never stall on its reader).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace llm_dvfs {

template <typename T>
class SpscRing {
 public:
  // capacity is rounded up to a power of two; all memory is allocated here, never later.
  explicit SpscRing(size_t capacity) {
    size_t c = 1;
    while (c < capacity) c <<= 1;
    buf_.resize(c);
    mask_ = c - 1;
  }

  size_t capacity() const { return buf_.size(); }

  // Producer only. Returns false (and counts) when full.
  bool push(const T& v) {
    const uint64_t h = head_.load(std::memory_order_relaxed);  // only the producer writes head
    // acquire: the consumer's reads of slots below tail happen-before we overwrite them.
    const uint64_t t = tail_.load(std::memory_order_acquire);
    if (h - t >= buf_.size()) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    buf_[h & mask_] = v;
    // release: the slot's contents are visible before the consumer sees the new head.
    head_.store(h + 1, std::memory_order_release);
    return true;
  }

  // Consumer only. Copies up to max elements into out, returns how many.
  size_t pop(T* out, size_t max) {
    const uint64_t t = tail_.load(std::memory_order_relaxed);  // only the consumer writes tail
    const uint64_t h = head_.load(std::memory_order_acquire);  // pairs with push's release
    size_t n = static_cast<size_t>(h - t);
    if (n > max) n = max;
    for (size_t i = 0; i < n; ++i) out[i] = buf_[(t + i) & mask_];
    tail_.store(t + n, std::memory_order_release);  // pairs with push's acquire
    return n;
  }

  // Any thread. Tail first: the acquire pairs with pop's release, after which the consumer's
  // head read (>= that tail) happens-before ours, so by coherence head >= tail and the
  // difference cannot wrap. Relaxed suffices for head: only its value matters. Between the two
  // loads the producer may refill slots the consumer freed, so clamp to the capacity.
  size_t size() const {
    const uint64_t t = tail_.load(std::memory_order_acquire);
    const uint64_t h = head_.load(std::memory_order_relaxed);
    const uint64_t n = h - t;
    return static_cast<size_t>(n < buf_.size() ? n : buf_.size());
  }
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }
  uint64_t pushed() const { return head_.load(std::memory_order_relaxed); }

 private:
  std::vector<T> buf_;
  size_t mask_ = 0;
  alignas(64) std::atomic<uint64_t> head_{0};
  alignas(64) std::atomic<uint64_t> tail_{0};
  alignas(64) std::atomic<uint64_t> dropped_{0};
};

}  // namespace llm_dvfs
