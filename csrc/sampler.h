// PowerSampler: one native thread for all monitored devices, three lanes (DESIGN.md):
//   buffer  - drains nvmlDeviceGetSamples(TOTAL_POWER) (~20 ms samples, ~2.4 s deep on H100)
//   poll    - instant/average power fields, SM/mem clocks, temperature, clock-event reasons;
//             only changes are stored, stamped with the poll time
//   counter - total energy counter (slow: ~3 ms/call), on its own period, on request at window
//             edges, and scheduled so that it never delays a due poll. A window-edge request
//             starts a bracket (bracket_edges): reads back to back until the value changes
//             (it changes every ~100 ms) or kBracketMaxNs pass, so that two consecutive reads
//             bracket a change instant within a few ms (meter/stitch.py uses it)
// An NVML error is lane state: one kError record when a lane's error starts or changes, one with
// code 0 when the lane works again; the failing call is retried on the lane's schedule.
// Every record is stamped on the host CLOCK_MONOTONIC timeline (ns). The thread never touches
// Python; the consumer (Python, GIL released while waiting) drains the ring.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "nvml.h"
#include "ring.h"

namespace llm_dvfs {

enum class RecordKind : uint8_t {
  kBufferPower = 0,   // value = W, from the driver sample buffer (t = sample time)
  kInstantPower = 1,  // value = W, field 186 (t = poll time)
  kAveragePower = 2,  // value = W, field 185 / GetPowerUsage (1 s average on H100)
  kSmClock = 3,       // value = MHz
  kMemClock = 4,      // value = MHz
  kTemperature = 5,   // value = °C
  kClockEvents = 6,   // extra = NVML clock-event reason bits
  kEnergyCounter = 7, // extra = mJ; t = midpoint of the call; value = call duration s
  kError = 8,         // a lane's error state changed: extra = nvmlReturn_t (0 = the lane works
                      // again), aux = NvmlSym index of the call, value = field id for one field
                      // of nvmlDeviceGetFieldValues (0 for the call itself)
  kGap = 9,           // value = seconds of buffer samples that were lost (also around a
                      // realtime-clock step, where the buffer lane restarts)
};

struct Record {
  int64_t t_ns;
  double value;
  uint64_t extra;
  uint32_t device;  // position in the sampler's device list
  uint8_t kind;
  uint8_t pad;
  uint16_t aux;
};
static_assert(sizeof(Record) == 32, "Record is meant to be 32 bytes");

struct SamplerConfig {
  std::vector<unsigned> nvml_indices;
  double buffer_period_s = 0.25;  // drain interval; the H100 buffer holds ~2.4 s
  double poll_period_s = 0.05;    // fields change every ~100 ms on H100
  double counter_period_s = 1.0;
  size_t capacity = 1u << 19;     // records; ~1.4 h at the default rates of one GPU
  bool poll_clocks = true;
  bool bracket_edges = true;      // a window-edge request reads until the counter changes
  // The counter's update period where it changes on a fixed grid (100.002 ms measured on H100
  // and H200): a bracket then sleeps until just before the predicted change instead of reading
  // back to back through the period. 0 = no prediction. A wrong period is detected (misses) and
  // prediction turned off for that device; a miss costs reads, never the bracket's width.
  double counter_grid_s = 0.1;
};

struct SamplerStats {
  // errors: failed NVML calls (every retry); the ring holds one kError per state change.
  // counter_reads: counter read passes (each reads every device, or a bracket's devices).
  // brackets: per device, brackets started; bracket_reads: counter reads made for them;
  // brackets_unresolved: brackets that ended at kBracketMaxNs without seeing a change.
  uint64_t loops = 0, drains = 0, polls = 0, counter_reads = 0, buffer_samples = 0, errors = 0;
  // brackets_predicted: brackets that slept to a predicted change; bracket_misses: predictions
  // the counter did not follow (the change came during the sleep, or off the grid).
  uint64_t brackets = 0, bracket_reads = 0, brackets_unresolved = 0;
  uint64_t brackets_predicted = 0, bracket_misses = 0;
  uint64_t dropped = 0, pushed = 0;
  double thread_cpu_s = 0.0;
};

int64_t monotonic_ns();
int64_t realtime_ns();

class PowerSampler {
 public:
  explicit PowerSampler(SamplerConfig cfg);
  ~PowerSampler();  // stops and joins
  PowerSampler(const PowerSampler&) = delete;
  PowerSampler& operator=(const PowerSampler&) = delete;

  void start();  // idempotent
  void stop();   // idempotent; joins the thread
  bool running() const { return running_.load(std::memory_order_acquire); }

