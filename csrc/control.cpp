#include "control.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>

#include "device.h"

namespace llm_dvfs {

void set_gpu_locked_clocks(const NvmlApi& api, unsigned nvml_index, unsigned min_mhz,
                           unsigned max_mhz) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  LLM_DVFS_NVML_CALL(api, DeviceSetGpuLockedClocks, h, min_mhz, max_mhz);
}

void reset_gpu_locked_clocks(const NvmlApi& api, unsigned nvml_index) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  LLM_DVFS_NVML_CALL(api, DeviceResetGpuLockedClocks, h);
}

void set_mem_locked_clocks(const NvmlApi& api, unsigned nvml_index, unsigned min_mhz,
                           unsigned max_mhz) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  LLM_DVFS_NVML_CALL(api, DeviceSetMemoryLockedClocks, h, min_mhz, max_mhz);
}

void reset_mem_locked_clocks(const NvmlApi& api, unsigned nvml_index) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  LLM_DVFS_NVML_CALL(api, DeviceResetMemoryLockedClocks, h);
}

void set_applications_clocks(const NvmlApi& api, unsigned nvml_index, unsigned mem_mhz,
                             unsigned sm_mhz) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  LLM_DVFS_NVML_CALL(api, DeviceSetApplicationsClocks, h, mem_mhz, sm_mhz);
}

void reset_applications_clocks(const NvmlApi& api, unsigned nvml_index) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  LLM_DVFS_NVML_CALL(api, DeviceResetApplicationsClocks, h);
}

void set_power_limit_mw(const NvmlApi& api, unsigned nvml_index, unsigned limit_mw) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  LLM_DVFS_NVML_CALL(api, DeviceSetPowerManagementLimit, h, limit_mw);
}

namespace {

// Value on success, empty on a capability error, throws on anything else (GPU lost, ...).
template <typename T>
std::optional<T> opt_query(int r, T v, const char* fn) {
  if (r == NVML_SUCCESS) return v;
  if (is_capability_error(r)) return std::nullopt;
  throw_nvml_error(r, fn);
}

}  // namespace

ClockState clock_state(const NvmlApi& api, unsigned nvml_index) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  ClockState s;
  // Each query runs to completion before its output is read (a function argument list would
  // leave the order of "call" and "read the value" unspecified).
  auto query = [&](NvmlSym sym, auto&& call) -> std::optional<unsigned> {
    unsigned v = 0;
    const int r = call(&v);
    return opt_query(r, v, api.name(sym));
  };
  auto clock = [&](nvmlClockType_t t) {
    return query(NvmlSym::DeviceGetClockInfo,
                 [&](unsigned* v) { return LLM_DVFS_NVML_TRY(api, DeviceGetClockInfo, h, t, v); });
  };
  auto app_clock = [&](nvmlClockType_t t) {
    return query(NvmlSym::DeviceGetApplicationsClock, [&](unsigned* v) {
      return LLM_DVFS_NVML_TRY(api, DeviceGetApplicationsClock, h, t, v);
    });
  };
  s.sm_mhz = clock(NVML_CLOCK_SM);
  s.mem_mhz = clock(NVML_CLOCK_MEM);
  s.graphics_mhz = clock(NVML_CLOCK_GRAPHICS);
  s.app_sm_mhz = app_clock(NVML_CLOCK_GRAPHICS);
  s.app_mem_mhz = app_clock(NVML_CLOCK_MEM);
  s.power_limit_mw = query(NvmlSym::DeviceGetPowerManagementLimit, [&](unsigned* v) {
    return LLM_DVFS_NVML_TRY(api, DeviceGetPowerManagementLimit, h, v);
  });
  s.power_limit_default_mw = query(NvmlSym::DeviceGetPowerManagementDefaultLimit, [&](unsigned* v) {
    return LLM_DVFS_NVML_TRY(api, DeviceGetPowerManagementDefaultLimit, h, v);
  });
  unsigned lo = 0, hi = 0;
  const int r = LLM_DVFS_NVML_TRY(api, DeviceGetPowerManagementLimitConstraints, h, &lo, &hi);
  if (r == NVML_SUCCESS) {
    s.power_limit_min_mw = lo;
    s.power_limit_max_mw = hi;
  } else if (!is_capability_error(r)) {
    throw_nvml_error(r, api.name(NvmlSym::DeviceGetPowerManagementLimitConstraints));
  }
  s.power_usage_mw = query(NvmlSym::DeviceGetPowerUsage, [&](unsigned* v) {
    return LLM_DVFS_NVML_TRY(api, DeviceGetPowerUsage, h, v);
  });
  s.temperature_c = query(NvmlSym::DeviceGetTemperature, [&](unsigned* v) {
    return LLM_DVFS_NVML_TRY(api, DeviceGetTemperature, h, NVML_TEMPERATURE_GPU, v);
  });
  unsigned long long reasons = 0;
  const int rr = LLM_DVFS_NVML_TRY(api, DeviceGetCurrentClocksEventReasons, h, &reasons);
  s.clock_event_reasons = opt_query<uint64_t>(
      rr, reasons, api.name(NvmlSym::DeviceGetCurrentClocksEventReasons));
  return s;
}

