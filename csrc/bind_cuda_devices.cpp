// Python binding of the CUDA device enumeration: the UUID of every CUDA ordinal, in CUDA's own
// order (the driver applies CUDA_DEVICE_ORDER and CUDA_VISIBLE_DEVICES). devices.py matches the
// UUIDs to NVML's to map CUDA ordinals to NVML handles. libcuda comes from the timeline's loader
// (cuda_api(): LLM_DVFS_CUDA_LIBRARY or libcuda.so.1, cuInit(0) on first use, never unloaded);
// a process that forks after cuInit cannot use CUDA in its children.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "nvml.h"      // LoadError
#include "timeline.h"  // cuda_api(), cuda_library_path(), CudaError

namespace py = pybind11;
using namespace llm_dvfs;

namespace {

// NVML's text form of a GPU UUID: "GPU-" and the 16 bytes as 8-4-4-4-12 lower-case hex digits.
std::string uuid_text(const CUuuid& u) {
  const auto* b = reinterpret_cast<const unsigned char*>(u.bytes);
  char buf[48];
  std::snprintf(buf, sizeof buf,
                "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                b[14], b[15]);
  return buf;
}

[[noreturn]] void fail(const CudaApi& api, CUresult r, CudaSym sym) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (api.GetErrorName) api.GetErrorName(r, &name);
  if (api.GetErrorString) api.GetErrorString(r, &text);
  std::string msg = std::string(api.name(sym)) + " failed: " + (name ? name : "CUDA error") +
                    " (" + std::to_string(r) + ")";
  if (text) msg += ": " + std::string(text);
  throw CudaError(r, api.name(sym), name ? name : "", msg);
}

std::vector<std::string> cuda_device_uuids() {
  const CudaApi& api = cuda_api();  // loads the library and calls cuInit(0) once per process
  std::string missing;
  const std::pair<bool, CudaSym> needed[] = {{api.DeviceGetCount != nullptr, CudaSym::DeviceGetCount},
                                             {api.DeviceGet != nullptr, CudaSym::DeviceGet},
                                             {api.DeviceGetUuid != nullptr, CudaSym::DeviceGetUuid}};
  for (const auto& [present, sym] : needed)
    if (!present) missing += std::string(missing.empty() ? "" : ", ") + api.name(sym);
  if (!missing.empty())
    throw LoadError(LoadError::Kind::kSymbolNotFound,
                    "the CUDA driver library at " + cuda_library_path() + " lacks " + missing +
                        " (device enumeration needs CUDA >= 10)");
  int n = 0;
  CUresult r = api.DeviceGetCount(&n);
  if (r != CUDA_SUCCESS) fail(api, r, CudaSym::DeviceGetCount);
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(n > 0 ? n : 0));
  for (int i = 0; i < n; ++i) {
    CUdevice dev = 0;
    r = api.DeviceGet(&dev, i);
    if (r != CUDA_SUCCESS) fail(api, r, CudaSym::DeviceGet);
    CUuuid u{};
    r = api.DeviceGetUuid(&u, dev);
    if (r != CUDA_SUCCESS) fail(api, r, CudaSym::DeviceGetUuid);
    out.push_back(uuid_text(u));
  }
  return out;
}

}  // namespace

void bind_cuda_devices(py::module_& m) {
  m.def("cuda_device_uuids", &cuda_device_uuids, py::call_guard<py::gil_scoped_release>(),
        "UUIDs ('GPU-...', NVML's format) of the CUDA devices, indexed by CUDA ordinal: CUDA's "
        "order (CUDA_DEVICE_ORDER) with CUDA_VISIBLE_DEVICES applied by the driver. Loads libcuda "
        "(LLM_DVFS_CUDA_LIBRARY overrides) and calls cuInit(0) once per process: CUDA is then "
        "unusable in children forked afterwards. Raises LibraryNotFound, SymbolNotFound (no "
        "cuDeviceGetCount / cuDeviceGet / cuDeviceGetUuid[_v2]) or CudaError.");
}