  // Ask for a counter read as soon as it delays no due poll (window edges). Non-blocking. With
  // bracket (and cfg.bracket_edges) the read starts a bracket: the counter is read again, back to
  // back (at most one read per kBracketSpacingNs), until its value changes or kBracketMaxNs pass.
  void request_counter(bool bracket = true);
  // Run every lane now and wait until done (or timeout). Returns false on timeout.
  bool flush(double timeout_s);
  // Consumer side: move up to max records out of the ring. Thread-safe among consumers.
  size_t drain(Record* out, size_t max);
  size_t pending() const { return ring_.size(); }

  SamplerStats stats() const;
  const SamplerConfig& config() const { return cfg_; }
  // (realtime - monotonic) in ns as last measured by the sampler; maps buffer timestamps.
  int64_t clock_offset_ns() const { return offset_ns_.load(std::memory_order_relaxed); }

 private:
  // Lanes whose NVML errors are held as state (one each per device).
  enum Lane : int { kLaneBuffer, kLaneFields, kLaneInstant, kLaneAverage, kLaneUsage,
                    kLaneCounter, kLaneCount };

  struct DeviceState {
    nvmlDevice_t handle = nullptr;
    unsigned long long last_buffer_us = 0;  // de-duplication point for the buffer lane
    int64_t frame_offset_ns = 0;            // (realtime - monotonic) of last_buffer_us's frame
    unsigned long long stale_us = 0;        // last stamp taken before a backward realtime step
    int64_t last_buffer_t_ns = 0;           // monotonic time of the last buffer sample pushed
    bool have_buffer = true, have_fields = true, have_counter = true, have_usage = true;
    double last_inst = -1, last_avg = -1, last_sm = -1, last_mem = -1, last_temp = -1;
    uint64_t last_events = ~0ull;
    int lane_error[kLaneCount] = {};  // nvmlReturn_t in force per lane, 0 = working
    // Bracket in progress (sampler thread only): read until the value leaves bracket_mj.
    bool bracket_on = false, bracket_base = false;  // base: bracket_mj holds a first value
    unsigned long long bracket_mj = 0;
    int64_t bracket_prev_ns = 0;  // midpoint of the bracket's previous read
    int64_t bracket_next_ns = 0;  // earliest start of this device's next bracket read
    bool bracket_slept = false;   // the bracket is waiting for a predicted change
    // The counter's change grid (sampler thread only): the last tight change instant seen.
    int64_t grid_ns = 0;          // 0 = none yet
    int grid_misses = 0;          // consecutive; prediction is off for good at kGridMaxMisses
    bool grid_off = false;
  };

  void run();
  void drain_buffers();
  int get_samples(DeviceState& d, nvmlValueType_t* vt, unsigned* count);
  void poll();
  // Reads the counter of every device (all), or of the devices with a bracket in progress;
  // start: a window-edge request, which starts a bracket on every device read.
  void read_counters(bool all = true, bool start = false);
  // Grid prediction (sampler thread only): predict() schedules a bracket's next read just
  // before the predicted change; learn() takes a bracketed change into the grid and returns
  // false where the pair is too wide after a predicted sleep (the bracket then reads on).
  void predict(DeviceState& d, int64_t now_ns);
  bool learn(DeviceState& d, int64_t before_ns, int64_t after_ns);
  void push(RecordKind k, unsigned dev, int64_t t_ns, double value, uint64_t extra = 0,
            uint16_t aux = 0);
  // Records lane's result: true when it changed from an error to working (re-record values).
  bool lane(unsigned dev, Lane lane, int code, NvmlSym sym, int64_t t_ns, unsigned field = 0);
  int64_t measure_offset() const;

  SamplerConfig cfg_;
  std::unique_ptr<NvmlSession> nvml_;
  std::vector<DeviceState> devs_;
  std::vector<nvmlSample_t> sample_buf_;
  SpscRing<Record> ring_;
  std::mutex consumer_mu_;

  std::thread thread_;
  std::mutex mu_;  // guards the wake-up condition only; never held across an NVML call
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::atomic<bool> running_{false};
  bool stop_requested_ = false;           // guarded by mu_
  uint64_t flush_requested_ = 0;          // guarded by mu_
  uint64_t flush_done_ = 0;               // guarded by mu_
  std::atomic<bool> counter_requested_{false};
  std::atomic<bool> bracket_requested_{false};
  // Sampler thread only: a bracket is in progress on some device, until bracket_deadline_ns_.
  bool bracketing_ = false;
  int64_t bracket_deadline_ns_ = 0;
  int64_t next_bracket_ns_ = 0;  // earliest start of the bracket's next read
  std::atomic<int64_t> offset_ns_{0};

  // Stats written by the sampler thread, read by anyone (relaxed: monotonic counters).
  std::atomic<uint64_t> loops_{0}, drains_{0}, polls_{0}, counter_reads_{0}, buffer_samples_{0},
      errors_{0}, brackets_{0}, bracket_reads_{0}, brackets_unresolved_{0},
      brackets_predicted_{0}, bracket_misses_{0};
  std::atomic<int64_t> thread_cpu_ns_{0};
};

}  // namespace llm_dvfs
