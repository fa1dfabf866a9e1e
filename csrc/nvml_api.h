// Hand-declared subset of the NVML ABI: only the types, constants and functions llm_dvfs uses.
// Layouts follow nvml.h of CUDA 12/13 (driver >= 525); no CUDA toolkit is needed to build.
#pragma once

#include <cstdint>

extern "C" {

typedef int nvmlReturn_t;
typedef struct nvmlDevice_st* nvmlDevice_t;

// Return codes (nvml.h: nvmlReturn_enum). The Python side maps each to an exception class.
enum : int {
  NVML_SUCCESS = 0,
  NVML_ERROR_UNINITIALIZED = 1,
  NVML_ERROR_INVALID_ARGUMENT = 2,
  NVML_ERROR_NOT_SUPPORTED = 3,
  NVML_ERROR_NO_PERMISSION = 4,
  NVML_ERROR_ALREADY_INITIALIZED = 5,
  NVML_ERROR_NOT_FOUND = 6,
  NVML_ERROR_INSUFFICIENT_SIZE = 7,
  NVML_ERROR_INSUFFICIENT_POWER = 8,
  NVML_ERROR_DRIVER_NOT_LOADED = 9,
  NVML_ERROR_TIMEOUT = 10,
  NVML_ERROR_IRQ_ISSUE = 11,
  NVML_ERROR_LIBRARY_NOT_FOUND = 12,
  NVML_ERROR_FUNCTION_NOT_FOUND = 13,
  NVML_ERROR_CORRUPTED_INFOROM = 14,
  NVML_ERROR_GPU_IS_LOST = 15,
  NVML_ERROR_RESET_REQUIRED = 16,
  NVML_ERROR_OPERATING_SYSTEM = 17,
  NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
  NVML_ERROR_IN_USE = 19,
  NVML_ERROR_MEMORY = 20,
  NVML_ERROR_NO_DATA = 21,
  NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22,
  NVML_ERROR_INSUFFICIENT_RESOURCES = 23,
  NVML_ERROR_FREQ_NOT_SUPPORTED = 24,
  NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
  NVML_ERROR_DEPRECATED = 26,
  NVML_ERROR_NOT_READY = 27,
  NVML_ERROR_GPU_NOT_FOUND = 28,
  NVML_ERROR_INVALID_STATE = 29,
  NVML_ERROR_UNKNOWN = 999,
};

typedef union nvmlValue_st {
  double dVal;
  int siVal;
  unsigned int uiVal;
  unsigned long ulVal;
  unsigned long long ullVal;
  signed long long sllVal;
  unsigned short usVal;
} nvmlValue_t;

typedef enum nvmlValueType_enum {
  NVML_VALUE_TYPE_DOUBLE = 0,
  NVML_VALUE_TYPE_UNSIGNED_INT = 1,
  NVML_VALUE_TYPE_UNSIGNED_LONG = 2,
  NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3,
  NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4,
  NVML_VALUE_TYPE_SIGNED_INT = 5,
  NVML_VALUE_TYPE_UNSIGNED_SHORT = 6,
} nvmlValueType_t;

typedef struct nvmlSample_st {
  unsigned long long timeStamp;  // µs, host CLOCK_REALTIME
  nvmlValue_t sampleValue;
} nvmlSample_t;

typedef enum nvmlSamplingType_enum {
  NVML_TOTAL_POWER_SAMPLES = 0,  // mW
} nvmlSamplingType_t;

typedef struct nvmlFieldValue_st {
  unsigned int fieldId;
  unsigned int scopeId;
  long long timestamp;    // µs, time of the query (not of the sensor reading)
  long long latencyUsec;
  nvmlValueType_t valueType;
  nvmlReturn_t nvmlReturn;
  nvmlValue_t value;
} nvmlFieldValue_t;

enum : unsigned int {
  NVML_FI_DEV_POWER_AVERAGE = 185,  // mW, 1 s moving average on H100
  NVML_FI_DEV_POWER_INSTANT = 186,  // mW, updated every ~100 ms
};

typedef enum nvmlClockType_enum {
  NVML_CLOCK_GRAPHICS = 0,
  NVML_CLOCK_SM = 1,
  NVML_CLOCK_MEM = 2,
} nvmlClockType_t;

typedef enum nvmlTemperatureSensors_enum { NVML_TEMPERATURE_GPU = 0 } nvmlTemperatureSensors_t;

typedef struct nvmlMemory_st {
  unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct nvmlPciInfo_st {
  char busIdLegacy[16];
  unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
  char busId[32];
} nvmlPciInfo_t;

// nvmlProcessInfo_v2_t, used by the _v2 and _v3 process queries.
typedef struct nvmlProcessInfo_st {
  unsigned int pid;
  unsigned long long usedGpuMemory;
  unsigned int gpuInstanceId;
  unsigned int computeInstanceId;
} nvmlProcessInfo_t;

}  // extern "C"

// The one list of NVML symbols llm_dvfs uses.
//   X(member, required, primary_name, fallback_name_or_nullptr, return_type, (params))
// A required symbol missing from the library is a load error; a missing optional one turns the
// matching capability off. The fallback is tried when the primary (usually newer, versioned)
// name is absent, e.g. nvmlInit_v2 -> nvmlInit on old drivers.
#define LLM_DVFS_NVML_SYMBOLS(X)                                                                    \
  X(Init, true, "nvmlInit_v2", "nvmlInit", nvmlReturn_t, (void))                                    \
  X(Shutdown, true, "nvmlShutdown", nullptr, nvmlReturn_t, (void))                                  \
  X(ErrorString, false, "nvmlErrorString", nullptr, const char*, (nvmlReturn_t))                    \
  X(SystemGetDriverVersion, false, "nvmlSystemGetDriverVersion", nullptr, nvmlReturn_t,             \
    (char*, unsigned int))                                                                          \
  X(SystemGetNVMLVersion, false, "nvmlSystemGetNVMLVersion", nullptr, nvmlReturn_t,                 \
    (char*, unsigned int))                                                                          \
  X(DeviceGetCount, true, "nvmlDeviceGetCount_v2", "nvmlDeviceGetCount", nvmlReturn_t,              \
    (unsigned int*))                                                                                \
  X(DeviceGetHandleByIndex, true, "nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex",    \
    nvmlReturn_t, (unsigned int, nvmlDevice_t*))                                                    \
  X(DeviceGetName, true, "nvmlDeviceGetName", nullptr, nvmlReturn_t,                                \
    (nvmlDevice_t, char*, unsigned int))                                                            \
  X(DeviceGetUUID, true, "nvmlDeviceGetUUID", nullptr, nvmlReturn_t,                                \
    (nvmlDevice_t, char*, unsigned int))                                                            \
  X(DeviceGetPciInfo, false, "nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetPciInfo_v2", nvmlReturn_t,    \
    (nvmlDevice_t, nvmlPciInfo_t*))                                                                 \
  X(DeviceGetMemoryInfo, false, "nvmlDeviceGetMemoryInfo", nullptr, nvmlReturn_t,                   \
    (nvmlDevice_t, nvmlMemory_t*))                                                                  \
  X(DeviceGetPowerUsage, false, "nvmlDeviceGetPowerUsage", nullptr, nvmlReturn_t,                   \
    (nvmlDevice_t, unsigned int*))                                                                  \
  X(DeviceGetTotalEnergyConsumption, false, "nvmlDeviceGetTotalEnergyConsumption", nullptr,         \
    nvmlReturn_t, (nvmlDevice_t, unsigned long long*))                                              \
  X(DeviceGetSamples, false, "nvmlDeviceGetSamples", nullptr, nvmlReturn_t,                         \
    (nvmlDevice_t, nvmlSamplingType_t, unsigned long long, nvmlValueType_t*, unsigned int*,         \
     nvmlSample_t*))                                                                                \
  X(DeviceGetFieldValues, false, "nvmlDeviceGetFieldValues", nullptr, nvmlReturn_t,                 \
    (nvmlDevice_t, int, nvmlFieldValue_t*))                                                         \
  X(DeviceGetClockInfo, false, "nvmlDeviceGetClockInfo", nullptr, nvmlReturn_t,                     \
    (nvmlDevice_t, nvmlClockType_t, unsigned int*))                                                 \
  X(DeviceGetApplicationsClock, false, "nvmlDeviceGetApplicationsClock", nullptr, nvmlReturn_t,     \
    (nvmlDevice_t, nvmlClockType_t, unsigned int*))                                                 \
  X(DeviceGetSupportedMemoryClocks, false, "nvmlDeviceGetSupportedMemoryClocks", nullptr,           \
    nvmlReturn_t, (nvmlDevice_t, unsigned int*, unsigned int*))                                     \
  X(DeviceGetSupportedGraphicsClocks, false, "nvmlDeviceGetSupportedGraphicsClocks", nullptr,       \
    nvmlReturn_t, (nvmlDevice_t, unsigned int, unsigned int*, unsigned int*))                       \
  X(DeviceGetTemperature, false, "nvmlDeviceGetTemperature", nullptr, nvmlReturn_t,                 \
    (nvmlDevice_t, nvmlTemperatureSensors_t, unsigned int*))                                        \
  X(DeviceGetCurrentClocksEventReasons, false, "nvmlDeviceGetCurrentClocksEventReasons",            \
    "nvmlDeviceGetCurrentClocksThrottleReasons", nvmlReturn_t, (nvmlDevice_t, unsigned long long*)) \
  X(DeviceGetPowerManagementLimit, false, "nvmlDeviceGetPowerManagementLimit", nullptr,             \
    nvmlReturn_t, (nvmlDevice_t, unsigned int*))                                                    \
  X(DeviceGetPowerManagementDefaultLimit, false, "nvmlDeviceGetPowerManagementDefaultLimit",        \
    nullptr, nvmlReturn_t, (nvmlDevice_t, unsigned int*))                                           \
  X(DeviceGetPowerManagementLimitConstraints, false,                                                \
    "nvmlDeviceGetPowerManagementLimitConstraints", nullptr, nvmlReturn_t,                          \
    (nvmlDevice_t, unsigned int*, unsigned int*))                                                   \
  X(DeviceGetComputeRunningProcesses, false, "nvmlDeviceGetComputeRunningProcesses_v3",             \
    "nvmlDeviceGetComputeRunningProcesses_v2", nvmlReturn_t,                                        \
    (nvmlDevice_t, unsigned int*, nvmlProcessInfo_t*))                                              \
  X(DeviceSetGpuLockedClocks, false, "nvmlDeviceSetGpuLockedClocks", nullptr, nvmlReturn_t,         \
    (nvmlDevice_t, unsigned int, unsigned int))                                                     \
  X(DeviceResetGpuLockedClocks, false, "nvmlDeviceResetGpuLockedClocks", nullptr, nvmlReturn_t,     \
    (nvmlDevice_t))                                                                                 \
  X(DeviceSetMemoryLockedClocks, false, "nvmlDeviceSetMemoryLockedClocks", nullptr, nvmlReturn_t,   \
    (nvmlDevice_t, unsigned int, unsigned int))                                                     \
  X(DeviceResetMemoryLockedClocks, false, "nvmlDeviceResetMemoryLockedClocks", nullptr,             \
    nvmlReturn_t, (nvmlDevice_t))                                                                   \
  X(DeviceSetApplicationsClocks, false, "nvmlDeviceSetApplicationsClocks", nullptr, nvmlReturn_t,   \
    (nvmlDevice_t, unsigned int, unsigned int))                                                     \
  X(DeviceResetApplicationsClocks, false, "nvmlDeviceResetApplicationsClocks", nullptr,             \
    nvmlReturn_t, (nvmlDevice_t))                                                                   \
  X(DeviceSetPowerManagementLimit, false, "nvmlDeviceSetPowerManagementLimit", nullptr,             \
    nvmlReturn_t, (nvmlDevice_t, unsigned int))
