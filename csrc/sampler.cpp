#include "sampler.h"

#include <time.h>

#include <algorithm>
#include <chrono>

#include "device.h"

namespace llm_dvfs {

namespace {
int64_t clock_ns(clockid_t id) {
  timespec ts;
  clock_gettime(id, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}
int64_t secs_to_ns(double s) { return static_cast<int64_t>(s * 1e9); }

double value_as_double(nvmlValueType_t t, const nvmlValue_t& v) {
  switch (t) {
    case NVML_VALUE_TYPE_DOUBLE: return v.dVal;
    case NVML_VALUE_TYPE_UNSIGNED_INT: return v.uiVal;
    case NVML_VALUE_TYPE_UNSIGNED_LONG: return static_cast<double>(v.ulVal);
    case NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: return static_cast<double>(v.ullVal);
    case NVML_VALUE_TYPE_SIGNED_LONG_LONG: return static_cast<double>(v.sllVal);
    case NVML_VALUE_TYPE_SIGNED_INT: return v.siVal;
    case NVML_VALUE_TYPE_UNSIGNED_SHORT: return v.usVal;
  }
  return v.uiVal;
}

// A buffer interval longer than this means samples were lost (normal spacing 7-45 ms on H100).
constexpr int64_t kGapThresholdNs = 150000000;
// A change of (realtime - monotonic) by more than this between drains is a step of the realtime
// clock (settimeofday, an NTP step); slewing moves it by at most 0.5 ms/s.
constexpr int64_t kClockStepNs = 50000000;
// The driver stamps a sample when it is taken, so none can map after the call that returned it.
constexpr int64_t kFutureSlackNs = 1000000;
// Largest sample array grown on the driver's NVML_ERROR_INSUFFICIENT_SIZE (1 MiB).
constexpr unsigned kMaxSampleBuf = 1u << 16;
// A bracket reads the counter until its value changes (every ~100 ms on H100/H200) or this long
// after its first read: a change a little later than one period is still caught.
constexpr int64_t kBracketMaxNs = 130000000;
// At most one bracket read starts per this interval. An H200 read takes ~3 ms, so reads run back
// to back; a driver answering in microseconds (the emulator) would otherwise make it a busy loop.
// It bounds the bracket's width, the change instant's uncertainty, from below.
constexpr int64_t kBracketSpacingNs = 1000000;
// Grid prediction (SamplerConfig::counter_grid_s). A predicted bracket wakes this long before the
// predicted change: more than one read (~3 ms; p99 15 ms on H100) plus the wake-up jitter, so
// the change still falls between two back-to-back reads.
constexpr int64_t kGridLeadNs = 12000000;
// A change this close to the predicted grid instant is a hit; one farther is a miss.
constexpr int64_t kGridToleranceNs = 8000000;
// Consecutive reads at most this far apart bracket a change tightly enough to learn the grid
// from (meter/stitch.py uses pairs up to MAX_BRACKET_S = 20 ms).
constexpr int64_t kGridTightNs = 20000000;
// Misses in a row after which a device's prediction is off for the sampler's life.
constexpr int kGridMaxMisses = 2;

unsigned long long shift_us(unsigned long long us, int64_t by_ns) {
  const int64_t v = static_cast<int64_t>(us) + by_ns / 1000;
  return v > 0 ? static_cast<unsigned long long>(v) : 0ull;
}
}  // namespace

int64_t monotonic_ns() { return clock_ns(CLOCK_MONOTONIC); }
int64_t realtime_ns() { return clock_ns(CLOCK_REALTIME); }

PowerSampler::PowerSampler(SamplerConfig cfg)
    : cfg_(std::move(cfg)), sample_buf_(1024), ring_(std::max<size_t>(cfg_.capacity, 16)) {}

PowerSampler::~PowerSampler() { stop(); }

int64_t PowerSampler::measure_offset() const {
  // Bracket the realtime read by two monotonic reads; the midpoint error is < (b - a) / 2. The
  // narrowest of three, so that a preemption inside one bracket cannot pass for a clock step.
  int64_t best = 0, width = INT64_MAX;
  for (int k = 0; k < 3; ++k) {
    const int64_t a = monotonic_ns();
    const int64_t r = realtime_ns();
    const int64_t b = monotonic_ns();
    if (b - a < width) {
      width = b - a;
      best = r - (a + (b - a) / 2);
    }
  }
  return best;
}

void PowerSampler::start() {
  if (running()) return;
  // Load NVML and resolve handles on the caller's thread, so failures raise to the caller.
  auto session = std::make_unique<NvmlSession>();
  const NvmlApi& api = session->api();
  std::vector<DeviceState> devs(cfg_.nvml_indices.size());
  const int64_t offset = measure_offset();
  for (size_t i = 0; i < devs.size(); ++i) {
    devs[i].handle = device_handle(api, cfg_.nvml_indices[i]);
    // Start the buffer lane at "now": older samples belong to nobody's window.
    const int64_t now = monotonic_ns();
    devs[i].last_buffer_us = static_cast<unsigned long long>((now + offset) / 1000);
    devs[i].frame_offset_ns = offset;
    devs[i].last_buffer_t_ns = now;
    if (!api.DeviceGetSamples) devs[i].have_buffer = false;
    if (!api.DeviceGetFieldValues) devs[i].have_fields = false;
    if (!api.DeviceGetTotalEnergyConsumption) devs[i].have_counter = false;
    if (!api.DeviceGetPowerUsage) devs[i].have_usage = false;
  }
  nvml_ = std::move(session);
  devs_ = std::move(devs);
  bracketing_ = false;
  bracket_deadline_ns_ = 0;
  offset_ns_.store(offset, std::memory_order_relaxed);
  // One counter read before any window can open, so the first window's start is bracketed.
  // This thread is the ring's producer until the sampler thread starts (thread creation
  // orders these pushes before the sampler's).
  read_counters();
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_requested_ = false;
  }
  running_.store(true, std::memory_order_release);
  thread_ = std::thread([this] { run(); });
}

void PowerSampler::stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_requested_ = true;
  }
  cv_.notify_all();
  thread_.join();
  running_.store(false, std::memory_order_release);
  {
    // Wake any flush() waiter: nothing more will be produced.
    std::lock_guard<std::mutex> l(mu_);
    flush_done_ = flush_requested_;
  }
  done_cv_.notify_all();
  devs_.clear();
  nvml_.reset();
}

