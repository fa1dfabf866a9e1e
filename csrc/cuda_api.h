// Hand-declared subset of the CUDA driver API (libcuda.so.1): only what the timeline and the
// CUDA-ordinal -> UUID enumeration (bind_cuda_devices.cpp) use. Layouts and values follow cuda.h
// of CUDA 11/12/13; no CUDA toolkit is needed to build. The library is opened lazily by its
// first user (timeline.cpp: cuda_api()), from LLM_DVFS_CUDA_LIBRARY or the standard soname, and
// is never unloaded (torch shares it).
#pragma once

#include <cstdint>

extern "C" {

typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st* CUcontext;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;
typedef void (*CUhostFn)(void* user_data);
typedef struct CUuuid_st {
  char bytes[16];  // the GPU's UUID; NVML prints the same bytes as "GPU-" + 8-4-4-4-12 hex
} CUuuid;

// Return codes (cuda.h: cudaError_enum) that the timeline distinguishes; others pass through.
enum : int {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_DEINITIALIZED = 4,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_FOUND = 500,
  CUDA_ERROR_NOT_READY = 600,
  CUDA_ERROR_NOT_SUPPORTED = 801,
  CUDA_ERROR_UNKNOWN = 999,
};

enum : unsigned int {
  CU_EVENT_DEFAULT = 0x0,         // timing enabled; what the timeline needs
  CU_EVENT_BLOCKING_SYNC = 0x1,
  CU_EVENT_DISABLE_TIMING = 0x2,
  CU_STREAM_DEFAULT = 0x0,
  CU_STREAM_NON_BLOCKING = 0x1,   // no implicit sync with the legacy NULL stream
};

}  // extern "C"

// The one list of CUDA driver symbols llm_dvfs uses.
//   X(member, required, primary_name, fallback_name_or_nullptr, return_type, (params))
// Same contract as LLM_DVFS_NVML_SYMBOLS: a missing required symbol is a load error, a missing
// optional one turns its feature off, and the fallback (older, unversioned name) is tried when
// the primary (versioned) name is absent. Both names of each pair have the same signature.
#define LLM_DVFS_CUDA_SYMBOLS(X)                                                                 \
  X(Init, true, "cuInit", nullptr, CUresult, (unsigned int))                                     \
  X(DriverGetVersion, true, "cuDriverGetVersion", nullptr, CUresult, (int*))                     \
  X(GetErrorName, false, "cuGetErrorName", nullptr, CUresult, (CUresult, const char**))          \
  X(GetErrorString, false, "cuGetErrorString", nullptr, CUresult, (CUresult, const char**))      \
  X(CtxGetCurrent, true, "cuCtxGetCurrent", nullptr, CUresult, (CUcontext*))                     \
  X(CtxPushCurrent, true, "cuCtxPushCurrent_v2", "cuCtxPushCurrent", CUresult, (CUcontext))      \
  X(CtxPopCurrent, true, "cuCtxPopCurrent_v2", "cuCtxPopCurrent", CUresult, (CUcontext*))        \
  X(StreamCreate, true, "cuStreamCreate", nullptr, CUresult, (CUstream*, unsigned int))          \
  X(StreamDestroy, true, "cuStreamDestroy_v2", "cuStreamDestroy", CUresult, (CUstream))          \
  X(StreamSynchronize, false, "cuStreamSynchronize", nullptr, CUresult, (CUstream))              \
  X(EventCreate, true, "cuEventCreate", nullptr, CUresult, (CUevent*, unsigned int))             \
  X(EventRecord, true, "cuEventRecord", nullptr, CUresult, (CUevent, CUstream))                  \
  X(EventQuery, true, "cuEventQuery", nullptr, CUresult, (CUevent))                              \
  X(EventSynchronize, false, "cuEventSynchronize", nullptr, CUresult, (CUevent))                 \
  X(EventElapsedTime, true, "cuEventElapsedTime_v2", "cuEventElapsedTime", CUresult,             \
    (float*, CUevent, CUevent))                                                                  \
  X(EventDestroy, true, "cuEventDestroy_v2", "cuEventDestroy", CUresult, (CUevent))              \
  X(LaunchHostFunc, false, "cuLaunchHostFunc", nullptr, CUresult, (CUstream, CUhostFn, void*))   \
  X(DeviceGetCount, false, "cuDeviceGetCount", nullptr, CUresult, (int*))                        \
  X(DeviceGet, false, "cuDeviceGet", nullptr, CUresult, (CUdevice*, int))                        \
  X(DeviceGetUuid, false, "cuDeviceGetUuid_v2", "cuDeviceGetUuid", CUresult, (CUuuid*, CUdevice))

namespace llm_dvfs {

enum class CudaSym : int {
#define LLM_DVFS_X(member, ...) member,
  LLM_DVFS_CUDA_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  kCount
};

// The pointer table generated from the X-macro list; unresolved optional entries are nullptr.
struct CudaApi {
#define LLM_DVFS_X(member, required, primary, fallback, ret, params) ret(*member) params = nullptr;
  LLM_DVFS_CUDA_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  // Name that resolved for each symbol (primary or fallback), or the primary name if none did.
  const char* resolved[static_cast<int>(CudaSym::kCount)] = {};
  const char* name(CudaSym s) const { return resolved[static_cast<int>(s)]; }
};

}  // namespace llm_dvfs
