// Python bindings of the timeline (strong definition of bind_timeline; see bind_stubs.cpp).
// mark() keeps the GIL when it does not block (a few µs; releasing would cost as much as the
// call) and releases it when it first calibrates (a spin of ~10 µs, up to 2 s on a busy GPU).
// Everything else that waits (construction, calibrate, resolve, clear) releases it.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "timeline.h"

namespace py = pybind11;
using namespace llm_dvfs;

namespace {

TimelineMode parse_mode(const std::string& s) {
  if (s == "event") return TimelineMode::kEvent;
  if (s == "callback") return TimelineMode::kCallback;
  if (s == "host") return TimelineMode::kHost;
  throw py::value_error("timeline mode must be 'event', 'callback' or 'host', not '" + s + "'");
}

const char* mode_name(TimelineMode m) {
  switch (m) {
    case TimelineMode::kEvent:
      return "event";
    case TimelineMode::kCallback:
      return "callback";
    default:
      return "host";
  }
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::dict point_dict(const CalibrationPoint& p) {
  py::dict d;
  d["host_ns"] = p.host_ns;
  d["half_width_ns"] = p.half_width_ns;
  d["gpu_ns"] = p.gpu_ns;
  return d;
}

}  // namespace

void bind_timeline(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CudaError& e) {
      py::object cls = py::module_::import("llm_dvfs.errors").attr("CudaError");
      py::object err = cls(e.code, e.function, e.name, e.what());
      PyErr_SetObject(cls.ptr(), err.ptr());
    } catch (const TimelineTimeout& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    }
  });

  m.def("cuda_library_path", &cuda_library_path,
        "Path of the loaded CUDA driver library, '' when none is loaded.");
  m.def("cuda_symbols", &cuda_symbol_table,
        "Resolved CUDA symbol name -> present, for the loaded library ({} when none).");
  m.def("cuda_driver_version", &cuda_driver_version, py::call_guard<py::gil_scoped_release>(),
        "CUDA driver API version (e.g. 12080). Loads libcuda (LLM_DVFS_CUDA_LIBRARY overrides) "
        "and calls cuInit; raises LibraryNotFound or CudaError.");

  py::class_<Timeline>(m, "Timeline",
                       "Stream-ordered marks mapped to host CLOCK_MONOTONIC ns (timeline.h).")
      .def(py::init([](const std::string& mode, size_t reserve, double auto_calibrate_s) {
             const TimelineMode md = parse_mode(mode);
             py::gil_scoped_release nogil;
             return std::make_unique<Timeline>(md, reserve, auto_calibrate_s);
           }),
           py::arg("mode") = "event", py::arg("reserve") = 1024,
           py::arg("auto_calibrate_s") = 5.0)
      .def("mark",
           [](Timeline& t, uintptr_t stream, int32_t label) {
             if (!t.calibration_due()) return t.mark(stream, label);
             py::gil_scoped_release nogil;
             return t.mark(stream, label);
           },
           py::arg("stream") = 0, py::arg("label") = 0,
           "Record a mark on the stream (a cudaStream_t value as int; 0 = legacy default). "
           "Returns its index.")
      .def(
          "calibrate",
          [](Timeline& t, int repeats) {
            CalibrationPoint p;
            {
              py::gil_scoped_release nogil;
              p = t.calibrate(repeats);
            }
            return point_dict(p);
          },
          py::arg("repeats") = 3)
      .def(
          "resolve",
          [](Timeline& t, double timeout_s) {
            Resolution r;
            {
              py::gil_scoped_release nogil;
              r = t.resolve(timeout_s);
            }
            py::dict d;
            d["t_ns"] = to_array(r.t_ns);
            d["host_call_ns"] = to_array(r.host_call_ns);
            d["uncertainty_ns"] = to_array(r.uncertainty_ns);
            d["label"] = to_array(r.label);
            d["drift_ppm"] = r.drift_ppm;
            d["drift_fitted"] = r.drift_fitted;
            d["calibrations"] = r.calibrations;
            d["max_uncertainty_ns"] = r.max_uncertainty_ns;
            return d;
          },
          py::arg("timeout_s") = 10.0,
          "Wait for the marks (timeout_s < 0: forever), map them to host time. Returns a dict "
          "of numpy arrays t_ns, host_call_ns, uncertainty_ns (-1 = unknown), label, and "
          "drift_ppm, drift_fitted, calibrations, max_uncertainty_ns.")
      .def("clear", &Timeline::clear, py::call_guard<py::gil_scoped_release>())
      .def("__len__", &Timeline::size)
      .def_property_readonly("mode", [](const Timeline& t) { return mode_name(t.mode()); })
      .def("calibration_history",
           [](const Timeline& t) {
             py::list out;
             for (const auto& p : t.calibration_history()) out.append(point_dict(p));
             return out;
           })
      .def("stats", [](const Timeline& t) {
        const TimelineStats s = t.stats();
        py::dict d;
        d["marks"] = s.marks;
        d["calibrations"] = s.calibrations;
        d["events_created"] = s.events_created;
        d["query_spins"] = s.query_spins;
        d["pool_free"] = s.pool_free;
        d["last_half_width_ns"] = s.last_half_width_ns;
        return d;
      });
}