void PowerSampler::request_counter(bool bracket) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (bracket && cfg_.bracket_edges) bracket_requested_.store(true, std::memory_order_relaxed);
    counter_requested_.store(true, std::memory_order_relaxed);
  }
  cv_.notify_one();
}

bool PowerSampler::flush(double timeout_s) {
  std::unique_lock<std::mutex> l(mu_);
  if (!running()) return false;
  const uint64_t ticket = ++flush_requested_;
  cv_.notify_one();
  return done_cv_.wait_for(l, std::chrono::nanoseconds(secs_to_ns(timeout_s)),
                           [&] { return flush_done_ >= ticket; });
}

size_t PowerSampler::drain(Record* out, size_t max) {
  std::lock_guard<std::mutex> l(consumer_mu_);  // the ring has one consumer at a time
  return ring_.pop(out, max);
}

SamplerStats PowerSampler::stats() const {
  SamplerStats s;
  s.loops = loops_.load(std::memory_order_relaxed);
  s.drains = drains_.load(std::memory_order_relaxed);
  s.polls = polls_.load(std::memory_order_relaxed);
  s.counter_reads = counter_reads_.load(std::memory_order_relaxed);
  s.buffer_samples = buffer_samples_.load(std::memory_order_relaxed);
  s.errors = errors_.load(std::memory_order_relaxed);
  s.brackets = brackets_.load(std::memory_order_relaxed);
  s.bracket_reads = bracket_reads_.load(std::memory_order_relaxed);
  s.brackets_unresolved = brackets_unresolved_.load(std::memory_order_relaxed);
  s.brackets_predicted = brackets_predicted_.load(std::memory_order_relaxed);
  s.bracket_misses = bracket_misses_.load(std::memory_order_relaxed);
  s.dropped = ring_.dropped();
  s.pushed = ring_.pushed();
  s.thread_cpu_s = thread_cpu_ns_.load(std::memory_order_relaxed) * 1e-9;
  return s;
}

