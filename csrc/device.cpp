#include "device.h"

#include <cstring>

namespace llm_dvfs {

bool is_capability_error(int code) {
  return code == NVML_ERROR_NOT_SUPPORTED || code == NVML_ERROR_FUNCTION_NOT_FOUND ||
         code == NVML_ERROR_NO_PERMISSION || code == NVML_ERROR_INVALID_ARGUMENT;
}

nvmlDevice_t device_handle(const NvmlApi& api, unsigned nvml_index) {
  nvmlDevice_t h = nullptr;
  LLM_DVFS_NVML_CALL(api, DeviceGetHandleByIndex, nvml_index, &h);
  return h;
}

namespace {

// Runs one optional query: value on success, empty on a capability error, throws otherwise.
template <typename T, typename F>
std::optional<T> optional_query(const char* fn, F&& f) {
  T v{};
  int r = f(&v);
  if (r == NVML_SUCCESS) return v;
  if (is_capability_error(r)) return std::nullopt;
  throw_nvml_error(r, fn);
}

bool probe_ok(int r) { return r == NVML_SUCCESS; }

}  // namespace

std::string driver_version(const NvmlApi& api) {
  char buf[96] = {};
  if (LLM_DVFS_NVML_TRY(api, SystemGetDriverVersion, buf, sizeof buf) != NVML_SUCCESS) return "";
  return buf;
}

std::string nvml_version(const NvmlApi& api) {
  char buf[96] = {};
  if (LLM_DVFS_NVML_TRY(api, SystemGetNVMLVersion, buf, sizeof buf) != NVML_SUCCESS) return "";
  return buf;
}

DeviceInfo query_device(const NvmlApi& api, unsigned nvml_index) {
  DeviceInfo d;
  d.nvml_index = nvml_index;
  nvmlDevice_t h = device_handle(api, nvml_index);
  char buf[128] = {};
  LLM_DVFS_NVML_CALL(api, DeviceGetName, h, buf, sizeof buf);
  d.name = buf;
  std::memset(buf, 0, sizeof buf);
  LLM_DVFS_NVML_CALL(api, DeviceGetUUID, h, buf, sizeof buf);
  d.uuid = buf;
  nvmlPciInfo_t pci{};
  if (LLM_DVFS_NVML_TRY(api, DeviceGetPciInfo, h, &pci) == NVML_SUCCESS) d.pci_bus_id = pci.busId;

  nvmlMemory_t mem{};
  if (LLM_DVFS_NVML_TRY(api, DeviceGetMemoryInfo, h, &mem) == NVML_SUCCESS)
    d.memory_total_bytes = mem.total;

  auto mw_to_w = [](std::optional<unsigned> mw) -> std::optional<double> {
    if (!mw) return std::nullopt;
    return *mw / 1000.0;
  };
  d.power_limit_w = mw_to_w(optional_query<unsigned>(
      api.name(NvmlSym::DeviceGetPowerManagementLimit),
      [&](unsigned* v) { return LLM_DVFS_NVML_TRY(api, DeviceGetPowerManagementLimit, h, v); }));
  d.power_limit_default_w = mw_to_w(optional_query<unsigned>(
      api.name(NvmlSym::DeviceGetPowerManagementDefaultLimit), [&](unsigned* v) {
        return LLM_DVFS_NVML_TRY(api, DeviceGetPowerManagementDefaultLimit, h, v);
      }));
  unsigned lo = 0, hi = 0;
  if (LLM_DVFS_NVML_TRY(api, DeviceGetPowerManagementLimitConstraints, h, &lo, &hi) ==
      NVML_SUCCESS) {
    d.power_limit_min_w = lo / 1000.0;
    d.power_limit_max_w = hi / 1000.0;
  }

  // Supported clocks: NVML's size protocol (INSUFFICIENT_SIZE tells the count).
  unsigned n_mem = 16;
  std::vector<unsigned> mems(n_mem);
  int r = LLM_DVFS_NVML_TRY(api, DeviceGetSupportedMemoryClocks, h, &n_mem, mems.data());
  if (r == NVML_ERROR_INSUFFICIENT_SIZE) {
    mems.resize(n_mem);
    r = LLM_DVFS_NVML_TRY(api, DeviceGetSupportedMemoryClocks, h, &n_mem, mems.data());
  }
  if (r == NVML_SUCCESS) {
    mems.resize(n_mem);
    for (unsigned m : mems) {
      unsigned n_gr = 512;
      std::vector<unsigned> gr(n_gr);
      int rg = LLM_DVFS_NVML_TRY(api, DeviceGetSupportedGraphicsClocks, h, m, &n_gr, gr.data());
      if (rg == NVML_ERROR_INSUFFICIENT_SIZE) {
        gr.resize(n_gr);
        rg = LLM_DVFS_NVML_TRY(api, DeviceGetSupportedGraphicsClocks, h, m, &n_gr, gr.data());
      }
      if (rg != NVML_SUCCESS) continue;
      gr.resize(n_gr);
      d.supported_clocks.push_back({m, std::move(gr)});
    }
  } else if (!is_capability_error(r)) {
    throw_nvml_error(r, api.name(NvmlSym::DeviceGetSupportedMemoryClocks));
  }

  auto clock = [&](NvmlSym s, auto fnptr, nvmlClockType_t t) {
    return optional_query<unsigned>(api.name(s), [&](unsigned* v) {
      return fnptr ? fnptr(h, t, v) : NVML_ERROR_FUNCTION_NOT_FOUND;
    });
  };
  d.sm_mhz = clock(NvmlSym::DeviceGetClockInfo, api.DeviceGetClockInfo, NVML_CLOCK_SM);
  d.mem_mhz = clock(NvmlSym::DeviceGetClockInfo, api.DeviceGetClockInfo, NVML_CLOCK_MEM);
  d.app_sm_mhz = clock(NvmlSym::DeviceGetApplicationsClock, api.DeviceGetApplicationsClock,
                       NVML_CLOCK_GRAPHICS);
  d.app_mem_mhz = clock(NvmlSym::DeviceGetApplicationsClock, api.DeviceGetApplicationsClock,
                        NVML_CLOCK_MEM);
  d.temperature_c = optional_query<unsigned>(api.name(NvmlSym::DeviceGetTemperature), [&](unsigned* v) {
    return LLM_DVFS_NVML_TRY(api, DeviceGetTemperature, h, NVML_TEMPERATURE_GPU, v);
  });

  // Capabilities are probed by calling, not by symbol presence: a symbol can exist and still
  // answer NOT_SUPPORTED on a given GPU.
  unsigned long long mj = 0;
  d.has_energy_counter = probe_ok(LLM_DVFS_NVML_TRY(api, DeviceGetTotalEnergyConsumption, h, &mj));
  if (api.DeviceGetSamples) {
    nvmlValueType_t vt;
    unsigned count = 0;
    int rs = api.DeviceGetSamples(h, NVML_TOTAL_POWER_SAMPLES, 0, &vt, &count, nullptr);
    d.has_power_samples = rs == NVML_SUCCESS || rs == NVML_ERROR_NOT_FOUND;
  }
  if (api.DeviceGetFieldValues) {
    nvmlFieldValue_t fv[2] = {};
    fv[0].fieldId = NVML_FI_DEV_POWER_INSTANT;
    fv[1].fieldId = NVML_FI_DEV_POWER_AVERAGE;
    if (api.DeviceGetFieldValues(h, 2, fv) == NVML_SUCCESS) {
      d.has_instant_power = fv[0].nvmlReturn == NVML_SUCCESS;
      d.has_average_power = fv[1].nvmlReturn == NVML_SUCCESS;
    }
  }
  unsigned mw = 0;
  d.has_power_usage = probe_ok(LLM_DVFS_NVML_TRY(api, DeviceGetPowerUsage, h, &mw));
  unsigned long long reasons = 0;
  d.has_clock_events =
      probe_ok(LLM_DVFS_NVML_TRY(api, DeviceGetCurrentClocksEventReasons, h, &reasons));
  return d;
}

std::vector<ProcessUse> compute_processes(const NvmlApi& api, unsigned nvml_index) {
  nvmlDevice_t h = device_handle(api, nvml_index);
  unsigned n = 64;
  std::vector<nvmlProcessInfo_t> buf(n);
  int r = LLM_DVFS_NVML_TRY(api, DeviceGetComputeRunningProcesses, h, &n, buf.data());
  if (r == NVML_ERROR_INSUFFICIENT_SIZE) {
    buf.resize(n + 8);
    n = static_cast<unsigned>(buf.size());
    r = LLM_DVFS_NVML_TRY(api, DeviceGetComputeRunningProcesses, h, &n, buf.data());
  }
  nvml_check(r, api.name(NvmlSym::DeviceGetComputeRunningProcesses));
  std::vector<ProcessUse> out;
  for (unsigned i = 0; i < n; ++i) out.push_back({buf[i].pid, buf[i].usedGpuMemory});
  return out;
}

}  // namespace llm_dvfs
