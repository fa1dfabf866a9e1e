// Weak defaults so the module links while a subsystem's bindings are not built in.
// A subsystem overrides these by defining the strong symbol in its own .cpp file.
#include <pybind11/pybind11.h>

namespace py = pybind11;

__attribute__((weak)) void bind_timeline(py::module_&) {}
__attribute__((weak)) void bind_control(py::module_&) {}
__attribute__((weak)) void bind_cuda_devices(py::module_&) {}