void PowerSampler::push(RecordKind k, unsigned dev, int64_t t_ns, double value, uint64_t extra,
                        uint16_t aux) {
  Record r{t_ns, value, extra, dev, static_cast<uint8_t>(k), 0, aux};
  ring_.push(r);
}

bool PowerSampler::lane(unsigned dev, Lane lane, int code, NvmlSym sym, int64_t t_ns,
                        unsigned field) {
  if (code != NVML_SUCCESS) errors_.fetch_add(1, std::memory_order_relaxed);
  int& state = devs_[dev].lane_error[lane];
  if (state == code) return false;  // a persisting error is state, not one record per retry
  const bool recovered = code == NVML_SUCCESS;
  state = code;
  push(RecordKind::kError, dev, t_ns, field, static_cast<uint64_t>(code),
       static_cast<uint16_t>(sym));
  return recovered;
}

int PowerSampler::get_samples(DeviceState& d, nvmlValueType_t* vt, unsigned* count) {
  const NvmlApi& api = nvml_->api();
  *count = static_cast<unsigned>(sample_buf_.size());
  const int r = api.DeviceGetSamples(d.handle, NVML_TOTAL_POWER_SAMPLES, d.last_buffer_us, vt,
                                     count, sample_buf_.data());
  if (r != NVML_ERROR_INSUFFICIENT_SIZE) return r;
  // The driver wants a larger array: its size query (samples == NULL) says how large. Only this
  // thread uses the array, so it grows here (rarely, boundedly); then one retry.
  unsigned need = 0;
  const int q = api.DeviceGetSamples(d.handle, NVML_TOTAL_POWER_SAMPLES, d.last_buffer_us, vt,
                                     &need, nullptr);
  if (q == NVML_ERROR_NOT_FOUND) return q;
  if (q != NVML_SUCCESS || need <= sample_buf_.size() || need > kMaxSampleBuf) return r;
  sample_buf_.resize(need);
  *count = need;
  return api.DeviceGetSamples(d.handle, NVML_TOTAL_POWER_SAMPLES, d.last_buffer_us, vt, count,
                              sample_buf_.data());
}

