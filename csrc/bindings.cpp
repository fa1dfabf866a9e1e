// Thin pybind11 layer. Every call that can block (NVML load/init, sampler start/stop/flush,
// queries that talk to the driver) releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "device.h"
#include "nvml.h"
#include "sampler.h"

namespace py = pybind11;
using namespace llm_dvfs;

void bind_timeline(py::module_& m);  // timeline.cpp / bind_timeline.cpp (weak stub if absent)
void bind_control(py::module_& m);   // control.cpp
void bind_cuda_devices(py::module_& m);  // bind_cuda_devices.cpp

namespace {

template <typename T>
py::object opt(const std::optional<T>& v) {
  return v ? py::cast(*v) : py::object(py::none());
}

py::dict device_dict(const DeviceInfo& d) {
  py::dict o;
  o["nvml_index"] = d.nvml_index;
  o["name"] = d.name;
  o["uuid"] = d.uuid;
  o["pci_bus_id"] = d.pci_bus_id;
  o["memory_total_bytes"] = opt(d.memory_total_bytes);
  o["power_limit_w"] = opt(d.power_limit_w);
  o["power_limit_default_w"] = opt(d.power_limit_default_w);
  o["power_limit_min_w"] = opt(d.power_limit_min_w);
  o["power_limit_max_w"] = opt(d.power_limit_max_w);
  py::dict clocks;
  for (const auto& c : d.supported_clocks) clocks[py::int_(c.mem_mhz)] = c.graphics_mhz;
  o["supported_clocks_mhz"] = clocks;
  o["sm_mhz"] = opt(d.sm_mhz);
  o["mem_mhz"] = opt(d.mem_mhz);
  o["app_sm_mhz"] = opt(d.app_sm_mhz);
  o["app_mem_mhz"] = opt(d.app_mem_mhz);
  o["temperature_c"] = opt(d.temperature_c);
  o["has_energy_counter"] = d.has_energy_counter;
  o["has_power_samples"] = d.has_power_samples;
  o["has_instant_power"] = d.has_instant_power;
  o["has_average_power"] = d.has_average_power;
  o["has_power_usage"] = d.has_power_usage;
  o["has_clock_events"] = d.has_clock_events;
  return o;
}

// Python handle on an NvmlSession; close() drops the reference early.
struct PySession {
  std::unique_ptr<NvmlSession> s;
  PySession() {
    py::gil_scoped_release nogil;
    s = std::make_unique<NvmlSession>();
  }
  const NvmlApi& api() {
    if (!s) throw std::runtime_error("NVML session is closed");
    return s->api();
  }
  void close() {
    py::gil_scoped_release nogil;
    s.reset();
  }
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "llm_dvfs native core: NVML loaded at run time, power sampler, CUDA timeline";