ControlCapabilities control_capabilities(const NvmlApi& api, unsigned nvml_index) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  ControlCapabilities c;
  c.gpu_locked_clocks = api.DeviceSetGpuLockedClocks && api.DeviceResetGpuLockedClocks;
  c.mem_locked_clocks = api.DeviceSetMemoryLockedClocks && api.DeviceResetMemoryLockedClocks;
  unsigned v = 0, lo = 0, hi = 0;
  c.applications_clocks =
      api.DeviceSetApplicationsClocks && api.DeviceResetApplicationsClocks &&
      LLM_DVFS_NVML_TRY(api, DeviceGetApplicationsClock, h, NVML_CLOCK_GRAPHICS, &v) ==
          NVML_SUCCESS;
  c.power_limit = api.DeviceSetPowerManagementLimit &&
                  LLM_DVFS_NVML_TRY(api, DeviceGetPowerManagementLimitConstraints, h, &lo, &hi) ==
                      NVML_SUCCESS;
  return c;
}

}  // namespace llm_dvfs

// ---- bindings -------------------------------------------------------------------------------

namespace py = pybind11;

namespace {

template <typename T>
py::object opt(const std::optional<T>& v) {
  return v ? py::cast(*v) : py::object(py::none());
}

// Runs fn(api) on a fresh session with the GIL released (loading NVML and every setter can
// block for milliseconds; the watchdog and the sampler thread must keep running meanwhile).
template <typename F>
auto with_session(F&& fn) {
  py::gil_scoped_release nogil;
  llm_dvfs::NvmlSession session;
  return fn(session.api());
}

// One device's clock control on one NVML session held for the object's life: a settle loop
// reads clock_state() every ~20 ms, and a session per call would nvmlInit/nvmlShutdown (and, as
// the last session, dlopen/dlclose the library) each time. Calls release the GIL.
class ClockControl {
 public:
  explicit ClockControl(unsigned nvml_index) : index_(nvml_index) {
    py::gil_scoped_release nogil;
    session_ = std::make_shared<llm_dvfs::NvmlSession>();
  }
  template <typename F>
  auto call(F&& fn) {
    py::gil_scoped_release nogil;
    std::shared_ptr<llm_dvfs::NvmlSession> s;
    {
      // The call keeps its own reference: a concurrent close() cannot end the session under
      // it, and no lock is held across the NVML call.
      std::lock_guard<std::mutex> l(mu_);
      s = session_;
    }
    if (!s) throw std::runtime_error("ClockControl is closed");
    return fn(s->api(), index_);
  }
  void close() {
    std::shared_ptr<llm_dvfs::NvmlSession> s;
    {
      std::lock_guard<std::mutex> l(mu_);
      s.swap(session_);
    }
    py::gil_scoped_release nogil;
    s.reset();  // nvmlShutdown when it is the last session
  }
  unsigned index() const { return index_; }