void PowerSampler::drain_buffers() {
  const int64_t offset = measure_offset();
  offset_ns_.store(offset, std::memory_order_relaxed);
  for (unsigned i = 0; i < devs_.size(); ++i) {
    DeviceState& d = devs_[i];
    if (!d.have_buffer) continue;
    // Buffer stamps are host CLOCK_REALTIME µs, de-duplicated against lastSeen. After a step
    // of that clock the driver stamps new samples in a new frame. Backwards, every new sample
    // would look old until the clock caught up, so lastSeen moves into the new frame; the
    // samples taken before the step then come first (the driver returns them in the order it
    // took them), up to the first stamp that decreases, and map with the old offset.
    // Forwards, the old samples' stamps stay below the new ones; those that would lie in the
    // future in the old frame are the new frame's.
    const int64_t step = offset - d.frame_offset_ns;
    const bool back = step < -kClockStepNs, fwd = step > kClockStepNs;
    const unsigned long long seen = d.last_buffer_us;
    if (back) d.last_buffer_us = shift_us(seen, step);
    nvmlValueType_t vt = NVML_VALUE_TYPE_UNSIGNED_INT;
    unsigned count = 0;
    const int r = get_samples(d, &vt, &count);
    const int64_t called = monotonic_ns();
    if (r == NVML_ERROR_NOT_SUPPORTED) d.have_buffer = false;
    // NOT_FOUND: no sample newer than lastSeen, the lane works.
    lane(i, kLaneBuffer, r == NVML_ERROR_NOT_FOUND ? NVML_SUCCESS : r, NvmlSym::DeviceGetSamples,
         called);
    if (r != NVML_SUCCESS && r != NVML_ERROR_NOT_FOUND) {
      d.last_buffer_us = seen;  // the step is handled at the next successful drain
      continue;
    }
    if (r == NVML_ERROR_NOT_FOUND) count = 0;
    // [0, cut) are samples of the frame before a step (or leftovers of it, up to stale_us).
    unsigned cut = 0;
    if (back) {
      cut = count;
      for (unsigned k = 1; k < count; ++k)
        if (sample_buf_[k].timeStamp < sample_buf_[k - 1].timeStamp) {
          cut = k;
          break;
        }
      d.stale_us = cut > 0 ? sample_buf_[cut - 1].timeStamp : 0;
    } else if (fwd) {
      while (cut < count &&
             static_cast<int64_t>(sample_buf_[cut].timeStamp) * 1000 - d.frame_offset_ns <=
                 called + kFutureSlackNs)
        ++cut;
    } else if (d.stale_us != 0) {
      // Until they leave the driver's buffer, the samples taken before a backward step are
      // returned again ahead of the new ones; the run ends at stale_us.
      while (cut < count && sample_buf_[cut].timeStamp != d.stale_us) ++cut;
      if (cut == count) {
        cut = 0;
        d.stale_us = 0;  // gone
      } else {
        ++cut;
      }
    }
    bool first = true;
    for (unsigned k = 0; k < count; ++k) {
      const nvmlSample_t& s = sample_buf_[k];
      int64_t t;
      if (k < cut) {
        if (!(back || fwd) || s.timeStamp <= seen) continue;  // leftovers, or seen before
        t = static_cast<int64_t>(s.timeStamp) * 1000 - d.frame_offset_ns;
      } else {
        if (s.timeStamp <= d.last_buffer_us) continue;  // de-duplicate by driver timestamp
        d.last_buffer_us = s.timeStamp;
        t = static_cast<int64_t>(s.timeStamp) * 1000 - offset;
      }
      // Never out of order or in the future on the monotonic timeline, whatever the driver did.
      if (t <= d.last_buffer_t_ns || t > called + kFutureSlackNs) continue;
      if (first && t - d.last_buffer_t_ns > kGapThresholdNs)
        push(RecordKind::kGap, i, t, (t - d.last_buffer_t_ns) * 1e-9);
      first = false;
      push(RecordKind::kBufferPower, i, t, value_as_double(vt, s.sampleValue) / 1000.0);
      d.last_buffer_t_ns = t;
      buffer_samples_.fetch_add(1, std::memory_order_relaxed);
    }
    // lastSeen is in the new frame from now on (where no new sample came yet: the image of
    // the last one seen, already set for a backward step).
    if (fwd && d.last_buffer_us <= seen) d.last_buffer_us = shift_us(seen, step);
    d.frame_offset_ns = offset;
  }
  drains_.fetch_add(1, std::memory_order_relaxed);
}

