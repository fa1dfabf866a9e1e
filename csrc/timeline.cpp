#include "timeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <thread>

#include "dynlib.h"
#include "nvml.h"     // LoadError
#include "sampler.h"  // monotonic_ns(): the one host timeline

namespace llm_dvfs {
namespace {

// ---------------------------------------------------------------------------------------------
// Library loading: same pattern as nvml.cpp, but the library is never unloaded. torch holds
// libcuda.so.1 for the life of the process, and contexts/events outlive any one Timeline.

std::mutex g_cuda_mu;  // guards loading; the table is immutable once g_cuda_ready is set
std::unique_ptr<DynLib> g_cuda_lib;
CudaApi g_cuda;
std::atomic<bool> g_cuda_ready{false};

void resolve_cuda(const DynLib& lib, CudaApi& api) {
  std::string missing;
#define LLM_DVFS_X(...) LLM_DVFS_RESOLVE_ENTRY(CudaSym, __VA_ARGS__)
  LLM_DVFS_CUDA_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  if (!missing.empty())
    throw LoadError(LoadError::Kind::kSymbolNotFound,
                    "the CUDA driver library at " + lib.path() + " lacks required symbol(s): " +
                        missing + " (driver too old? the timeline needs CUDA >= 10)");
}

CudaError make_cuda_error(const CudaApi& api, CUresult r, const char* function,
                          const std::string& context = "") {
  const char* name = nullptr;
  const char* text = nullptr;
  if (api.GetErrorName) api.GetErrorName(r, &name);
  if (api.GetErrorString) api.GetErrorString(r, &text);
  std::string msg = std::string(function) + " failed: " + (name ? name : "CUDA error") + " (" +
                    std::to_string(r) + ")";
  if (text) msg += ": " + std::string(text);
  if (!context.empty()) msg += " — " + context;
  return CudaError(r, function, name ? name : "", msg);
}

// Host-callback mark: runs on a driver thread when the stream reaches it.
void host_mark(void* slot) {
  static_cast<std::atomic<int64_t>*>(slot)->store(monotonic_ns(), std::memory_order_release);
}

// cuEventElapsedTime resolution (~0.5 µs per the driver docs) counted once per timestamp pair.
constexpr int64_t kEventResolutionNs = 500;
// Drift is only fitted over calibration points this close to the newest one.
constexpr int64_t kDriftWindowNs = 600'000'000'000;
constexpr size_t kHistoryMax = 256;
// Assumed bound on host/GPU clock drift when it cannot be fitted (span too short).
constexpr double kAssumedDrift = 50e-6;
constexpr double kMaxPlausibleDrift = 1e-3;

// Half a float ulp of x (ms), in ns: the rounding error of one cuEventElapsedTime result.
double half_ulp_ns(float ms) {
  const float a = std::fabs(ms);
  return 0.5 * static_cast<double>(std::nextafter(a, std::numeric_limits<float>::infinity()) - a) *
         1e6;
}

void wait_a_little(int64_t waited_ns) {
  // Spin briefly (marks usually complete within µs of generate() returning), then sleep.
  if (waited_ns < 50'000)
    std::this_thread::yield();
  else
    std::this_thread::sleep_for(std::chrono::microseconds(waited_ns < 5'000'000 ? 20 : 200));
}

// Callback slot chunks that may still be written by the driver when their Timeline dies.
std::mutex g_graveyard_mu;
std::vector<std::unique_ptr<std::atomic<int64_t>[]>> g_graveyard;

}  // namespace

// ---------------------------------------------------------------------------------------------

const CudaApi& cuda_api() {
  if (g_cuda_ready.load(std::memory_order_acquire)) return g_cuda;
  std::lock_guard<std::mutex> lock(g_cuda_mu);
  if (g_cuda_ready.load(std::memory_order_relaxed)) return g_cuda;
  const std::string override_path = env_or_empty("LLM_DVFS_CUDA_LIBRARY");
  auto lib = override_path.empty()
                 ? std::make_unique<DynLib>(
                       std::initializer_list<std::string>{"libcuda.so.1", "libcuda.so"})
                 : std::make_unique<DynLib>(std::initializer_list<std::string>{override_path});
  if (!lib->ok())
    throw LoadError(LoadError::Kind::kLibraryNotFound,
                    "could not load the CUDA driver library (" + lib->error() +
                        "). Install the NVIDIA driver, or point LLM_DVFS_CUDA_LIBRARY at "
                        "libcuda.so.1; CPU-only runs use host-clock marks instead");
  CudaApi api;
  resolve_cuda(*lib, api);
  const CUresult r = api.Init(0);
  if (r != CUDA_SUCCESS) throw make_cuda_error(api, r, api.name(CudaSym::Init));
  g_cuda = api;
  g_cuda_lib = std::move(lib);
  g_cuda_ready.store(true, std::memory_order_release);
  return g_cuda;
}

std::string cuda_library_path() {
  std::lock_guard<std::mutex> lock(g_cuda_mu);
  return g_cuda_lib ? g_cuda_lib->path() : std::string();
}

std::map<std::string, bool> cuda_symbol_table() {
  std::lock_guard<std::mutex> lock(g_cuda_mu);
  std::map<std::string, bool> out;
  if (!g_cuda_lib) return out;
#define LLM_DVFS_X(member, ...) out[g_cuda.name(CudaSym::member)] = g_cuda.member != nullptr;
  LLM_DVFS_CUDA_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  return out;
}

int cuda_driver_version() {
  const CudaApi& api = cuda_api();
  int v = 0;
  const CUresult r = api.DriverGetVersion(&v);
  if (r != CUDA_SUCCESS) throw make_cuda_error(api, r, api.name(CudaSym::DriverGetVersion));
  return v;
}

// ---------------------------------------------------------------------------------------------

struct Timeline::Ctx {
  const CudaApi* api;
  bool pushed = false;
  explicit Ctx(const Timeline& t) : api(t.api_) {
    if (!api) return;
    CUcontext cur = nullptr;
    if (api->CtxGetCurrent(&cur) == CUDA_SUCCESS && cur == t.ctx_) return;
    const CUresult r = api->CtxPushCurrent(t.ctx_);
    if (r != CUDA_SUCCESS) t.fail(r, CudaSym::CtxPushCurrent);
    pushed = true;
  }
  ~Ctx() {
    if (pushed) {
      CUcontext popped = nullptr;
      api->CtxPopCurrent(&popped);
    }
  }
  Ctx(const Ctx&) = delete;
  Ctx& operator=(const Ctx&) = delete;
};

void Timeline::fail(CUresult r, CudaSym sym) const {
  throw make_cuda_error(*api_, r, api_->name(sym));
}

Timeline::Timeline(TimelineMode mode, size_t reserve, double auto_calibrate_s)
    : mode_(mode), auto_calibrate_s_(auto_calibrate_s > 0 ? auto_calibrate_s : 5.0) {
  marks_.reserve(std::max<size_t>(reserve, 16));
  if (mode_ == TimelineMode::kHost) return;
  api_ = &cuda_api();
  CUresult r = api_->CtxGetCurrent(&ctx_);
  if (r != CUDA_SUCCESS) fail(r, CudaSym::CtxGetCurrent);
  if (!ctx_)
    throw make_cuda_error(*api_, CUDA_ERROR_INVALID_CONTEXT, api_->name(CudaSym::CtxGetCurrent),
                          "no current CUDA context on this thread; initialise CUDA on the device "
                          "first (e.g. torch.cuda.init() inside `with torch.cuda.device(i)`)");
  if (mode_ == TimelineMode::kCallback) {
    if (!api_->LaunchHostFunc)
      throw make_cuda_error(*api_, CUDA_ERROR_NOT_SUPPORTED, "cuLaunchHostFunc",
                            "the driver lacks cuLaunchHostFunc (CUDA >= 10)");
    for (size_t i = 0; i < reserve; i += kChunk) slot(i);
    return;
  }
  r = api_->StreamCreate(&cal_stream_, CU_STREAM_NON_BLOCKING);
  if (r != CUDA_SUCCESS) fail(r, CudaSym::StreamCreate);
  pool_.reserve(reserve);
  for (size_t i = 0; i < reserve; ++i) {
    CUevent e = nullptr;
    r = api_->EventCreate(&e, CU_EVENT_DEFAULT);
    if (r != CUDA_SUCCESS) {
      for (CUevent p : pool_) api_->EventDestroy(p);
      api_->StreamDestroy(cal_stream_);
      fail(r, CudaSym::EventCreate);
    }
    pool_.push_back(e);
    ++stats_.events_created;
  }
}

Timeline::~Timeline() {
  std::lock_guard<std::mutex> lock(mu_);
  if (mode_ == TimelineMode::kCallback) {
    try {
      wait_callbacks_locked(5.0);
    } catch (...) {
      // The driver may still write into the slots: keep them alive until process exit.
      std::lock_guard<std::mutex> g(g_graveyard_mu);
      for (auto& c : chunks_) g_graveyard.push_back(std::move(c));
    }
    return;
  }
  if (mode_ != TimelineMode::kEvent) return;
  // Errors are ignored: at interpreter exit the context may already be gone. Destroying an
  // event that is still pending is allowed; the driver frees it once it completes.
  try {
    Ctx c(*this);
    for (const Mark& m : marks_) api_->EventDestroy(m.event);
    for (const Anchor& a : anchors_) api_->EventDestroy(a.event);
    for (CUevent e : pool_) api_->EventDestroy(e);
    if (cal_stream_) api_->StreamDestroy(cal_stream_);
  } catch (...) {
  }
}

std::atomic<int64_t>* Timeline::slot(size_t i) {
  const size_t chunk = i / kChunk;
  while (chunks_.size() <= chunk) chunks_.emplace_back(new std::atomic<int64_t>[kChunk]);
  return &chunks_[chunk][i % kChunk];
}

CUevent Timeline::take_event() {
  if (pool_.empty()) {
    for (int i = 0; i < 64; ++i) {
      CUevent e = nullptr;
      const CUresult r = api_->EventCreate(&e, CU_EVENT_DEFAULT);
      if (r != CUDA_SUCCESS) fail(r, CudaSym::EventCreate);
      pool_.push_back(e);
      ++stats_.events_created;
    }
  }
  CUevent e = pool_.back();
  pool_.pop_back();
  return e;
}

bool Timeline::calibration_due_locked(int64_t now) const {
  return mode_ == TimelineMode::kEvent &&
         (anchors_.empty() ||
          now - anchors_.back().point.host_ns > static_cast<int64_t>(auto_calibrate_s_ * 1e9));
}

bool Timeline::calibration_due() const {
  const int64_t now = monotonic_ns();
  std::lock_guard<std::mutex> lock(mu_);
  return calibration_due_locked(now);
}

size_t Timeline::mark(uintptr_t stream, int32_t label) {
  const int64_t now = monotonic_ns();
  std::lock_guard<std::mutex> lock(mu_);
  Mark m;
  m.host_call_ns = now;
  m.label = label;
  if (mode_ == TimelineMode::kEvent) {
    Ctx c(*this);
    if (calibration_due_locked(now)) calibrate_locked(3);
    m.event = take_event();
    const CUresult r = api_->EventRecord(m.event, reinterpret_cast<CUstream>(stream));
    if (r != CUDA_SUCCESS) {
      pool_.push_back(m.event);
      fail(r, CudaSym::EventRecord);
    }
    m.anchor = static_cast<int32_t>(anchors_.size()) - 1;
  } else if (mode_ == TimelineMode::kCallback) {
    Ctx c(*this);
    std::atomic<int64_t>* s = slot(marks_.size());
    s->store(-1, std::memory_order_relaxed);
    const CUresult r = api_->LaunchHostFunc(reinterpret_cast<CUstream>(stream),
                                            &host_mark, s);
    if (r != CUDA_SUCCESS) fail(r, CudaSym::LaunchHostFunc);
  }
  marks_.push_back(m);
  ++stats_.marks;
  return marks_.size() - 1;
}

CalibrationPoint Timeline::calibrate(int repeats) {
  std::lock_guard<std::mutex> lock(mu_);
  if (mode_ != TimelineMode::kEvent) {
    CalibrationPoint p;
    p.host_ns = monotonic_ns();
    p.gpu_ns = static_cast<double>(p.host_ns);
    return p;
  }
  Ctx c(*this);
  return calibrate_locked(repeats);
}

CalibrationPoint Timeline::calibrate_locked(int repeats) {
  // Record an event on the private idle stream and spin on cuEventQuery: the event completed
  // after the start of the last query that said NOT_READY (or after the record call) and
  // before the return of the query that said SUCCESS. The best of `repeats` brackets is kept.
  CUevent best = nullptr;
  int64_t best_lo = 0, best_hi = std::numeric_limits<int64_t>::max();
  for (int i = 0; i < std::max(repeats, 1); ++i) {
    CUevent ev = take_event();
    int64_t lo = monotonic_ns();
    CUresult r = api_->EventRecord(ev, cal_stream_);
    if (r != CUDA_SUCCESS) {
      pool_.push_back(ev);
      if (best) pool_.push_back(best);
      fail(r, CudaSym::EventRecord);
    }
    const int64_t deadline = lo + 2'000'000'000;
    int64_t hi = 0;
    for (;;) {
      const int64_t tq = monotonic_ns();
      r = api_->EventQuery(ev);
      if (r == CUDA_SUCCESS) {
        hi = monotonic_ns();
        break;
      }
      if (r != CUDA_ERROR_NOT_READY) {
        pool_.push_back(ev);
        if (best) pool_.push_back(best);
        fail(r, CudaSym::EventQuery);
      }
      lo = std::max(lo, tq);
      ++stats_.query_spins;
      if (tq > deadline) {
        pool_.push_back(ev);
        if (best) pool_.push_back(best);
        throw TimelineTimeout("calibration event on an idle stream did not complete within 2 s");
      }
    }
    if (hi - lo < best_hi - best_lo) {
      if (best) pool_.push_back(best);
      best = ev;
      best_lo = lo;
      best_hi = hi;
    } else {
      pool_.push_back(ev);
    }
  }
  Anchor a;
  a.event = best;
  a.point.half_width_ns = (best_hi - best_lo) / 2;
  a.point.host_ns = best_lo + a.point.half_width_ns;
  if (anchors_.empty()) {
    // First point of this Timeline: the GPU frame starts aligned with the host frame.
    a.point.gpu_ns = static_cast<double>(a.point.host_ns);
  } else {
    // Chain from the previous calibration: each elapsed time stays short, so float ms keeps
    // sub-µs precision however long the Timeline lives.
    const Anchor& prev = anchors_.back();
    float ms = 0.f;
    const CUresult r = api_->EventElapsedTime(&ms, prev.event, best);
    if (r != CUDA_SUCCESS) {
      pool_.push_back(best);
      fail(r, CudaSym::EventElapsedTime);
    }
    a.point.gpu_ns = prev.point.gpu_ns + static_cast<double>(ms) * 1e6;
  }
  anchors_.push_back(a);
  history_.push_back(a.point);
  if (history_.size() > kHistoryMax) history_.erase(history_.begin());
  ++stats_.calibrations;
  stats_.last_half_width_ns = a.point.half_width_ns;
  return a.point;
}

void Timeline::wait_marks_locked(double timeout_s) {
  const int64_t start = monotonic_ns();
  const int64_t limit = timeout_s < 0 ? std::numeric_limits<int64_t>::max()
                                      : static_cast<int64_t>(timeout_s * 1e9);
  // Marks complete in stream order, so scanning from the newest usually needs one wait.
  for (size_t k = marks_.size(); k-- > 0;) {
    for (;;) {
      const CUresult r = api_->EventQuery(marks_[k].event);
      if (r == CUDA_SUCCESS) break;
      if (r != CUDA_ERROR_NOT_READY) fail(r, CudaSym::EventQuery);
      const int64_t waited = monotonic_ns() - start;
      if (waited > limit)
        throw TimelineTimeout("timeline marks did not complete within " +
                              std::to_string(timeout_s) + " s (is the stream still running?)");
      wait_a_little(waited);
    }
  }
}

void Timeline::wait_callbacks_locked(double timeout_s) {
  const int64_t start = monotonic_ns();
  const int64_t limit = timeout_s < 0 ? std::numeric_limits<int64_t>::max()
                                      : static_cast<int64_t>(timeout_s * 1e9);
  for (size_t i = marks_.size(); i-- > 0;) {
    while (slot(i)->load(std::memory_order_acquire) < 0) {
      const int64_t waited = monotonic_ns() - start;
      if (waited > limit)
        throw TimelineTimeout("timeline host callbacks did not run within " +
                              std::to_string(timeout_s) + " s (is the stream still running?)");
      wait_a_little(waited);
    }
  }
}

Resolution Timeline::resolve(double timeout_s) {
  std::lock_guard<std::mutex> lock(mu_);
  Resolution out;
  const size_t n = marks_.size();
  out.t_ns.resize(n);
  out.host_call_ns.resize(n);
  out.uncertainty_ns.resize(n);
  out.label.resize(n);
  for (size_t i = 0; i < n; ++i) {
    out.host_call_ns[i] = marks_[i].host_call_ns;
    out.label[i] = marks_[i].label;
  }
  if (mode_ == TimelineMode::kHost) {
    out.t_ns = out.host_call_ns;
    std::fill(out.uncertainty_ns.begin(), out.uncertainty_ns.end(), 0);
    return out;
  }
  if (mode_ == TimelineMode::kCallback) {
    wait_callbacks_locked(timeout_s);
    for (size_t i = 0; i < n; ++i) out.t_ns[i] = slot(i)->load(std::memory_order_acquire);
    std::fill(out.uncertainty_ns.begin(), out.uncertainty_ns.end(), -1);
    out.max_uncertainty_ns = -1;
    return out;
  }
  if (n == 0) return out;

  Ctx c(*this);
  wait_marks_locked(timeout_s);
  calibrate_locked(3);  // a point after every mark: marks are interpolated, not extrapolated

  // Drift: least-squares slope of host time against chained GPU time over recent points.
  const CalibrationPoint& newest = history_.back();
  double sx = 0, sy = 0, sxx = 0, sxy = 0, cnt = 0, max_half = 0;
  double gmin = std::numeric_limits<double>::max(), gmax = std::numeric_limits<double>::lowest();
  for (const CalibrationPoint& p : history_) {
    if (newest.host_ns - p.host_ns > kDriftWindowNs) continue;
    const double x = p.gpu_ns - newest.gpu_ns;  // centred: keeps the sums well conditioned
    const double y = static_cast<double>(p.host_ns - newest.host_ns);
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
    cnt += 1;
    gmin = std::min(gmin, p.gpu_ns);
    gmax = std::max(gmax, p.gpu_ns);
    max_half = std::max(max_half, static_cast<double>(p.half_width_ns));
  }
  double slope = 1.0, slope_err = kAssumedDrift;
  const double span = gmax - gmin;
  if (cnt >= 2 && span >= 10e6) {
    const double den = cnt * sxx - sx * sx;
    const double b = den > 0 ? (cnt * sxy - sx * sy) / den : 1.0;
    if (std::fabs(b - 1.0) <= kMaxPlausibleDrift) {
      slope = b;
      slope_err = 2.0 * max_half / span;
      out.drift_fitted = true;
    }
  }
  out.drift_ppm = (1.0 / slope - 1.0) * 1e6;
  out.calibrations = static_cast<size_t>(cnt);

  int64_t max_unc = 0;
  for (size_t i = 0; i < n; ++i) {
    const Mark& m = marks_[i];
    const size_t k = static_cast<size_t>(std::max(m.anchor, 0));
    const Anchor& a = anchors_[k];
    float ms = 0.f;
    const CUresult r = api_->EventElapsedTime(&ms, a.event, m.event);
    if (r != CUDA_SUCCESS) fail(r, CudaSym::EventElapsedTime);
    const double gpu = a.point.gpu_ns + static_cast<double>(ms) * 1e6;
    double rounding = half_ulp_ns(ms);
    // Use whichever bracketing calibration is nearer in GPU time (less drift to correct).
    size_t j = k;
    if (k + 1 < anchors_.size() &&
        std::fabs(anchors_[k + 1].point.gpu_ns - gpu) < std::fabs(a.point.gpu_ns - gpu)) {
      j = k + 1;
      // The next point's GPU time was chained through one more float elapsed time.
      rounding += half_ulp_ns(static_cast<float>((anchors_[j].point.gpu_ns - a.point.gpu_ns) / 1e6));
    }
    const CalibrationPoint& p = anchors_[j].point;
    const double delta = gpu - p.gpu_ns;
    out.t_ns[i] = p.host_ns + static_cast<int64_t>(std::llround(slope * delta));
    const double unc = static_cast<double>(p.half_width_ns) + std::fabs(delta) * slope_err +
                       rounding + static_cast<double>(kEventResolutionNs);
    out.uncertainty_ns[i] = static_cast<int64_t>(std::ceil(unc));
    max_unc = std::max(max_unc, out.uncertainty_ns[i]);
  }
  out.max_uncertainty_ns = max_unc;
  return out;
}

void Timeline::release_anchors_locked(bool keep_last) {
  const size_t keep = keep_last && !anchors_.empty() ? 1 : 0;
  for (size_t i = 0; i + keep < anchors_.size(); ++i) pool_.push_back(anchors_[i].event);
  if (keep)
    anchors_.erase(anchors_.begin(), anchors_.end() - 1);
  else
    anchors_.clear();
}

void Timeline::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  if (mode_ == TimelineMode::kCallback) wait_callbacks_locked(10.0);
  if (mode_ == TimelineMode::kEvent) {
    // Re-recording a pooled event that is still pending is allowed: the new record wins.
    for (const Mark& m : marks_) pool_.push_back(m.event);
    release_anchors_locked(true);
  }
  marks_.clear();
}

size_t Timeline::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return marks_.size();
}

TimelineStats Timeline::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  TimelineStats s = stats_;
  s.pool_free = pool_.size();
  return s;
}

std::vector<CalibrationPoint> Timeline::calibration_history() const {
  std::lock_guard<std::mutex> lock(mu_);
  return history_;
}

}  // namespace llm_dvfs
