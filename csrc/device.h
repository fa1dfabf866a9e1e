// Read-only device queries. Indices here are NVML indices; the Python side maps
// CUDA_VISIBLE_DEVICES (ordinals or UUIDs) onto them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "nvml.h"

namespace llm_dvfs {

nvmlDevice_t device_handle(const NvmlApi& api, unsigned nvml_index);

struct ClockTable {
  unsigned mem_mhz;
  std::vector<unsigned> graphics_mhz;  // as NVML lists them (descending)
};

struct DeviceInfo {
  unsigned nvml_index = 0;
  std::string name, uuid, pci_bus_id;
  std::optional<uint64_t> memory_total_bytes;
  std::optional<double> power_limit_w, power_limit_default_w, power_limit_min_w, power_limit_max_w;
  std::vector<ClockTable> supported_clocks;
  std::optional<unsigned> sm_mhz, mem_mhz, app_sm_mhz, app_mem_mhz;
  std::optional<unsigned> temperature_c;
  bool has_energy_counter = false, has_power_samples = false, has_instant_power = false,
       has_average_power = false, has_power_usage = false, has_clock_events = false;
};

// Every query that the device does not support (NOT_SUPPORTED, FUNCTION_NOT_FOUND, NO_PERMISSION)
// leaves its field empty; other errors (GPU lost, ...) throw NvmlError.
DeviceInfo query_device(const NvmlApi& api, unsigned nvml_index);

std::string driver_version(const NvmlApi& api);
std::string nvml_version(const NvmlApi& api);

struct ProcessUse {
  unsigned pid;
  uint64_t used_memory_bytes;
};
std::vector<ProcessUse> compute_processes(const NvmlApi& api, unsigned nvml_index);

// True when `code` only means "this device/driver cannot do that".
bool is_capability_error(int code);

}  // namespace llm_dvfs