void PowerSampler::poll() {
  const NvmlApi& api = nvml_->api();
  for (unsigned i = 0; i < devs_.size(); ++i) {
    DeviceState& d = devs_[i];
    const int64_t t = monotonic_ns();
    auto changed = [&](RecordKind k, double v, double& last) {
      if (v != last) {
        push(k, i, t, v);
        last = v;
      }
    };
    if (d.have_fields) {
      nvmlFieldValue_t fv[2] = {};
      fv[0].fieldId = NVML_FI_DEV_POWER_INSTANT;
      fv[1].fieldId = NVML_FI_DEV_POWER_AVERAGE;
      int r = api.DeviceGetFieldValues(d.handle, 2, fv);
      if (r == NVML_ERROR_NOT_SUPPORTED) d.have_fields = false;
      // After an error the lane's first value is recorded again, so that the trace shows
      // what held when it resumed.
      if (lane(i, kLaneFields, r, NvmlSym::DeviceGetFieldValues, t)) d.last_inst = d.last_avg = -1;
      if (r == NVML_SUCCESS) {
        // Per-field results: a capability error means the device lacks that field (both
        // lacking: fall back to GetPowerUsage); any other error is that field's lane state.
        const int r0 = fv[0].nvmlReturn, r1 = fv[1].nvmlReturn;
        if (is_capability_error(r0) && is_capability_error(r1)) d.have_fields = false;
        if (!is_capability_error(r0) &&
            lane(i, kLaneInstant, r0, NvmlSym::DeviceGetFieldValues, t, NVML_FI_DEV_POWER_INSTANT))
          d.last_inst = -1;
        if (!is_capability_error(r1) &&
            lane(i, kLaneAverage, r1, NvmlSym::DeviceGetFieldValues, t, NVML_FI_DEV_POWER_AVERAGE))
          d.last_avg = -1;
        if (r0 == NVML_SUCCESS)
          changed(RecordKind::kInstantPower, value_as_double(fv[0].valueType, fv[0].value) / 1000.0,
                  d.last_inst);
        if (r1 == NVML_SUCCESS)
          changed(RecordKind::kAveragePower, value_as_double(fv[1].valueType, fv[1].value) / 1000.0,
                  d.last_avg);
      }
    } else if (d.have_usage) {
      unsigned mw = 0;
      int r = api.DeviceGetPowerUsage(d.handle, &mw);
      if (r == NVML_ERROR_NOT_SUPPORTED) d.have_usage = false;
      if (lane(i, kLaneUsage, r, NvmlSym::DeviceGetPowerUsage, t)) d.last_avg = -1;
      if (r == NVML_SUCCESS) changed(RecordKind::kAveragePower, mw / 1000.0, d.last_avg);
    }
    if (!cfg_.poll_clocks) continue;
    unsigned v = 0;
    if (LLM_DVFS_NVML_TRY(api, DeviceGetClockInfo, d.handle, NVML_CLOCK_SM, &v) == NVML_SUCCESS)
      changed(RecordKind::kSmClock, v, d.last_sm);
    if (LLM_DVFS_NVML_TRY(api, DeviceGetClockInfo, d.handle, NVML_CLOCK_MEM, &v) == NVML_SUCCESS)
      changed(RecordKind::kMemClock, v, d.last_mem);
    if (LLM_DVFS_NVML_TRY(api, DeviceGetTemperature, d.handle, NVML_TEMPERATURE_GPU, &v) ==
        NVML_SUCCESS)
      changed(RecordKind::kTemperature, v, d.last_temp);
    unsigned long long reasons = 0;
    if (LLM_DVFS_NVML_TRY(api, DeviceGetCurrentClocksEventReasons, d.handle, &reasons) ==
            NVML_SUCCESS &&
        reasons != d.last_events) {
      push(RecordKind::kClockEvents, i, t, 0.0, reasons);
      d.last_events = reasons;
    }
  }
  polls_.fetch_add(1, std::memory_order_relaxed);
}

void PowerSampler::predict(DeviceState& d, int64_t now_ns) {
  const int64_t period = secs_to_ns(cfg_.counter_grid_s);
  if (period <= 0 || d.grid_off || d.grid_ns == 0) return;
  const int64_t k = (now_ns - d.grid_ns) / period + 1;  // the first grid instant after now
  const int64_t wake = d.grid_ns + k * period - kGridLeadNs;
  if (wake <= now_ns + kBracketSpacingNs) return;       // due soon: read back to back anyway
  d.bracket_next_ns = wake;
  d.bracket_slept = true;
  brackets_predicted_.fetch_add(1, std::memory_order_relaxed);
}