 private:
  unsigned index_;
  std::mutex mu_;  // guards session_ (the pointer, not the calls)
  std::shared_ptr<llm_dvfs::NvmlSession> session_;
};

py::dict clock_state_dict(const llm_dvfs::ClockState& s) {
  auto mw_to_w = [](const std::optional<unsigned>& mw) -> py::object {
    return mw ? py::cast(*mw / 1000.0) : py::object(py::none());
  };
  py::dict o;
  o["sm_mhz"] = opt(s.sm_mhz);
  o["mem_mhz"] = opt(s.mem_mhz);
  o["graphics_mhz"] = opt(s.graphics_mhz);
  o["app_sm_mhz"] = opt(s.app_sm_mhz);
  o["app_mem_mhz"] = opt(s.app_mem_mhz);
  o["power_limit_w"] = mw_to_w(s.power_limit_mw);
  o["power_limit_default_w"] = mw_to_w(s.power_limit_default_mw);
  o["power_limit_min_w"] = mw_to_w(s.power_limit_min_mw);
  o["power_limit_max_w"] = mw_to_w(s.power_limit_max_mw);
  o["power_w"] = mw_to_w(s.power_usage_mw);
  o["temperature_c"] = opt(s.temperature_c);
  o["clock_event_reasons"] = opt(s.clock_event_reasons);
  return o;
}

py::dict capabilities_dict(const llm_dvfs::ControlCapabilities& c) {
  py::dict o;
  o["gpu_locked_clocks"] = c.gpu_locked_clocks;
  o["mem_locked_clocks"] = c.mem_locked_clocks;
  o["applications_clocks"] = c.applications_clocks;
  o["power_limit"] = c.power_limit;
  return o;
}

unsigned limit_w_to_mw(double w) {
  if (!(w > 0.0) || w > 1e6) throw py::value_error("power limit must be in (0, 1e6] W");
  return static_cast<unsigned>(w * 1000.0 + 0.5);
}

}  // namespace

