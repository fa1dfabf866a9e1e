// Stream-ordered marks mapped onto the host CLOCK_MONOTONIC timeline (the sampler's).
//
// Three modes:
//   event    - mark() records a pooled CUDA event on the caller's stream: asynchronous, a few
//              µs of host time, no synchronisation. resolve() waits for the marks, then maps
//              each event to host time through calibration points: an event recorded on a
//              private idle stream while the host spins on cuEventQuery, bracketing its
//              completion between two host clock reads. Relative GPU times come from
//              cuEventElapsedTime against the nearest calibration event; a linear fit over
//              the calibration history corrects the GPU/host clock drift.
//   callback - mark() enqueues cuLaunchHostFunc on the stream; the driver thread writes
//              monotonic_ns() into a preallocated slot when the stream reaches it. Simple, but
//              it blocks the stream while the callback runs and its latency is unknown (no
//              uncertainty is reported); kept so both can be measured on a real GPU.
//   host     - mark() reads the host clock (CPU inference, or no CUDA at all).
// A Timeline is meant to be driven from one thread; calls are serialised by a mutex anyway.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_api.h"

namespace llm_dvfs {

// A CUDA driver call failed. code is the CUresult, function the driver symbol name.
class CudaError : public std::runtime_error {
 public:
  CudaError(int code, std::string function, std::string name, const std::string& message)
      : std::runtime_error(message), code(code), function(std::move(function)), name(std::move(name)) {}
  int code;
  std::string function;
  std::string name;  // e.g. CUDA_ERROR_NOT_READY ("" when the driver cannot name it)
};

// Marks did not complete (or callbacks did not run) within the timeout.
class TimelineTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The loaded driver library (LLM_DVFS_CUDA_LIBRARY, else libcuda.so.1), cuInit(0) done.
// Loaded on first call, never unloaded. Throws LoadError (nvml.h) or CudaError.
const CudaApi& cuda_api();
std::string cuda_library_path();                  // "" when not loaded
std::map<std::string, bool> cuda_symbol_table();  // resolved name -> present ({} if not loaded)
int cuda_driver_version();                        // e.g. 12080; loads the library

enum class TimelineMode : int { kHost = 0, kEvent = 1, kCallback = 2 };

struct CalibrationPoint {
  int64_t host_ns = 0;        // host time of the calibration event (bracket midpoint)
  int64_t half_width_ns = 0;  // half the bracket: the alignment uncertainty of this point
  double gpu_ns = 0.0;        // GPU time, chained from the first calibration of this Timeline
};

struct Resolution {
  std::vector<int64_t> t_ns;            // mark time on the host monotonic timeline
  std::vector<int64_t> host_call_ns;    // when mark() was called (host), for queue-depth analysis
  std::vector<int64_t> uncertainty_ns;  // alignment uncertainty bound; -1 = unknown (callback)
  std::vector<int32_t> label;
  double drift_ppm = 0.0;               // fitted (GPU clock rate / host clock rate - 1) * 1e6
  bool drift_fitted = false;            // false: calibration span too short, drift taken as 0
  size_t calibrations = 0;              // calibration points used for the drift fit
  int64_t max_uncertainty_ns = 0;       // max over marks (-1 if unknown)
};

struct TimelineStats {
  uint64_t marks = 0, calibrations = 0, events_created = 0, query_spins = 0;
  size_t pool_free = 0;
  int64_t last_half_width_ns = -1;
};

class Timeline {
 public:
  // reserve: events (event mode) or slots (callback mode) created up front, so that mark()
  // does not allocate in the common case. auto_calibrate_s: in event mode, a mark taken longer
  // than this after the last calibration first takes a new one (keeps float elapsed times
  // short: cuEventElapsedTime returns float ms). Needs a current CUDA context in event and
  // callback modes (torch creates it); throws LoadError / CudaError otherwise.
  explicit Timeline(TimelineMode mode, size_t reserve = 1024, double auto_calibrate_s = 5.0);
  ~Timeline();  // waits (bounded) for pending callbacks; never destroys events still in use
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  // Record a mark on `stream` (a CUstream/cudaStream_t value; 0 = legacy default stream).
  // Returns its index. Non-blocking except for a calibration spin (~10 µs) on the first mark
  // and every auto_calibrate_s.
  size_t mark(uintptr_t stream, int32_t label);
  // Whether the next mark() starts with a calibration (event mode: none yet, or the last is
  // older than auto_calibrate_s), so that a caller holding a lock (the GIL) can drop it first.
  bool calibration_due() const;
  // Event mode: take a calibration point now (best of `repeats` brackets). Other modes: a
  // point with host_ns = now and zero width.
  CalibrationPoint calibrate(int repeats = 3);
  // Wait until every mark has completed (up to timeout_s; < 0 = forever), then map all marks
  // to host time. Throws TimelineTimeout or CudaError. Marks stay; resolve() may be repeated.
  Resolution resolve(double timeout_s);
  // Forget the marks (events go back to the pool). Waits for pending callbacks first.
  void clear();

  size_t size() const;
  TimelineMode mode() const { return mode_; }
  TimelineStats stats() const;
  std::vector<CalibrationPoint> calibration_history() const;

 private:
  struct Mark {
    CUevent event = nullptr;
    int64_t host_call_ns = 0;
    int32_t label = 0;
    int32_t anchor = -1;  // index into anchors_ of the calibration before this mark
  };
  struct Anchor {
    CUevent event = nullptr;
    CalibrationPoint point;
  };
  struct Ctx;  // pushes the Timeline's context onto the calling thread when it is not current

  bool calibration_due_locked(int64_t now) const;
  CUevent take_event();
  CalibrationPoint calibrate_locked(int repeats);
  void wait_marks_locked(double timeout_s);
  void wait_callbacks_locked(double timeout_s);
  std::atomic<int64_t>* slot(size_t i);
  void release_anchors_locked(bool keep_last);
  [[noreturn]] void fail(CUresult r, CudaSym sym) const;

  TimelineMode mode_;
  double auto_calibrate_s_;
  const CudaApi* api_ = nullptr;
  CUcontext ctx_ = nullptr;
  CUstream cal_stream_ = nullptr;

  mutable std::mutex mu_;
  std::vector<Mark> marks_;
  std::vector<CUevent> pool_;
  std::vector<Anchor> anchors_;
  std::vector<CalibrationPoint> history_;  // bounded; drives the drift fit
  // Callback slots: fixed-size chunks so that pointers handed to the driver stay valid.
  static constexpr size_t kChunk = 1024;
  std::vector<std::unique_ptr<std::atomic<int64_t>[]>> chunks_;
  TimelineStats stats_;
};

}  // namespace llm_dvfs
