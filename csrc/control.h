// Clock and power-limit control (the only native code that changes GPU state).
//
// These functions are deliberately thin: validation against the supported clock table, the
// explicit opt-in, settling and crash-safe restore all live in python/llm_dvfs/clocks.py, which
// is the only caller. Indices are NVML indices. Every function throws NvmlError on failure
// (NO_PERMISSION, NOT_SUPPORTED, a missing optional symbol as FUNCTION_NOT_FOUND, ...).
#pragma once

#include <cstdint>
#include <optional>

#include "nvml.h"

namespace llm_dvfs {

// Locks the graphics (SM) clock to [min_mhz, max_mhz] (nvmlDeviceSetGpuLockedClocks).
void set_gpu_locked_clocks(const NvmlApi& api, unsigned nvml_index, unsigned min_mhz,
                           unsigned max_mhz);
void reset_gpu_locked_clocks(const NvmlApi& api, unsigned nvml_index);
// Locks the memory clock to [min_mhz, max_mhz] (nvmlDeviceSetMemoryLockedClocks).
void set_mem_locked_clocks(const NvmlApi& api, unsigned nvml_index, unsigned min_mhz,
                           unsigned max_mhz);
void reset_mem_locked_clocks(const NvmlApi& api, unsigned nvml_index);
// Applications clocks: NVML's argument order is (memory, graphics).
void set_applications_clocks(const NvmlApi& api, unsigned nvml_index, unsigned mem_mhz,
                             unsigned sm_mhz);
void reset_applications_clocks(const NvmlApi& api, unsigned nvml_index);
void set_power_limit_mw(const NvmlApi& api, unsigned nvml_index, unsigned limit_mw);

// Everything clocks.py needs to decide, verify and restore. Empty = the device does not report
// it (a capability error); any other error throws.
struct ClockState {
  std::optional<unsigned> sm_mhz, mem_mhz, graphics_mhz;
  std::optional<unsigned> app_sm_mhz, app_mem_mhz;
  std::optional<unsigned> power_limit_mw, power_limit_default_mw, power_limit_min_mw,
      power_limit_max_mw;
  std::optional<unsigned> power_usage_mw, temperature_c;
  std::optional<uint64_t> clock_event_reasons;  // NVML clocks-event reason bits
};
ClockState clock_state(const NvmlApi& api, unsigned nvml_index);

// Which setters can be attempted on a device. A setter is "available" when the library exports
// it and, where a read-only probe exists, the device answers it (the power limit needs the
// limit constraints, applications clocks need the applications-clock query). Whether the call
// is *permitted* is only known by making it: nothing here changes state.
struct ControlCapabilities {
  bool gpu_locked_clocks = false, mem_locked_clocks = false, applications_clocks = false,
       power_limit = false;
};
ControlCapabilities control_capabilities(const NvmlApi& api, unsigned nvml_index);

}  // namespace llm_dvfs