  // NVML errors become the classes of llm_dvfs.errors (one table, in Python).
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const NvmlError& e) {
      py::object err = py::module_::import("llm_dvfs.errors").attr("from_nvml")(e.code, e.function, e.what());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    } catch (const LoadError& e) {
      auto errors = py::module_::import("llm_dvfs.errors");
      py::object cls = errors.attr(e.kind == LoadError::Kind::kLibraryNotFound ? "LibraryNotFound"
                                                                                  : "SymbolNotFound");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });

  m.def("monotonic_ns", &monotonic_ns, "Host CLOCK_MONOTONIC in ns (the sampler's timeline).");
  m.def("realtime_ns", &realtime_ns, "Host CLOCK_REALTIME in ns.");
  m.def("nvml_library_path", &NvmlSession::library_path,
        "Path of the loaded NVML library, '' when none is loaded.");
  m.def("nvml_refcount", &NvmlSession::refcount);
  m.def("nvml_symbols", &NvmlSession::symbol_table,
        "Resolved symbol name -> present, for the loaded library ({} when none).");
  m.def("nvml_symbol_name", [](int idx) -> std::string {
    static const char* names[] = {
#define LLM_DVFS_X(member, required, primary, ...) primary,
        LLM_DVFS_NVML_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
    };
    if (idx < 0 || idx >= static_cast<int>(NvmlSym::kCount)) return "nvml";
    return names[idx];
  });

  py::class_<PySession>(m, "Session", "A reference to the loaded, initialised NVML library.")
      .def(py::init<>())
      .def("close", &PySession::close)
      .def("__enter__", [](PySession& s) -> PySession& { return s; })
      .def("__exit__", [](PySession& s, py::args) { s.close(); })
      .def("device_count",
           [](PySession& s) {
             unsigned n = 0;
             const NvmlApi& api = s.api();
             py::gil_scoped_release nogil;
             LLM_DVFS_NVML_CALL(api, DeviceGetCount, &n);
             return n;
           })
      .def("device_info",
           [](PySession& s, unsigned i) {
             const NvmlApi& api = s.api();
             DeviceInfo d;
             {
               py::gil_scoped_release nogil;
               d = query_device(api, i);
             }
             return device_dict(d);
           })
      .def("driver_version",
           [](PySession& s) {
             const NvmlApi& api = s.api();
             py::gil_scoped_release nogil;  // a driver call; the string is cast after
             return driver_version(api);
           })
      .def("nvml_version",
           [](PySession& s) {
             const NvmlApi& api = s.api();
             py::gil_scoped_release nogil;
             return nvml_version(api);
           })
      .def("compute_processes", [](PySession& s, unsigned i) {
        const NvmlApi& api = s.api();
        std::vector<ProcessUse> procs;
        {
          py::gil_scoped_release nogil;
          procs = compute_processes(api, i);
        }
        py::list out;
        for (const auto& p : procs) out.append(py::make_tuple(p.pid, p.used_memory_bytes));
        return out;
      });

  py::class_<PowerSampler>(m, "PowerSampler")
      .def(py::init([](std::vector<unsigned> idx, double buffer_period_s, double poll_period_s,
                       double counter_period_s, size_t capacity, bool poll_clocks,
                       bool bracket_edges, double counter_grid_s) {
             SamplerConfig c;
             c.nvml_indices = std::move(idx);
             c.buffer_period_s = buffer_period_s;
             c.poll_period_s = poll_period_s;
             c.counter_period_s = counter_period_s;
             c.capacity = capacity;
             c.poll_clocks = poll_clocks;
             c.bracket_edges = bracket_edges;
             c.counter_grid_s = counter_grid_s;
             return std::make_unique<PowerSampler>(std::move(c));
           }),
           py::arg("nvml_indices"), py::arg("buffer_period_s") = 0.25,
           py::arg("poll_period_s") = 0.05, py::arg("counter_period_s") = 1.0,
           py::arg("capacity") = 1u << 19, py::arg("poll_clocks") = true,
           py::arg("bracket_edges") = true, py::arg("counter_grid_s") = 0.1)
      .def("start", &PowerSampler::start, py::call_guard<py::gil_scoped_release>())
      .def("stop", &PowerSampler::stop, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("running", &PowerSampler::running)
      .def("request_counter", &PowerSampler::request_counter, py::arg("bracket") = true,
           py::call_guard<py::gil_scoped_release>(),
           "Ask for a counter read now (a window edge); bracket: read until the value changes "
           "(when the sampler was built with bracket_edges).")
      .def("flush", &PowerSampler::flush, py::arg("timeout_s") = 1.0,
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("pending", &PowerSampler::pending)
      .def_property_readonly("clock_offset_ns", &PowerSampler::clock_offset_ns)
      .def_property_readonly("capacity", [](const PowerSampler& s) { return s.config().capacity; })
      .def_property_readonly("bracket_edges",
                             [](const PowerSampler& s) { return s.config().bracket_edges; })
      .def("drain",
           [](PowerSampler& s) {
             std::vector<Record> recs;
             {
               py::gil_scoped_release nogil;
               recs.resize(s.pending() + 64);
               recs.resize(s.drain(recs.data(), recs.size()));
             }
             const py::ssize_t n = static_cast<py::ssize_t>(recs.size());
             py::array_t<int64_t> t(n);
             py::array_t<double> v(n);
             py::array_t<uint64_t> extra(n);
             py::array_t<uint32_t> dev(n);
             py::array_t<uint8_t> kind(n);
             py::array_t<uint16_t> aux(n);
             auto tt = t.mutable_unchecked<1>();
             auto vv = v.mutable_unchecked<1>();
             auto ee = extra.mutable_unchecked<1>();
             auto dd = dev.mutable_unchecked<1>();
             auto kk = kind.mutable_unchecked<1>();
             auto aa = aux.mutable_unchecked<1>();
             for (py::ssize_t i = 0; i < n; ++i) {
               const Record& r = recs[static_cast<size_t>(i)];
               tt(i) = r.t_ns;
               vv(i) = r.value;
               ee(i) = r.extra;
               dd(i) = r.device;
               kk(i) = r.kind;
               aa(i) = r.aux;
             }
             py::dict o;
             o["t_ns"] = t;
             o["value"] = v;
             o["extra"] = extra;
             o["device"] = dev;
             o["kind"] = kind;
             o["aux"] = aux;
             return o;
           },
           "Move all pending records out of the ring as numpy arrays.")
      .def("stats", [](const PowerSampler& s) {
        SamplerStats st = s.stats();
        py::dict o;
        o["loops"] = st.loops;
        o["drains"] = st.drains;
        o["polls"] = st.polls;
        o["counter_reads"] = st.counter_reads;
        o["buffer_samples"] = st.buffer_samples;
        o["errors"] = st.errors;
        o["brackets"] = st.brackets;
        o["bracket_reads"] = st.bracket_reads;
        o["brackets_unresolved"] = st.brackets_unresolved;
        o["brackets_predicted"] = st.brackets_predicted;
        o["bracket_misses"] = st.bracket_misses;
        o["dropped"] = st.dropped;
        o["pushed"] = st.pushed;
        o["thread_cpu_s"] = st.thread_cpu_s;
        return o;
      });

  py::dict kinds;
  kinds["buffer"] = static_cast<int>(RecordKind::kBufferPower);
  kinds["instant"] = static_cast<int>(RecordKind::kInstantPower);
  kinds["average"] = static_cast<int>(RecordKind::kAveragePower);
  kinds["sm_clock"] = static_cast<int>(RecordKind::kSmClock);
  kinds["mem_clock"] = static_cast<int>(RecordKind::kMemClock);
  kinds["temperature"] = static_cast<int>(RecordKind::kTemperature);
  kinds["clock_events"] = static_cast<int>(RecordKind::kClockEvents);
  kinds["counter"] = static_cast<int>(RecordKind::kEnergyCounter);
  kinds["error"] = static_cast<int>(RecordKind::kError);
  kinds["gap"] = static_cast<int>(RecordKind::kGap);
  m.attr("RECORD_KINDS") = kinds;

  bind_timeline(m);
  bind_control(m);
  bind_cuda_devices(m);
}