bool PowerSampler::learn(DeviceState& d, int64_t before_ns, int64_t after_ns) {
  const bool slept = d.bracket_slept;
  d.bracket_slept = false;
  const int64_t period = secs_to_ns(cfg_.counter_grid_s);
  if (after_ns - before_ns > kGridTightNs) {
    // Too wide to place the change. Where the bracket slept, the prediction was late: a miss,
    // and the bracket reads on. Otherwise (a delayed read) it ends as it always did.
    if (!slept) return true;
    bracket_misses_.fetch_add(1, std::memory_order_relaxed);
    if (++d.grid_misses >= kGridMaxMisses) d.grid_off = true;
    return false;
  }
  const int64_t change = before_ns + (after_ns - before_ns) / 2;
  if (period > 0 && d.grid_ns != 0 && !d.grid_off) {
    // Is this change on the grid the last one defined? (A wrong period shows up here.)
    const int64_t off = (change - d.grid_ns) % period;
    const int64_t dist = std::min(off, period - off);
    if (dist > kGridToleranceNs) {
      bracket_misses_.fetch_add(1, std::memory_order_relaxed);
      if (++d.grid_misses >= kGridMaxMisses) d.grid_off = true;
    } else {
      d.grid_misses = 0;
    }
  }
  d.grid_ns = change;  // re-anchored at every tight change: no drift accumulates
  return true;
}

void PowerSampler::read_counters(bool all, bool start) {
  const NvmlApi& api = nvml_->api();
  const int64_t pass = monotonic_ns();
  if (start) bracket_deadline_ns_ = std::max(bracket_deadline_ns_, pass + kBracketMaxNs);
  bool any = false;
  for (unsigned i = 0; i < devs_.size(); ++i) {
    DeviceState& d = devs_[i];
    if (!d.have_counter || !(all || d.bracket_on)) continue;
    unsigned long long mj = 0;
    const int64_t a = monotonic_ns();
    int r = api.DeviceGetTotalEnergyConsumption(d.handle, &mj);
    const int64_t b = monotonic_ns();
    if (r == NVML_ERROR_NOT_SUPPORTED) d.have_counter = false;
    lane(i, kLaneCounter, r, NvmlSym::DeviceGetTotalEnergyConsumption, b);
    if (r == NVML_SUCCESS) push(RecordKind::kEnergyCounter, i, a + (b - a) / 2, (b - a) * 1e-9, mj);
    // Brackets. A request during a bracket in progress continues it: the next change comes after
    // this request too. A failed read leaves the bracket running until its deadline.
    if (start && !d.bracket_on && d.have_counter) {
      d.bracket_on = true;
      d.bracket_base = false;
      d.bracket_slept = false;
      brackets_.fetch_add(1, std::memory_order_relaxed);
    }
    if (d.bracket_on) {
      bracket_reads_.fetch_add(1, std::memory_order_relaxed);
      d.bracket_next_ns = pass + kBracketSpacingNs;  // back to back unless predicted below
      if (r == NVML_SUCCESS) {
        const int64_t mid = a + (b - a) / 2;
        if (!d.bracket_base) {
          d.bracket_base = true;
          d.bracket_mj = mj;
          predict(d, mid);
        } else if (mj != d.bracket_mj) {
          if (!learn(d, d.bracket_prev_ns, mid)) {
            // The predicted change came during the sleep: this pair is too wide to use. Read on
            // back to back to the next change (what an unpredicted bracket does), so a miss
            // costs reads and time, never the edge's accuracy.
            d.bracket_mj = mj;
            bracket_deadline_ns_ = std::max(bracket_deadline_ns_, pass + kBracketMaxNs);
          } else {
            d.bracket_on = false;  // the reads before and this one bracket the change
          }
        }
        d.bracket_prev_ns = mid;
      }
      if (!d.have_counter) d.bracket_on = false;
    }
    any = any || d.bracket_on;
  }
  if (any && monotonic_ns() >= bracket_deadline_ns_) {
    for (DeviceState& d : devs_)
      if (d.bracket_on) {
        d.bracket_on = false;
        brackets_unresolved_.fetch_add(1, std::memory_order_relaxed);
      }
    any = false;
  }
  if (!any) bracket_deadline_ns_ = 0;
  bracketing_ = any;
  next_bracket_ns_ = pass + kBracketSpacingNs;
  if (any) {  // the earliest device due: every bracketing device is read in that pass
    int64_t next = INT64_MAX;
    for (const DeviceState& d : devs_)
      if (d.bracket_on) next = std::min(next, d.bracket_next_ns);
    next_bracket_ns_ = next;
  }
  counter_reads_.fetch_add(1, std::memory_order_relaxed);
}