void bind_control(py::module_& m) {
  using namespace llm_dvfs;
  m.def(
      "set_gpu_locked_clocks",
      [](unsigned i, unsigned lo, unsigned hi) {
        with_session([&](const NvmlApi& a) { set_gpu_locked_clocks(a, i, lo, hi); });
      },
      py::arg("nvml_index"), py::arg("min_mhz"), py::arg("max_mhz"),
      "Lock the SM/graphics clock to [min_mhz, max_mhz] MHz (nvmlDeviceSetGpuLockedClocks).");
  m.def(
      "reset_gpu_locked_clocks",
      [](unsigned i) { with_session([&](const NvmlApi& a) { reset_gpu_locked_clocks(a, i); }); },
      py::arg("nvml_index"));
  m.def(
      "set_mem_locked_clocks",
      [](unsigned i, unsigned lo, unsigned hi) {
        with_session([&](const NvmlApi& a) { set_mem_locked_clocks(a, i, lo, hi); });
      },
      py::arg("nvml_index"), py::arg("min_mhz"), py::arg("max_mhz"),
      "Lock the memory clock to [min_mhz, max_mhz] MHz (nvmlDeviceSetMemoryLockedClocks).");
  m.def(
      "reset_mem_locked_clocks",
      [](unsigned i) { with_session([&](const NvmlApi& a) { reset_mem_locked_clocks(a, i); }); },
      py::arg("nvml_index"));
  m.def(
      "set_applications_clocks",
      [](unsigned i, unsigned mem, unsigned sm) {
        with_session([&](const NvmlApi& a) { set_applications_clocks(a, i, mem, sm); });
      },
      py::arg("nvml_index"), py::arg("mem_mhz"), py::arg("sm_mhz"),
      "Set applications clocks (memory, graphics) in MHz (nvmlDeviceSetApplicationsClocks).");
  m.def(
      "reset_applications_clocks",
      [](unsigned i) {
        with_session([&](const NvmlApi& a) { reset_applications_clocks(a, i); });
      },
      py::arg("nvml_index"));
  m.def(
      "set_power_limit_w",
      [](unsigned i, double w) {
        const unsigned mw = limit_w_to_mw(w);
        with_session([&](const NvmlApi& a) { set_power_limit_mw(a, i, mw); });
      },
      py::arg("nvml_index"), py::arg("limit_w"),
      "Set the power-management limit in W (rounded to mW).");
  m.def(
      "clock_state",
      [](unsigned i) {
        return clock_state_dict(
            with_session([&](const NvmlApi& a) { return clock_state(a, i); }));
      },
      py::arg("nvml_index"),
      "Current clocks (MHz), applications clocks, power limit and its range (W), power (W), "
      "temperature (°C) and the clocks-event reason bits; None where the device has no value.");
  m.def(
      "control_capabilities",
      [](unsigned i) {
        return capabilities_dict(
            with_session([&](const NvmlApi& a) { return control_capabilities(a, i); }));
      },
      py::arg("nvml_index"),
      "Which setters can be attempted (symbol exported and, where a read-only probe exists, "
      "answered by the device). Permission is only known by trying.");

  // The same calls on one session kept open (ClockController holds one per device).
  py::class_<ClockControl>(m, "ClockControl",
                           "Clock control of one device on one NVML session held until close().")
      .def(py::init<unsigned>(), py::arg("nvml_index"))
      .def_property_readonly("nvml_index", &ClockControl::index)
      .def("close", &ClockControl::close)
      .def("clock_state",
           [](ClockControl& c) {
             return clock_state_dict(c.call([](const NvmlApi& a, unsigned i) { return clock_state(a, i); }));
           })
      .def("control_capabilities",
           [](ClockControl& c) {
             return capabilities_dict(
                 c.call([](const NvmlApi& a, unsigned i) { return control_capabilities(a, i); }));
           })
      .def("set_gpu_locked_clocks",
           [](ClockControl& c, unsigned lo, unsigned hi) {
             c.call([&](const NvmlApi& a, unsigned i) { set_gpu_locked_clocks(a, i, lo, hi); });
           },
           py::arg("min_mhz"), py::arg("max_mhz"))
      .def("reset_gpu_locked_clocks",
           [](ClockControl& c) {
             c.call([](const NvmlApi& a, unsigned i) { reset_gpu_locked_clocks(a, i); });
           })
      .def("set_mem_locked_clocks",
           [](ClockControl& c, unsigned lo, unsigned hi) {
             c.call([&](const NvmlApi& a, unsigned i) { set_mem_locked_clocks(a, i, lo, hi); });
           },
           py::arg("min_mhz"), py::arg("max_mhz"))
      .def("reset_mem_locked_clocks",
           [](ClockControl& c) {
             c.call([](const NvmlApi& a, unsigned i) { reset_mem_locked_clocks(a, i); });
           })
      .def("set_applications_clocks",
           [](ClockControl& c, unsigned mem, unsigned sm) {
             c.call([&](const NvmlApi& a, unsigned i) { set_applications_clocks(a, i, mem, sm); });
           },
           py::arg("mem_mhz"), py::arg("sm_mhz"))
      .def("reset_applications_clocks",
           [](ClockControl& c) {
             c.call([](const NvmlApi& a, unsigned i) { reset_applications_clocks(a, i); });
           })
      .def("set_power_limit_w",
           [](ClockControl& c, double w) {
             const unsigned mw = limit_w_to_mw(w);
             c.call([&](const NvmlApi& a, unsigned i) { set_power_limit_mw(a, i, mw); });
           },
           py::arg("limit_w"));
}