void PowerSampler::run() {
  const int64_t poll_ns = std::max<int64_t>(secs_to_ns(cfg_.poll_period_s), 100000);
  const int64_t drain_ns = std::max<int64_t>(secs_to_ns(cfg_.buffer_period_s), 1000000);
  const int64_t counter_ns = std::max<int64_t>(secs_to_ns(cfg_.counter_period_s), 1000000);
  // A counter read (~3 ms, p99 15 ms on H100) is only started when the next poll is at least
  // this far away, or right after a poll, so it never delays a due poll.
  constexpr int64_t kCounterSlackNs = 15000000;
  int64_t now = monotonic_ns();
  int64_t next_poll = now, next_drain = now, next_counter = now;
  uint64_t served_flush = 0;
  for (;;) {
    uint64_t flush_ticket;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stop_requested_) break;
      flush_ticket = flush_requested_;
    }
    const bool flushing = flush_ticket > served_flush;
    now = monotonic_ns();
    bool polled = false;
    if (now >= next_poll || flushing) {
      poll();
      polled = true;
      next_poll = std::max(next_poll + poll_ns, now + poll_ns / 4);
    }
    if (now >= next_drain || flushing) {
      drain_buffers();
      next_drain = monotonic_ns() + drain_ns;
    }
    // The counter lane: its period, a flush, a window-edge request, or a bracket's next read.
    const bool requested = counter_requested_.load(std::memory_order_relaxed);
    const bool lane_due = now >= next_counter || flushing || requested;
    const bool bracket_due = bracketing_ && now >= next_bracket_ns_;
    const bool counter_due = lane_due || bracket_due;
    // A bracket's reads run back to back: where a poll is due within the slack, that poll is
    // taken now, early, instead of leaving a gap of up to the slack in the reads (which would
    // widen the bracket, the change instant's uncertainty). The poll is not delayed.
    const bool bracket_read = bracket_due || (requested &&
                                              bracket_requested_.load(std::memory_order_relaxed));
    if (bracket_read && !polled && next_poll - monotonic_ns() < kCounterSlackNs) {
      poll();
      polled = true;
      next_poll = std::max(next_poll + poll_ns, monotonic_ns() + poll_ns / 4);
    }
    bool counter_deferred = false;
    if (counter_due && (polled || next_poll - monotonic_ns() >= kCounterSlackNs)) {
      const bool req = counter_requested_.exchange(false, std::memory_order_relaxed);
      const bool start = req && bracket_requested_.exchange(false, std::memory_order_relaxed);
      read_counters(lane_due || req, start);
      if (lane_due || req) next_counter = monotonic_ns() + counter_ns;
    } else if (counter_due) {
      counter_deferred = true;  // served right after the next poll; don't spin until then
    }
    loops_.fetch_add(1, std::memory_order_relaxed);
    thread_cpu_ns_.store(clock_ns(CLOCK_THREAD_CPUTIME_ID), std::memory_order_relaxed);
    if (flushing) {
      served_flush = flush_ticket;
      {
        std::lock_guard<std::mutex> l(mu_);
        flush_done_ = std::max(flush_done_, flush_ticket);
      }
      done_cv_.notify_all();
    }
    // A deferred counter read is served right after the next poll: its own (past) due time must
    // not enter the wake-up time, or the wait would be zero and the loop would spin until then.
    int64_t wake = counter_deferred ? std::min(next_poll, next_drain)
                                    : std::min({next_poll, next_drain, next_counter});
    if (bracketing_) wake = std::min(wake, next_bracket_ns_);
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::nanoseconds(std::max<int64_t>(wake - monotonic_ns(), 0)), [&] {
      return stop_requested_ || flush_requested_ > served_flush ||
             (!counter_deferred && counter_requested_.load(std::memory_order_relaxed));
    });
  }
}

}  // namespace llm_dvfs
