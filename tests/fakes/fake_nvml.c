/*
 * fake_nvml.c — an emulated NVIDIA H100 80GB HBM3 behind the NVML C ABI, for llm_dvfs tests.
 *
 * Built by tests/fakes/build.py into a shared library and loaded by the package through
 * LLM_DVFS_NVML_LIBRARY. It exports every NVML symbol listed in csrc/nvml_api.h (primary and
 * fallback names, with NVML's exact signatures) plus control functions (fake_nvml_*) that tests
 * call through ctypes. docs/emulated_gpu.md describes it for users of the test suite.
 *
 * Build variants (compile-time):
 *   -DFAKE_NVML_MINIMAL      only the fallback names of versioned pairs (nvmlInit,
 *                            nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex, nvmlDeviceGetPciInfo_v2,
 *                            nvmlDeviceGetCurrentClocksThrottleReasons,
 *                            nvmlDeviceGetComputeRunningProcesses_v2) and no
 *                            nvmlDeviceGetSamples / GetTotalEnergyConsumption / GetFieldValues;
 *   -DFAKE_NVML_NO_REQUIRED  without nvmlDeviceGetName (a required symbol);
 *   -DFAKE_NVML_ABI_CHECK    (with a C++ compiler, -I csrc) checks at compile time that every
 *                            exported NVML function has the type the package's X-macro expects and
 *                            that the structs have the same layout as csrc/nvml_api.h.
 *
 * ---------------------------------------------------------------------------------------------
 * Model
 * ---------------------------------------------------------------------------------------------
 * Time: CLOCK_REALTIME, read under the state lock and forced monotonic (never earlier than the
 * last time any process saw). No threads: everything is computed lazily at each call.
 *
 * Power: each device has a piecewise-constant *base* power B(t) (the power a workload would draw
 * at the full 1980 MHz clock; default constant 300 W), scripted by fake_nvml_set_power_w /
 * fake_nvml_set_trace. The emulated ("true") power is
 *
 *     P = P_idle' + (B - P_idle') * (f V(f)^2) / (f_max V(f_max)^2),   P_idle' = min(P_idle, B)
 *     V(f) = 0.70 V + (1.05 V - 0.70 V) * (f - 345 MHz) / (1980 MHz - 345 MHz)
 *
 * with f the requested SM clock: the locked maximum if GPU clocks are locked, else the
 * applications graphics clock (default 1980 MHz). P_idle defaults to 70 W. If P exceeds the
 * power limit, P is clamped to the limit, the "SW power cap" clock-event reason (0x4) is set and
 * the reported SM clock drops to the highest supported clock whose P fits under the limit (345 MHz
 * at least). The memory clock does not change power.
 *
 * The true power is kept as a sorted list of segments (start time, base, effective power, SM
 * clock, cap flag, cumulative energy at the start). A setting change inserts a segment at "now"
 * and recomputes the segments from now on (scripted future trace segments included); history is
 * never rewritten. The energy counter and fake_nvml_energy_between are the exact integral of this
 * function (cumulative energy + P * dt); the counter starts at an arbitrary epoch (987654.321 J at
 * reset). History before the reset extends backwards at the reset's power, as if the GPU had been
 * running before; after >= 30 s (>= 5 s under a dense trace) old segments are dropped.
 *
 * Driver power sample buffer (nvmlDeviceGetSamples, NVML_TOTAL_POWER_SAMPLES): one sample every
 * 20 ms on a grid anchored at the start of the current trace (each fake_nvml_set_trace call, and
 * the reset, starts a new grid; fake_nvml_set_power_w keeps the grid), optionally shifted by a
 * deterministic +-jitter (fake_nvml_set_jitter_ms / FAKE_NVML_JITTER_MS, < 10 ms). A sample's
 * timestamp is its CLOCK_REALTIME time in µs (plus the driver's realtime offset in force when it
 * was taken: fake_nvml_set_realtime_offset_us imitates a step of the host clock), its value the
 * true power (mW, unsigned int) at (sample time - lag) times the buffer gain of that time
 * (fake_nvml_set_buffer_gain / FAKE_NVML_BUFFER_GAIN, default 1). Only the latest 120 samples
 * taken at or before now are retrievable, returned oldest first in the order taken. With
 * fake_nvml_set_samples_min_count an array below that size gets NVML_ERROR_INSUFFICIENT_SIZE.
 *
 * Fields: NVML_FI_DEV_POWER_INSTANT (186) is the true power at the last 100 ms boundary (minus the
 * lag), NVML_FI_DEV_POWER_AVERAGE (185) and nvmlDeviceGetPowerUsage the exact 1 s mean of the true
 * power ending there. The 100 ms grid is anchored at the reset. Field timestamps are the query
 * time. Lag (fake_nvml_set_lag_ms / FAKE_NVML_LAG_MS, default 0) delays buffer and fields only,
 * never the energy counter. With a counter period (fake_nvml_set_counter_period_ms /
 * FAKE_NVML_COUNTER_PERIOD_MS, default 0 = exact) the counter holds the integral up to the last
 * multiple of the period on the 100 ms grid's anchor. Temperature = 40 + 30 * min(1, average /
 * 700 W) °C.
 *
 * State: one file (FAKE_NVML_STATE, default /tmp/fake_nvml_state.<uid>) mmap'ed MAP_SHARED, so
 * every process (and every loaded variant) sees the same GPUs; a robust process-shared mutex
 * guards it (a process killed while holding it does not wedge the others). The file is
 * (re)initialised when missing or of another layout. FAKE_NVML_LAG_MS, FAKE_NVML_JITTER_MS,
 * FAKE_NVML_BUFFER_GAIN and FAKE_NVML_COUNTER_PERIOD_MS are read when it is initialised and by
 * fake_nvml_reset. The device count (max 8) is the caller's
 * FAKE_NVML_DEVICES at each call, or when unset the value stored at initialisation/reset (1).
 * Device i's UUID is GPU-fa4e0000-0000-0000-0000-00000000000i (valid hex: fake_cuda.c reports the
 * same bytes through cuDeviceGetUuid); its name is FAKE_NAME unless FAKE_NVML_DEVICE_NAMES (a
 * comma-separated list, read at each call) names it otherwise.
 * The environment variable is re-read at every call, so a process follows FAKE_NVML_STATE when a
 * test changes it. nvmlInit/nvmlShutdown are refcounted per process (per loaded library).
 *
 * Control functions return 0 on success or an NVML error code (2 invalid argument, 6 unknown
 * function name, 7 too many segments, 999 state file unusable); see docs/emulated_gpu.md.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef FAKE_NVML_ABI_CHECK
/* Compile-time check mode: use the package's own declarations (C++ only). */
#include <type_traits>
#include "nvml_api.h"
#else
/* The same subset of the NVML ABI as csrc/nvml_api.h (which is C++), in C. Layouts follow nvml.h
 * of CUDA 12/13; the static assertions below pin them. */
typedef int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;
enum {
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
  NVML_ERROR_UNKNOWN = 999
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
  NVML_VALUE_TYPE_UNSIGNED_SHORT = 6
} nvmlValueType_t;
typedef struct nvmlSample_st {
  unsigned long long timeStamp; /* µs, host CLOCK_REALTIME */
  nvmlValue_t sampleValue;
} nvmlSample_t;
typedef enum nvmlSamplingType_enum { NVML_TOTAL_POWER_SAMPLES = 0 } nvmlSamplingType_t;
typedef struct nvmlFieldValue_st {
  unsigned int fieldId;
  unsigned int scopeId;
  long long timestamp;
  long long latencyUsec;
  nvmlValueType_t valueType;
  nvmlReturn_t nvmlReturn;
  nvmlValue_t value;
} nvmlFieldValue_t;
enum { NVML_FI_DEV_POWER_AVERAGE = 185, NVML_FI_DEV_POWER_INSTANT = 186 };
typedef enum nvmlClockType_enum {
  NVML_CLOCK_GRAPHICS = 0,
  NVML_CLOCK_SM = 1,
  NVML_CLOCK_MEM = 2
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
typedef struct nvmlProcessInfo_st {
  unsigned int pid;
  unsigned long long usedGpuMemory;
  unsigned int gpuInstanceId;
  unsigned int computeInstanceId;
} nvmlProcessInfo_t;
#endif /* FAKE_NVML_ABI_CHECK */

#ifdef __cplusplus
#define FAKE_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define FAKE_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

/* Layouts of real NVML (x86-64 / aarch64 LP64); identical in both modes. */
FAKE_STATIC_ASSERT(sizeof(nvmlValue_t) == 8, "nvmlValue_t");
FAKE_STATIC_ASSERT(sizeof(nvmlSample_t) == 16 && offsetof(nvmlSample_t, sampleValue) == 8,
                   "nvmlSample_t");
FAKE_STATIC_ASSERT(sizeof(nvmlFieldValue_t) == 40 && offsetof(nvmlFieldValue_t, timestamp) == 8 &&
                       offsetof(nvmlFieldValue_t, latencyUsec) == 16 &&
                       offsetof(nvmlFieldValue_t, valueType) == 24 &&
                       offsetof(nvmlFieldValue_t, nvmlReturn) == 28 &&
                       offsetof(nvmlFieldValue_t, value) == 32,
                   "nvmlFieldValue_t");
FAKE_STATIC_ASSERT(sizeof(nvmlMemory_t) == 24, "nvmlMemory_t");
FAKE_STATIC_ASSERT(sizeof(nvmlPciInfo_t) == 68 && offsetof(nvmlPciInfo_t, domain) == 16 &&
                       offsetof(nvmlPciInfo_t, pciSubSystemId) == 32 &&
                       offsetof(nvmlPciInfo_t, busId) == 36,
                   "nvmlPciInfo_t");
FAKE_STATIC_ASSERT(sizeof(nvmlProcessInfo_t) == 24 &&
                       offsetof(nvmlProcessInfo_t, usedGpuMemory) == 8 &&
                       offsetof(nvmlProcessInfo_t, gpuInstanceId) == 16 &&
                       offsetof(nvmlProcessInfo_t, computeInstanceId) == 20,
                   "nvmlProcessInfo_t");
FAKE_STATIC_ASSERT(sizeof(nvmlValueType_t) == 4 && sizeof(nvmlSamplingType_t) == 4 &&
                       sizeof(nvmlClockType_t) == 4 && sizeof(nvmlTemperatureSensors_t) == 4,
                   "enum sizes");

#ifdef __cplusplus
extern "C" {
#endif

#define FAKE_API __attribute__((visibility("default")))

/* ------------------------------------------------------------------------------------------ */
/* Constants of the emulated H100                                                              */
/* ------------------------------------------------------------------------------------------ */
#define FAKE_MAX_DEV 8
#define FAKE_SEG_CAP 16384     /* power segments kept per device */
#define FAKE_ANCH_CAP 512      /* sample-grid anchors kept per device */
#define FAKE_MAX_PROCS 64
#define FAKE_MAX_FIELD_FAILS 8
#define FAKE_MAX_RT_STEPS 16   /* realtime-clock steps remembered for stamping samples */
#define FAKE_MAX_MIN_COUNT 65536u
#define FAKE_MAX_COUNTER_PERIOD_MS 10000u
#define FAKE_BUF_SAMPLES 120
#define FAKE_SAMPLE_NS 20000000LL
#define FAKE_FIELD_NS 100000000LL
#define FAKE_AVG_NS 1000000000LL
#define FAKE_HORIZON_NS 30000000000LL
#define FAKE_MIN_HORIZON_NS 5000000000LL
#define FAKE_F_MIN 345u
#define FAKE_F_MAX 1980u
#define FAKE_F_STEP 15u
#define FAKE_N_GR_HI 110u      /* 1980..345 step 15, for memory 2619 */
#define FAKE_GR_LO_MAX 1410u   /* memory 1593: 1410..345 step 15 */
#define FAKE_N_GR_LO 72u
#define FAKE_MEM_HI 2619u
#define FAKE_MEM_LO 1593u
#define FAKE_V_MIN 0.70
#define FAKE_V_MAX 1.05
#define FAKE_IDLE_W 70.0
#define FAKE_BASE_W 300.0
#define FAKE_LIMIT_MIN_MW 200000u
#define FAKE_LIMIT_MAX_MW 700000u
#define FAKE_LIMIT_DEFAULT_MW 700000u
#define FAKE_ENERGY_EPOCH_J 987654.321
#define FAKE_MEM_TOTAL 85520809984ULL
#define FAKE_MEM_RESERVED 536870912ULL
#define FAKE_MEM_PER_PROC 1073741824ULL
#define FAKE_REASON_SW_POWER_CAP 0x4ULL
#define FAKE_NAME "NVIDIA H100 80GB HBM3"
#define FAKE_DRIVER_VERSION "580.159.04"
#define FAKE_NVML_VERSION "12.580.159.04"
#define FAKE_MAGIC 0x4c4d564e454b4146ULL /* "FAKENVML" */
#define FAKE_LAYOUT_VERSION 5u

/* Canonical NVML functions (one per X-macro member): failure injection, latency and call counts
 * are keyed by these, so both versioned names of one function share them. */
#define FAKE_FUNCS(F)                                                                          \
  F(Init, "nvmlInit") F(Shutdown, "nvmlShutdown") F(ErrorString, "nvmlErrorString")            \
  F(SystemGetDriverVersion, "nvmlSystemGetDriverVersion")                                      \
  F(SystemGetNVMLVersion, "nvmlSystemGetNVMLVersion") F(DeviceGetCount, "nvmlDeviceGetCount")  \
  F(DeviceGetHandleByIndex, "nvmlDeviceGetHandleByIndex")                                      \
  F(DeviceGetName, "nvmlDeviceGetName") F(DeviceGetUUID, "nvmlDeviceGetUUID")                  \
  F(DeviceGetPciInfo, "nvmlDeviceGetPciInfo") F(DeviceGetMemoryInfo, "nvmlDeviceGetMemoryInfo") \
  F(DeviceGetPowerUsage, "nvmlDeviceGetPowerUsage")                                            \
  F(DeviceGetTotalEnergyConsumption, "nvmlDeviceGetTotalEnergyConsumption")                    \
  F(DeviceGetSamples, "nvmlDeviceGetSamples")                                                  \
  F(DeviceGetFieldValues, "nvmlDeviceGetFieldValues")                                          \
  F(DeviceGetClockInfo, "nvmlDeviceGetClockInfo")                                              \
  F(DeviceGetApplicationsClock, "nvmlDeviceGetApplicationsClock")                              \
  F(DeviceGetSupportedMemoryClocks, "nvmlDeviceGetSupportedMemoryClocks")                      \
  F(DeviceGetSupportedGraphicsClocks, "nvmlDeviceGetSupportedGraphicsClocks")                  \
  F(DeviceGetTemperature, "nvmlDeviceGetTemperature")                                          \
  F(DeviceGetCurrentClocksEventReasons, "nvmlDeviceGetCurrentClocksEventReasons")              \
  F(DeviceGetPowerManagementLimit, "nvmlDeviceGetPowerManagementLimit")                        \
  F(DeviceGetPowerManagementDefaultLimit, "nvmlDeviceGetPowerManagementDefaultLimit")          \
  F(DeviceGetPowerManagementLimitConstraints, "nvmlDeviceGetPowerManagementLimitConstraints")  \
  F(DeviceGetComputeRunningProcesses, "nvmlDeviceGetComputeRunningProcesses")                  \
  F(DeviceSetGpuLockedClocks, "nvmlDeviceSetGpuLockedClocks")                                  \
  F(DeviceResetGpuLockedClocks, "nvmlDeviceResetGpuLockedClocks")                              \
  F(DeviceSetMemoryLockedClocks, "nvmlDeviceSetMemoryLockedClocks")                            \
  F(DeviceResetMemoryLockedClocks, "nvmlDeviceResetMemoryLockedClocks")                        \
  F(DeviceSetApplicationsClocks, "nvmlDeviceSetApplicationsClocks")                            \
  F(DeviceResetApplicationsClocks, "nvmlDeviceResetApplicationsClocks")                        \
  F(DeviceSetPowerManagementLimit, "nvmlDeviceSetPowerManagementLimit")

/* Every exported NVML symbol name (all variants) and its canonical function. */
#define FAKE_SYMS(S)                                                                           \
  S(nvmlInit_v2, Init) S(nvmlInit, Init) S(nvmlShutdown, Shutdown)                             \
  S(nvmlErrorString, ErrorString) S(nvmlSystemGetDriverVersion, SystemGetDriverVersion)        \
  S(nvmlSystemGetNVMLVersion, SystemGetNVMLVersion) S(nvmlDeviceGetCount_v2, DeviceGetCount)   \
  S(nvmlDeviceGetCount, DeviceGetCount)                                                        \
  S(nvmlDeviceGetHandleByIndex_v2, DeviceGetHandleByIndex)                                     \
  S(nvmlDeviceGetHandleByIndex, DeviceGetHandleByIndex) S(nvmlDeviceGetName, DeviceGetName)    \
  S(nvmlDeviceGetUUID, DeviceGetUUID) S(nvmlDeviceGetPciInfo_v3, DeviceGetPciInfo)             \
  S(nvmlDeviceGetPciInfo_v2, DeviceGetPciInfo) S(nvmlDeviceGetMemoryInfo, DeviceGetMemoryInfo) \
  S(nvmlDeviceGetPowerUsage, DeviceGetPowerUsage)                                              \
  S(nvmlDeviceGetTotalEnergyConsumption, DeviceGetTotalEnergyConsumption)                      \
  S(nvmlDeviceGetSamples, DeviceGetSamples) S(nvmlDeviceGetFieldValues, DeviceGetFieldValues)  \
  S(nvmlDeviceGetClockInfo, DeviceGetClockInfo)                                                \
  S(nvmlDeviceGetApplicationsClock, DeviceGetApplicationsClock)                                \
  S(nvmlDeviceGetSupportedMemoryClocks, DeviceGetSupportedMemoryClocks)                        \
  S(nvmlDeviceGetSupportedGraphicsClocks, DeviceGetSupportedGraphicsClocks)                    \
  S(nvmlDeviceGetTemperature, DeviceGetTemperature)                                            \
  S(nvmlDeviceGetCurrentClocksEventReasons, DeviceGetCurrentClocksEventReasons)                \
  S(nvmlDeviceGetCurrentClocksThrottleReasons, DeviceGetCurrentClocksEventReasons)             \
  S(nvmlDeviceGetPowerManagementLimit, DeviceGetPowerManagementLimit)                          \
  S(nvmlDeviceGetPowerManagementDefaultLimit, DeviceGetPowerManagementDefaultLimit)            \
  S(nvmlDeviceGetPowerManagementLimitConstraints, DeviceGetPowerManagementLimitConstraints)    \
  S(nvmlDeviceGetComputeRunningProcesses_v3, DeviceGetComputeRunningProcesses)                 \
  S(nvmlDeviceGetComputeRunningProcesses_v2, DeviceGetComputeRunningProcesses)                 \
  S(nvmlDeviceSetGpuLockedClocks, DeviceSetGpuLockedClocks)                                    \
  S(nvmlDeviceResetGpuLockedClocks, DeviceResetGpuLockedClocks)                                \
  S(nvmlDeviceSetMemoryLockedClocks, DeviceSetMemoryLockedClocks)                              \
  S(nvmlDeviceResetMemoryLockedClocks, DeviceResetMemoryLockedClocks)                          \
  S(nvmlDeviceSetApplicationsClocks, DeviceSetApplicationsClocks)                              \
  S(nvmlDeviceResetApplicationsClocks, DeviceResetApplicationsClocks)                          \
  S(nvmlDeviceSetPowerManagementLimit, DeviceSetPowerManagementLimit)

enum {
#define FAKE_F_ENUM(id, name) FN_##id,
  FAKE_FUNCS(FAKE_F_ENUM)
#undef FAKE_F_ENUM
  FN_COUNT
};
enum {
#define FAKE_S_ENUM(sym, fn) SYM_##sym,
  FAKE_SYMS(FAKE_S_ENUM)
#undef FAKE_S_ENUM
  SYM_COUNT
};
static const char *const g_fn_names[FN_COUNT] = {
#define FAKE_F_NAME(id, name) name,
    FAKE_FUNCS(FAKE_F_NAME)
#undef FAKE_F_NAME
};
static const char *const g_sym_names[SYM_COUNT] = {
#define FAKE_S_NAME(sym, fn) #sym,
    FAKE_SYMS(FAKE_S_NAME)
#undef FAKE_S_NAME
};
static const int g_sym_fn[SYM_COUNT] = {
#define FAKE_S_FN(sym, fn) FN_##fn,
    FAKE_SYMS(FAKE_S_FN)
#undef FAKE_S_FN
};

/* ------------------------------------------------------------------------------------------ */
/* Shared state (the file)                                                                     */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
  int64_t t_ns;   /* CLOCK_REALTIME start of the segment */
  double base_w;  /* scripted base power (at 1980 MHz) */
  double p_w;     /* true power after the clock model and the power cap */
  double e_j;     /* cumulative energy at t_ns, J since the arbitrary epoch */
  double gain;    /* buffer gain in force: buffer values are p_w * gain */
  uint32_t f_mhz; /* SM clock the GPU runs at (after power-cap throttling) */
  uint32_t capped;
} fake_seg_t;

typedef struct {
  uint32_t locked_min, locked_max;         /* GPU locked clocks, 0/0 = none */
  uint32_t mem_locked_min, mem_locked_max; /* memory locked clocks, 0/0 = none */
  uint32_t app_mem, app_gr;                /* applications clocks */
  uint32_t limit_mw;
  uint32_t nproc;
  uint32_t pids[FAKE_MAX_PROCS];
  double idle_w;
  double buffer_gain;        /* sample-buffer values / true power, from now on */
  int64_t counter_period_ns; /* energy-counter update period, 0 = exact at every call */
  int64_t grid100_ns;     /* anchor of the 100 ms field-update grid (and the counter's grid) */
  int64_t trace_start_ns; /* last set_trace / set_power_w */
  uint32_t nseg, seg_pruned;
  uint32_t nanch, anch_pruned;
  int64_t anch[FAKE_ANCH_CAP];
  fake_seg_t seg[FAKE_SEG_CAP];
} fake_dev_t;

typedef struct {
  uint32_t field_id;
  int32_t code;
  int32_t left; /* -1 = forever */
  int32_t pad;
} fake_field_fail_t;

typedef struct {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t pad0;
  uint64_t size;
  pthread_mutex_t mu; /* robust, process-shared */
  int64_t last_now_ns;
  int64_t reset_ns;
  uint32_t ndev;
  int32_t permission;
  int32_t debug_holder_pid; /* fake_nvml_debug_hold_lock: who holds the mutex (0 = nobody) */
  int32_t pad1;
  int64_t lag_ns;
  int64_t jitter_ns;
  uint32_t samples_min_count; /* GetSamples needs an array of at least this many (0 = any) */
  uint32_t nsteps;            /* entries of rt_step */
  struct {
    int64_t t_ns;      /* model time of the step */
    int64_t offset_ns; /* driver realtime - model time from t_ns on */
  } rt_step[FAKE_MAX_RT_STEPS];
  int32_t fail_code[FN_COUNT];
  int32_t fail_left[FN_COUNT]; /* -1 = forever */
  uint32_t latency_us[FN_COUNT];
  int64_t calls[FN_COUNT];
  int64_t sym_calls[SYM_COUNT];
  fake_field_fail_t field_fail[FAKE_MAX_FIELD_FAILS];
  fake_dev_t dev[FAKE_MAX_DEV];
} fake_shared_t;

/* Devices visible to this process: FAKE_NVML_DEVICES of the caller's environment when set (so a
 * test may change it at any time; every device's state always exists), else the count stored
 * when the state was created or reset. */
static unsigned env_devices(unsigned dflt);
static unsigned dev_count(const fake_shared_t *sh) { return env_devices(sh->ndev); }

/* ------------------------------------------------------------------------------------------ */
/* Process-local state                                                                         */
/* ------------------------------------------------------------------------------------------ */
struct nvmlDevice_st {
  unsigned index;
};
static struct nvmlDevice_st g_handles[FAKE_MAX_DEV] = {{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}};
static int g_refcount; /* nvmlInit/Shutdown, per process (atomics) */
#ifdef PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP
static pthread_rwlock_t g_map_lock = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
#else
static pthread_rwlock_t g_map_lock = PTHREAD_RWLOCK_INITIALIZER;
#endif
static fake_shared_t *g_sh;       /* guarded by g_map_lock: readers use, the writer remaps */
static char g_sh_path[4096];
static int g_warned;

static void atfork_prepare(void) { pthread_rwlock_wrlock(&g_map_lock); }
static void atfork_release(void) { pthread_rwlock_unlock(&g_map_lock); }

__attribute__((constructor)) static void fake_ctor(void) {
  /* A child forked while another thread held the map lock would inherit it locked. */
  pthread_atfork(atfork_prepare, atfork_release, atfork_release);
}

__attribute__((destructor)) static void fake_dtor(void) {
  if (g_sh) munmap(g_sh, sizeof(fake_shared_t));
  g_sh = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */
static int64_t realtime_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

static uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

static void sleep_us(uint64_t us) {
  struct timespec ts;
  ts.tv_sec = (time_t)(us / 1000000u);
  ts.tv_nsec = (long)(us % 1000000u) * 1000L;
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

static double env_double(const char *name, double dflt) {
  const char *v = getenv(name);
  if (!v || !*v) return dflt;
  char *end = NULL;
  double x = strtod(v, &end);
  if (end == v || !isfinite(x)) return dflt;
  return x;
}

/* FAKE_NVML_DEVICES as a valid count (1..8), else dflt. */
static unsigned env_devices(unsigned dflt) {
  double n = env_double("FAKE_NVML_DEVICES", -1.0);
  return (n >= 1 && n <= FAKE_MAX_DEV && n == floor(n)) ? (unsigned)n : dflt;
}

/* Name of device `index`: entry `index` of the caller's FAKE_NVML_DEVICE_NAMES (comma-separated,
 * re-read at each call) when present and non-empty, else FAKE_NAME. Only the name changes: every
 * device keeps the H100's tables (a mixed-model host for device-order tests). */
__attribute__((unused)) static void device_name(unsigned index, char *out, size_t size) {
  snprintf(out, size, "%s", FAKE_NAME);
  const char *v = getenv("FAKE_NVML_DEVICE_NAMES");
  for (unsigned i = 0; v && i < index; ++i) {
    v = strchr(v, ',');
    if (v) ++v;
  }
  if (!v) return;
  size_t n = strcspn(v, ",");
  while (n > 0 && v[0] == ' ') {
    ++v;
    --n;
  }
  while (n > 0 && v[n - 1] == ' ') --n;
  if (n == 0) return;
  if (n >= size) n = size - 1;
  memcpy(out, v, n);
  out[n] = '\0';
}

static int64_t ms_to_ns(double ms) { return (int64_t)llround(ms * 1e6); }

static int64_t clamp_jitter_ns(double ms) {
  if (!(ms > 0)) return 0;
  if (ms > 9.0) ms = 9.0; /* < half the 20 ms period keeps samples ordered */
  return ms_to_ns(ms);
}

/* A buffer gain the emulator accepts: finite, in (0, 10]. */
static int gain_ok(double g) { return isfinite(g) && g > 0 && g <= 10.0; }
static double env_gain(void) {
  double g = env_double("FAKE_NVML_BUFFER_GAIN", 1.0);
  return gain_ok(g) ? g : 1.0;
}
static int64_t env_counter_period_ns(void) {
  double ms = env_double("FAKE_NVML_COUNTER_PERIOD_MS", 0.0);
  if (!(ms >= 1.0)) return 0;
  if (ms > FAKE_MAX_COUNTER_PERIOD_MS) ms = FAKE_MAX_COUNTER_PERIOD_MS;
  return (int64_t)floor(ms) * 1000000LL;
}

static int64_t clamp_lag_ns(double ms) {
  if (!(ms > 0)) return 0;
  if (ms > 2000.0) ms = 2000.0;
  return ms_to_ns(ms);
}

static nvmlReturn_t copy_str(char *dst, unsigned int len, const char *src) {
  if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
  size_t n = strlen(src);
  if ((size_t)len < n + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
  memcpy(dst, src, n + 1);
  return NVML_SUCCESS;
}

/* Resolve a user-given function name to its canonical function: an exact exported symbol name,
 * a canonical name, or a canonical name with a _vN suffix. -1 if unknown. */
static int resolve_fn(const char *name) {
  if (!name) return -1;
  for (int i = 0; i < SYM_COUNT; ++i)
    if (strcmp(name, g_sym_names[i]) == 0) return g_sym_fn[i];
  for (int i = 0; i < FN_COUNT; ++i)
    if (strcmp(name, g_fn_names[i]) == 0) return i;
  const char *u = strrchr(name, '_');
  if (u && u[1] == 'v' && u[2] >= '0' && u[2] <= '9') {
    size_t n = (size_t)(u - name);
    for (int i = 0; i < FN_COUNT; ++i)
      if (strlen(g_fn_names[i]) == n && strncmp(name, g_fn_names[i], n) == 0) return i;
  }
  return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* Clock tables and the power model                                                            */
/* ------------------------------------------------------------------------------------------ */
static int gr_in_table(unsigned mem_mhz, unsigned f) {
  unsigned hi = mem_mhz == FAKE_MEM_LO ? FAKE_GR_LO_MAX : FAKE_F_MAX;
  return f >= FAKE_F_MIN && f <= hi && (f - FAKE_F_MIN) % FAKE_F_STEP == 0;
}
static int mem_in_table(unsigned m) { return m == FAKE_MEM_HI || m == FAKE_MEM_LO; }

static double volt(double f_mhz) {
  return FAKE_V_MIN + (FAKE_V_MAX - FAKE_V_MIN) * (f_mhz - FAKE_F_MIN) / (double)(FAKE_F_MAX - FAKE_F_MIN);
}
static double model_power(double base_w, double idle_w, double f_mhz) {
  double idle = base_w < idle_w ? base_w : idle_w;
  double v = volt(f_mhz);
  double scale = f_mhz * v * v / ((double)FAKE_F_MAX * FAKE_V_MAX * FAKE_V_MAX);
  return idle + (base_w - idle) * scale;
}
static unsigned requested_sm(const fake_dev_t *d) {
  return d->locked_max ? d->locked_max : d->app_gr;
}
static void eval_seg(const fake_dev_t *d, fake_seg_t *s) {
  unsigned f = requested_sm(d);
  s->gain = d->buffer_gain;
  double lim = d->limit_mw / 1000.0;
  double p = model_power(s->base_w, d->idle_w, f);
  if (p > lim) {
    unsigned g = f;
    while (g > FAKE_F_MIN && model_power(s->base_w, d->idle_w, g) > lim) g -= FAKE_F_STEP;
    s->p_w = lim;
    s->f_mhz = g;
    s->capped = 1;
  } else {
    s->p_w = p;
    s->f_mhz = f;
    s->capped = 0;
  }
}

/* Last segment starting at or before t; -1 if t precedes all. */
static int seg_find(const fake_dev_t *d, int64_t t) {
  int lo = 0, hi = (int)d->nseg - 1, ans = -1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    if (d->seg[mid].t_ns <= t) {
      ans = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  return ans;
}
static const fake_seg_t *seg_at(const fake_dev_t *d, int64_t t) {
  int k = seg_find(d, t);
  return &d->seg[k < 0 ? 0 : k];
}
static double power_at(const fake_dev_t *d, int64_t t) { return seg_at(d, t)->p_w; }

/* Cumulative energy (J) at time t; NaN before retained history. */
static double energy_at(const fake_dev_t *d, int64_t t) {
  int k = seg_find(d, t);
  if (k < 0) {
    if (d->seg_pruned) return NAN;
    return d->seg[0].e_j - d->seg[0].p_w * (double)(d->seg[0].t_ns - t) * 1e-9;
  }
  return d->seg[k].e_j + d->seg[k].p_w * (double)(t - d->seg[k].t_ns) * 1e-9;
}

static void recompute_from(fake_dev_t *d, unsigned i) {
  for (unsigned j = i; j < d->nseg; ++j) {
    eval_seg(d, &d->seg[j]);
    if (j > 0) {
      const fake_seg_t *p = &d->seg[j - 1];
      d->seg[j].e_j = p->e_j + p->p_w * (double)(d->seg[j].t_ns - p->t_ns) * 1e-9;
    }
  }
}

static void seg_drop_oldest(fake_dev_t *d, int k) {
  if (k <= 0) return;
  memmove(&d->seg[0], &d->seg[k], (size_t)(d->nseg - (unsigned)k) * sizeof(fake_seg_t));
  d->nseg -= (unsigned)k;
  d->seg_pruned = 1;
}

/* Drop segments older than the horizon (30 s, or 5 s when that is not enough). Under a
 * pathological event rate (> ~3000 changes/s) keep only the newest half: the energy counter stays
 * exact (energies are cumulative), only the oldest buffer samples may then read a later power. */
static void seg_prune(fake_dev_t *d, int64_t now) {
  const int64_t horizons[2] = {FAKE_HORIZON_NS, FAKE_MIN_HORIZON_NS};
  for (int h = 0; h < 2; ++h) {
    seg_drop_oldest(d, seg_find(d, now - horizons[h]));
    if (d->nseg < FAKE_SEG_CAP * 3 / 4) return;
  }
  int k = (int)d->nseg - FAKE_SEG_CAP / 2;
  int in_force = seg_find(d, now);
  seg_drop_oldest(d, k < in_force ? k : in_force);
}

/* Index of a segment starting exactly at now (inserted if needed, copying the one in force);
 * -1 if the table is full. */
static int seg_insert_now(fake_dev_t *d, int64_t now) {
  int k = seg_find(d, now);
  if (k >= 0 && d->seg[k].t_ns == now) return k;
  if (d->nseg >= FAKE_SEG_CAP) {
    seg_prune(d, now);
    k = seg_find(d, now);
    if (d->nseg >= FAKE_SEG_CAP) return -1;
  }
  if (k < 0) k = 0; /* cannot happen: time is monotonic and seg[0] is the reset */
  memmove(&d->seg[k + 2], &d->seg[k + 1], (size_t)(d->nseg - (unsigned)k - 1) * sizeof(fake_seg_t));
  d->seg[k + 1] = d->seg[k];
  d->seg[k + 1].t_ns = now;
  d->nseg++;
  return k + 1;
}

/* Settings (clocks, limit, idle) changed at now: re-evaluate from now on. */
static nvmlReturn_t apply_settings(fake_dev_t *d, int64_t now) {
  int i = seg_insert_now(d, now);
  if (i < 0) return NVML_ERROR_UNKNOWN;
  recompute_from(d, (unsigned)i);
  return NVML_SUCCESS;
}

static void add_anchor(fake_dev_t *d, int64_t t) {
  if (d->nanch > 0 && d->anch[d->nanch - 1] >= t) return;
  if (d->nanch >= FAKE_ANCH_CAP) {
    unsigned drop = FAKE_ANCH_CAP / 2;
    memmove(&d->anch[0], &d->anch[drop], (size_t)(d->nanch - drop) * sizeof(int64_t));
    d->nanch -= drop;
    d->anch_pruned = 1;
  }
  d->anch[d->nanch++] = t;
}

/* Base power from now: segment i begins t_s[i] s after now; before t_s[0] the previous base holds. */
static int set_base(fake_dev_t *d, int64_t now, const double *t_s, const double *w, unsigned n,
                    int anchor) {
  if (!t_s || !w || n == 0) return NVML_ERROR_INVALID_ARGUMENT;
  for (unsigned i = 0; i < n; ++i) {
    if (!isfinite(t_s[i]) || t_s[i] < 0 || t_s[i] > 1e6 || (i > 0 && t_s[i] < t_s[i - 1]))
      return NVML_ERROR_INVALID_ARGUMENT;
    if (!isfinite(w[i]) || w[i] < 0 || w[i] > 1e5) return NVML_ERROR_INVALID_ARGUMENT;
  }
  if (n > FAKE_SEG_CAP / 2) return NVML_ERROR_INSUFFICIENT_SIZE;
  int k = seg_find(d, now);
  if (k < 0) k = 0;
  d->nseg = (unsigned)k + 1; /* forget the scripted future */
  if (d->nseg + n + 1 > FAKE_SEG_CAP) {
    seg_prune(d, now);
    k = (int)d->nseg - 1;
    if (d->nseg + n + 1 > FAKE_SEG_CAP) return NVML_ERROR_INSUFFICIENT_SIZE;
  }
  double prev = d->seg[k].base_w;
  unsigned first;
  if (d->seg[k].t_ns == now) {
    first = (unsigned)k;
  } else {
    first = (unsigned)k + 1;
    d->seg[first] = d->seg[k];
    d->seg[first].t_ns = now;
    d->nseg = first + 1;
  }
  d->seg[first].base_w = prev;
  unsigned last = first;
  for (unsigned i = 0; i < n; ++i) {
    int64_t t = now + (int64_t)llround(t_s[i] * 1e9);
    if (t == d->seg[last].t_ns) {
      d->seg[last].base_w = w[i];
    } else {
      ++last;
      d->seg[last] = d->seg[last - 1];
      d->seg[last].t_ns = t;
      d->seg[last].base_w = w[i];
      d->nseg = last + 1;
    }
  }
  recompute_from(d, first);
  d->trace_start_ns = now;
  if (anchor) add_anchor(d, now);
  return NVML_SUCCESS;
}

/* ------------------------------------------------------------------------------------------ */
/* Sample buffer and fields                                                                    */
/* ------------------------------------------------------------------------------------------ */
static int64_t sample_jitter_ns(int64_t anchor, int64_t j, int64_t jitter_ns) {
  if (jitter_ns <= 0) return 0;
  int64_t jit_us = jitter_ns / 1000;
  uint64_t h = splitmix64((uint64_t)anchor * 1000003ULL ^ (uint64_t)j);
  return ((int64_t)(h % (uint64_t)(2 * jit_us + 1)) - jit_us) * 1000;
}

/* Driver realtime minus model time at model time t: the realtime-clock step in force then. */
static int64_t rt_offset_at(const fake_shared_t *sh, int64_t t) {
  int64_t off = 0;
  for (uint32_t k = 0; k < sh->nsteps && sh->rt_step[k].t_ns <= t; ++k) off = sh->rt_step[k].offset_ns;
  return off;
}

/* The newest (up to) FAKE_BUF_SAMPLES samples taken at or before now, newest first (in the order
 * they were taken). ts_us is the stamp the driver gave each: its realtime clock at that moment,
 * so after a realtime step the stamps are not monotonic in this order. */
__attribute__((unused)) static unsigned collect_samples(const fake_shared_t *sh, const fake_dev_t *d, int64_t now,
                                unsigned long long *ts_us, unsigned *mw) {
  unsigned n = 0;
  unsigned long long prev_us = ~0ULL;
  const int64_t dt = FAKE_SAMPLE_NS, jit = sh->jitter_ns;
  for (int a = (int)d->nanch - 1; a >= 0 && n < FAKE_BUF_SAMPLES; --a) {
    const int64_t A = d->anch[a];
    int64_t upper = (a + 1 < (int)d->nanch) ? d->anch[a + 1] - 1 : now;
    if (upper > now) upper = now;
    const int backward = (a == 0 && !d->anch_pruned); /* the GPU existed before the reset */
    if (upper < A && !backward) continue;
    for (int64_t j = floor_div(upper - A + jit, dt); n < FAKE_BUF_SAMPLES; --j) {
      if (j < 0 && !backward) break;
      int64_t t = A + j * dt + sample_jitter_ns(A, j, jit);
      if (t > upper || (!backward && t < A)) continue;
      unsigned long long us = (unsigned long long)(t / 1000);
      if (us >= prev_us) continue; /* keep sample times strictly increasing */
      prev_us = us;
      ts_us[n] = (unsigned long long)((t + rt_offset_at(sh, t)) / 1000);
      const fake_seg_t *s = seg_at(d, t - sh->lag_ns);
      mw[n] = (unsigned)llround(s->p_w * s->gain * 1000.0);
      ++n;
    }
  }
  return n;
}

static int64_t field_boundary(const fake_dev_t *d, int64_t now) {
  return d->grid100_ns + floor_div(now - d->grid100_ns, FAKE_FIELD_NS) * FAKE_FIELD_NS;
}
__attribute__((unused)) static double instant_w(const fake_shared_t *sh, const fake_dev_t *d, int64_t now) {
  return power_at(d, field_boundary(d, now) - sh->lag_ns);
}
static double average_w(const fake_shared_t *sh, const fake_dev_t *d, int64_t now) {
  int64_t b = field_boundary(d, now) - sh->lag_ns;
  return (energy_at(d, b) - energy_at(d, b - FAKE_AVG_NS)) / (FAKE_AVG_NS * 1e-9);
}

/* ------------------------------------------------------------------------------------------ */
/* State file                                                                                  */
/* ------------------------------------------------------------------------------------------ */
static void state_path(char *out, size_t n) {
  const char *p = getenv("FAKE_NVML_STATE");
  if (p && *p)
    snprintf(out, n, "%s", p);
  else
    snprintf(out, n, "/tmp/fake_nvml_state.%u", (unsigned)getuid());
}

static void dev_reset(fake_dev_t *d, unsigned index, int64_t now) {
  (void)index;
  d->buffer_gain = env_gain();
  d->counter_period_ns = env_counter_period_ns();
  d->locked_min = d->locked_max = 0;
  d->mem_locked_min = d->mem_locked_max = 0;
  d->app_mem = FAKE_MEM_HI;
  d->app_gr = FAKE_F_MAX;
  d->limit_mw = FAKE_LIMIT_DEFAULT_MW;
  d->nproc = 0;
  d->idle_w = FAKE_IDLE_W;
  d->grid100_ns = now;
  d->trace_start_ns = now;
  d->nseg = 1;
  d->seg_pruned = 0;
  d->seg[0].t_ns = now;
  d->seg[0].base_w = FAKE_BASE_W;
  d->seg[0].e_j = FAKE_ENERGY_EPOCH_J;
  eval_seg(d, &d->seg[0]);
  d->nanch = 1;
  d->anch_pruned = 0;
  d->anch[0] = now;
}

/* Everything but the mutex; caller holds the mutex (or is initialising under flock). */
static void state_reset(fake_shared_t *sh) {
  int64_t now = realtime_ns();
  if (now < sh->last_now_ns) now = sh->last_now_ns;
  sh->last_now_ns = now;
  sh->reset_ns = now;
  sh->ndev = env_devices(1u);
  sh->permission = 1;
  sh->debug_holder_pid = 0;
  sh->lag_ns = clamp_lag_ns(env_double("FAKE_NVML_LAG_MS", 0.0));
  sh->jitter_ns = clamp_jitter_ns(env_double("FAKE_NVML_JITTER_MS", 0.0));
  sh->samples_min_count = 0;
  sh->nsteps = 0;
  memset(sh->rt_step, 0, sizeof sh->rt_step);
  memset(sh->fail_code, 0, sizeof sh->fail_code);
  memset(sh->fail_left, 0, sizeof sh->fail_left);
  memset(sh->latency_us, 0, sizeof sh->latency_us);
  memset(sh->calls, 0, sizeof sh->calls);
  memset(sh->sym_calls, 0, sizeof sh->sym_calls);
  memset(sh->field_fail, 0, sizeof sh->field_fail);
  for (unsigned i = 0; i < FAKE_MAX_DEV; ++i) dev_reset(&sh->dev[i], i, now);
}

static fake_shared_t *map_state(const char *path) {
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return NULL;
  if (flock(fd, LOCK_EX) != 0) {
    close(fd);
    return NULL;
  }
  struct stat st;
  if (fstat(fd, &st) != 0) goto fail;
  if ((uint64_t)st.st_size != sizeof(fake_shared_t)) {
    /* new, or another layout: start from zeros */
    if (ftruncate(fd, 0) != 0 || ftruncate(fd, (off_t)sizeof(fake_shared_t)) != 0) goto fail;
  }
  {
    void *p = mmap(NULL, sizeof(fake_shared_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) goto fail;
    fake_shared_t *sh = (fake_shared_t *)p;
    if (__atomic_load_n(&sh->magic, __ATOMIC_ACQUIRE) != FAKE_MAGIC ||
        sh->layout_version != FAKE_LAYOUT_VERSION || sh->size != sizeof(fake_shared_t)) {
      pthread_mutexattr_t at;
      pthread_mutexattr_init(&at);
      pthread_mutexattr_setpshared(&at, PTHREAD_PROCESS_SHARED);
      pthread_mutexattr_setrobust(&at, PTHREAD_MUTEX_ROBUST);
      pthread_mutex_init(&sh->mu, &at);
      pthread_mutexattr_destroy(&at);
      sh->last_now_ns = 0;
      state_reset(sh);
      sh->layout_version = FAKE_LAYOUT_VERSION;
      sh->size = sizeof(fake_shared_t);
      __atomic_store_n(&sh->magic, FAKE_MAGIC, __ATOMIC_RELEASE);
    }
    flock(fd, LOCK_UN);
    close(fd);
    return sh;
  }
fail:
  flock(fd, LOCK_UN);
  close(fd);
  return NULL;
}

/* Take the process map lock (shared) with g_sh mapping the file FAKE_NVML_STATE names now. */
static fake_shared_t *map_acquire(void) {
  char want[sizeof g_sh_path];
  state_path(want, sizeof want);
  pthread_rwlock_rdlock(&g_map_lock);
  if (g_sh && strcmp(g_sh_path, want) == 0) return g_sh;
  pthread_rwlock_unlock(&g_map_lock);

  pthread_rwlock_wrlock(&g_map_lock);
  if (!(g_sh && strcmp(g_sh_path, want) == 0)) {
    fake_shared_t *sh = map_state(want);
    if (sh) {
      if (g_sh) munmap(g_sh, sizeof(fake_shared_t)); /* no reader can hold it: we are the writer */
      g_sh = sh;
      snprintf(g_sh_path, sizeof g_sh_path, "%s", want);
    } else if (!g_warned) {
      g_warned = 1;
      fprintf(stderr, "fake_nvml: cannot create/map state file %s: %s\n", want, strerror(errno));
    }
  }
  pthread_rwlock_unlock(&g_map_lock);
  pthread_rwlock_rdlock(&g_map_lock);
  if (g_sh) return g_sh;
  pthread_rwlock_unlock(&g_map_lock);
  return NULL;
}
static void map_release(void) { pthread_rwlock_unlock(&g_map_lock); }

static int sh_lock(fake_shared_t *sh) {
  int rc = pthread_mutex_lock(&sh->mu);
  if (rc == EOWNERDEAD) { /* a process died holding it: the state is still usable */
    pthread_mutex_consistent(&sh->mu);
    __atomic_store_n(&sh->debug_holder_pid, 0, __ATOMIC_RELEASE);
    rc = 0;
  }
  return rc;
}
static int64_t sh_now(fake_shared_t *sh) {
  int64_t now = realtime_ns();
  if (now < sh->last_now_ns) now = sh->last_now_ns;
  sh->last_now_ns = now;
  return now;
}

/* Both locks held, or an error code. Used by the control functions. */
static fake_shared_t *ctl_enter(int64_t *now) {
  fake_shared_t *sh = map_acquire();
  if (!sh) return NULL;
  if (sh_lock(sh) != 0) {
    map_release();
    return NULL;
  }
  if (now) *now = sh_now(sh);
  return sh;
}
static void ctl_leave(fake_shared_t *sh) {
  pthread_mutex_unlock(&sh->mu);
  map_release();
}

/* ------------------------------------------------------------------------------------------ */
/* NVML entry/exit: counting, failure injection, init check, latency                           */
/* ------------------------------------------------------------------------------------------ */
typedef struct {
  fake_shared_t *sh;
  int64_t now;
  int fn;
  uint32_t latency_us;
} fake_ctx_t;

static void api_leave(fake_ctx_t *c) {
  uint32_t lat = c->latency_us;
  ctl_leave(c->sh);
  if (lat) sleep_us(lat);
}

static nvmlReturn_t api_enter(fake_ctx_t *c, int sym, int need_init) {
  c->fn = g_sym_fn[sym];
  c->sh = ctl_enter(&c->now);
  if (!c->sh) return NVML_ERROR_UNKNOWN;
  fake_shared_t *sh = c->sh;
  c->latency_us = sh->latency_us[c->fn];
  sh->calls[c->fn]++;
  sh->sym_calls[sym]++;
  if (sh->fail_left[c->fn] != 0 && sh->fail_code[c->fn] != 0) {
    nvmlReturn_t r = sh->fail_code[c->fn];
    if (sh->fail_left[c->fn] > 0) sh->fail_left[c->fn]--;
    api_leave(c);
    return r;
  }
  if (need_init && __atomic_load_n(&g_refcount, __ATOMIC_ACQUIRE) <= 0) {
    api_leave(c);
    return NVML_ERROR_UNINITIALIZED;
  }
  return NVML_SUCCESS;
}

#define ENTER(sym, need_init)                          \
  fake_ctx_t ctx;                                      \
  {                                                    \
    nvmlReturn_t enter_r = api_enter(&ctx, sym, need_init); \
    if (enter_r != NVML_SUCCESS) return enter_r;       \
  }
#define LEAVE(r)      \
  do {                \
    api_leave(&ctx);  \
    return (r);       \
  } while (0)

static fake_dev_t *dev_of(const fake_ctx_t *c, nvmlDevice_t h) {
  if (!h) return NULL;
  ptrdiff_t i = h - g_handles;
  if (i < 0 || i >= (ptrdiff_t)dev_count(c->sh)) return NULL;
  return &c->sh->dev[i];
}
#define GET_DEV(h)                                    \
  fake_dev_t *d = dev_of(&ctx, h);                    \
  if (!d) LEAVE(NVML_ERROR_INVALID_ARGUMENT);

/* ------------------------------------------------------------------------------------------ */
/* NVML: init, system                                                                          */
/* ------------------------------------------------------------------------------------------ */
static nvmlReturn_t do_init(int sym) {
  ENTER(sym, 0);
  __atomic_add_fetch(&g_refcount, 1, __ATOMIC_ACQ_REL);
  LEAVE(NVML_SUCCESS);
}
#ifndef FAKE_NVML_MINIMAL
FAKE_API nvmlReturn_t nvmlInit_v2(void) { return do_init(SYM_nvmlInit_v2); }
#endif
FAKE_API nvmlReturn_t nvmlInit(void) { return do_init(SYM_nvmlInit); }

FAKE_API nvmlReturn_t nvmlShutdown(void) {
  ENTER(SYM_nvmlShutdown, 0);
  int cur = __atomic_load_n(&g_refcount, __ATOMIC_ACQUIRE);
  while (cur > 0 &&
         !__atomic_compare_exchange_n(&g_refcount, &cur, cur - 1, 0, __ATOMIC_ACQ_REL,
                                      __ATOMIC_ACQUIRE)) {
  }
  LEAVE(cur > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED);
}

FAKE_API const char *nvmlErrorString(nvmlReturn_t result) {
  fake_shared_t *sh = ctl_enter(NULL); /* count the call if the state is reachable */
  if (sh) {
    sh->calls[FN_ErrorString]++;
    sh->sym_calls[SYM_nvmlErrorString]++;
    ctl_leave(sh);
  }
  switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt request issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Ran out of critical resources, other than memory";
    case NVML_ERROR_FREQ_NOT_SUPPORTED: return "The requested frequency is not supported";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "The provided version is invalid/unsupported";
    case NVML_ERROR_DEPRECATED: return "The requested functionality has been deprecated";
    case NVML_ERROR_NOT_READY: return "The system is not ready for the request";
    case NVML_ERROR_GPU_NOT_FOUND: return "No GPUs were found";
    case NVML_ERROR_INVALID_STATE: return "Resource not in correct state to perform requested operation";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Unknown Error";
  }
}

FAKE_API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
  ENTER(SYM_nvmlSystemGetDriverVersion, 1);
  LEAVE(copy_str(version, length, FAKE_DRIVER_VERSION));
}

FAKE_API nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
  ENTER(SYM_nvmlSystemGetNVMLVersion, 1);
  LEAVE(copy_str(version, length, FAKE_NVML_VERSION));
}

static nvmlReturn_t do_get_count(unsigned int *count, int sym) {
  ENTER(sym, 1);
  if (!count) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  *count = dev_count(ctx.sh);
  LEAVE(NVML_SUCCESS);
}
#ifndef FAKE_NVML_MINIMAL
FAKE_API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
  return do_get_count(count, SYM_nvmlDeviceGetCount_v2);
}
#endif
FAKE_API nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) {
  return do_get_count(count, SYM_nvmlDeviceGetCount);
}

static nvmlReturn_t do_get_handle(unsigned int index, nvmlDevice_t *device, int sym) {
  ENTER(sym, 1);
  if (!device || index >= dev_count(ctx.sh)) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  *device = &g_handles[index];
  LEAVE(NVML_SUCCESS);
}
#ifndef FAKE_NVML_MINIMAL
FAKE_API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
  return do_get_handle(index, device, SYM_nvmlDeviceGetHandleByIndex_v2);
}
#endif
FAKE_API nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
  return do_get_handle(index, device, SYM_nvmlDeviceGetHandleByIndex);
}

/* ------------------------------------------------------------------------------------------ */
/* NVML: identity                                                                              */
/* ------------------------------------------------------------------------------------------ */
#ifndef FAKE_NVML_NO_REQUIRED
FAKE_API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
  ENTER(SYM_nvmlDeviceGetName, 1);
  GET_DEV(device);
  (void)d;
  char buf[96];
  device_name(device->index, buf, sizeof buf);
  LEAVE(copy_str(name, length, buf));
}
#endif

FAKE_API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
  ENTER(SYM_nvmlDeviceGetUUID, 1);
  GET_DEV(device);
  (void)d;
  char buf[96];
  /* valid hex, like a real UUID: fake_cuda.c reports the same 16 bytes (fa 4e 00 .. 00 0i) */
  snprintf(buf, sizeof buf, "GPU-fa4e0000-0000-0000-0000-%012x", device->index);
  LEAVE(copy_str(uuid, length, buf));
}

static unsigned pci_bus(unsigned index) { return 0x18u + 0x10u * index; }

static nvmlReturn_t do_pci(nvmlDevice_t device, nvmlPciInfo_t *pci, int sym) {
  ENTER(sym, 1);
  GET_DEV(device);
  (void)d;
  if (!pci) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  memset(pci, 0, sizeof *pci);
  pci->domain = 0;
  pci->bus = pci_bus(device->index);
  pci->device = 0;
  pci->pciDeviceId = 0x233010DEu;    /* H100 SXM5 80GB */
  pci->pciSubSystemId = 0x16C110DEu;
  snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
  snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
  LEAVE(NVML_SUCCESS);
}
#ifndef FAKE_NVML_MINIMAL
FAKE_API nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
  return do_pci(device, pci, SYM_nvmlDeviceGetPciInfo_v3);
}
#endif
FAKE_API nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci) {
  return do_pci(device, pci, SYM_nvmlDeviceGetPciInfo_v2);
}

FAKE_API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
  ENTER(SYM_nvmlDeviceGetMemoryInfo, 1);
  GET_DEV(device);
  if (!memory) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  unsigned long long used = FAKE_MEM_RESERVED + (unsigned long long)d->nproc * FAKE_MEM_PER_PROC;
  if (used > FAKE_MEM_TOTAL) used = FAKE_MEM_TOTAL;
  memory->total = FAKE_MEM_TOTAL;
  memory->used = used;
  memory->free = FAKE_MEM_TOTAL - used;
  LEAVE(NVML_SUCCESS);
}

/* ------------------------------------------------------------------------------------------ */
/* NVML: power and energy                                                                      */
/* ------------------------------------------------------------------------------------------ */
FAKE_API nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power) {
  ENTER(SYM_nvmlDeviceGetPowerUsage, 1);
  GET_DEV(device);
  if (!power) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  *power = (unsigned)llround(average_w(ctx.sh, d, ctx.now) * 1000.0);
  LEAVE(NVML_SUCCESS);
}

#ifndef FAKE_NVML_MINIMAL
FAKE_API nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device,
                                                          unsigned long long *energy) {
  ENTER(SYM_nvmlDeviceGetTotalEnergyConsumption, 1);
  GET_DEV(device);
  if (!energy) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  int64_t t = ctx.now; /* the counter changes only on its grid (anchored at the reset) */
  if (d->counter_period_ns > 0)
    t = d->grid100_ns + floor_div(ctx.now - d->grid100_ns, d->counter_period_ns) * d->counter_period_ns;
  *energy = (unsigned long long)floor(energy_at(d, t) * 1000.0);
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetSamples(nvmlDevice_t device, nvmlSamplingType_t type,
                                           unsigned long long lastSeenTimeStamp,
                                           nvmlValueType_t *sampleValType,
                                           unsigned int *sampleCount, nvmlSample_t *samples) {
  ENTER(SYM_nvmlDeviceGetSamples, 1);
  GET_DEV(device);
  if (!sampleCount || !sampleValType) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  if ((int)type != (int)NVML_TOTAL_POWER_SAMPLES) LEAVE(NVML_ERROR_NOT_SUPPORTED);
  unsigned long long ts[FAKE_BUF_SAMPLES];
  unsigned mw[FAKE_BUF_SAMPLES];
  unsigned n = collect_samples(ctx.sh, d, ctx.now, ts, mw);
  /* The new ones (stamp > lastSeen), oldest first. Without a realtime step they are the newest
   * n_new; after one, any subset. */
  unsigned pick[FAKE_BUF_SAMPLES], n_new = 0;
  for (unsigned i = n; i-- > 0;)
    if (ts[i] > lastSeenTimeStamp) pick[n_new++] = i;
  if (n_new == 0) {
    *sampleCount = 0;
    LEAVE(NVML_ERROR_NOT_FOUND);
  }
  *sampleValType = NVML_VALUE_TYPE_UNSIGNED_INT;
  const unsigned need = n_new > ctx.sh->samples_min_count ? n_new : ctx.sh->samples_min_count;
  if (!samples) { /* size query */
    *sampleCount = need;
    LEAVE(NVML_SUCCESS);
  }
  unsigned cap = *sampleCount;
  if (cap == 0 || cap < ctx.sh->samples_min_count) {
    *sampleCount = need;
    LEAVE(NVML_ERROR_INSUFFICIENT_SIZE);
  }
  unsigned m = cap < n_new ? cap : n_new; /* the oldest m, so draining by timestamp loses none */
  for (unsigned i = 0; i < m; ++i) {
    samples[i].timeStamp = ts[pick[i]];
    samples[i].sampleValue.ullVal = 0;
    samples[i].sampleValue.uiVal = mw[pick[i]];
  }
  *sampleCount = m;
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int valuesCount,
                                               nvmlFieldValue_t *values) {
  ENTER(SYM_nvmlDeviceGetFieldValues, 1);
  GET_DEV(device);
  if (!values || valuesCount <= 0) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  fake_shared_t *sh = ctx.sh;
  for (int i = 0; i < valuesCount; ++i) {
    nvmlFieldValue_t *v = &values[i];
    v->timestamp = (long long)((ctx.now + rt_offset_at(sh, ctx.now)) / 1000);
    v->latencyUsec = 0;
    v->value.ullVal = 0;
    nvmlReturn_t injected = NVML_SUCCESS;
    for (int k = 0; k < FAKE_MAX_FIELD_FAILS; ++k) {
      fake_field_fail_t *f = &sh->field_fail[k];
      if (f->left != 0 && f->code != 0 && f->field_id == v->fieldId) {
        injected = f->code;
        if (f->left > 0) f->left--;
        break;
      }
    }
    if (injected != NVML_SUCCESS) {
      v->nvmlReturn = injected;
      continue;
    }
    if (v->fieldId == NVML_FI_DEV_POWER_INSTANT) {
      v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
      v->value.uiVal = (unsigned)llround(instant_w(sh, d, ctx.now) * 1000.0);
      v->nvmlReturn = NVML_SUCCESS;
    } else if (v->fieldId == NVML_FI_DEV_POWER_AVERAGE) {
      v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
      v->value.uiVal = (unsigned)llround(average_w(sh, d, ctx.now) * 1000.0);
      v->nvmlReturn = NVML_SUCCESS;
    } else {
      v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
    }
  }
  LEAVE(NVML_SUCCESS);
}
#endif /* !FAKE_NVML_MINIMAL */

/* ------------------------------------------------------------------------------------------ */
/* NVML: clocks, temperature, limits, processes                                                */
/* ------------------------------------------------------------------------------------------ */
static unsigned mem_clock_now(const fake_dev_t *d) {
  return d->mem_locked_max ? d->mem_locked_max : d->app_mem;
}

FAKE_API nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, nvmlClockType_t type,
                                             unsigned int *clock) {
  ENTER(SYM_nvmlDeviceGetClockInfo, 1);
  GET_DEV(device);
  if (!clock) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  switch ((int)type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM: *clock = seg_at(d, ctx.now)->f_mhz; break;
    case NVML_CLOCK_MEM: *clock = mem_clock_now(d); break;
    default: LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  }
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetApplicationsClock(nvmlDevice_t device, nvmlClockType_t clockType,
                                                     unsigned int *clockMHz) {
  ENTER(SYM_nvmlDeviceGetApplicationsClock, 1);
  GET_DEV(device);
  if (!clockMHz) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  switch ((int)clockType) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM: *clockMHz = d->app_gr; break;
    case NVML_CLOCK_MEM: *clockMHz = d->app_mem; break;
    default: LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  }
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetSupportedMemoryClocks(nvmlDevice_t device, unsigned int *count,
                                                         unsigned int *clocksMHz) {
  ENTER(SYM_nvmlDeviceGetSupportedMemoryClocks, 1);
  GET_DEV(device);
  (void)d;
  if (!count) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  if (*count < 2 || !clocksMHz) {
    nvmlReturn_t r = *count < 2 ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_ERROR_INVALID_ARGUMENT;
    *count = 2;
    LEAVE(r);
  }
  clocksMHz[0] = FAKE_MEM_HI;
  clocksMHz[1] = FAKE_MEM_LO;
  *count = 2;
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetSupportedGraphicsClocks(nvmlDevice_t device,
                                                           unsigned int memoryClockMHz,
                                                           unsigned int *count,
                                                           unsigned int *clocksMHz) {
  ENTER(SYM_nvmlDeviceGetSupportedGraphicsClocks, 1);
  GET_DEV(device);
  (void)d;
  if (!count) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  if (!mem_in_table(memoryClockMHz)) LEAVE(NVML_ERROR_NOT_FOUND);
  unsigned hi = memoryClockMHz == FAKE_MEM_LO ? FAKE_GR_LO_MAX : FAKE_F_MAX;
  unsigned n = memoryClockMHz == FAKE_MEM_LO ? FAKE_N_GR_LO : FAKE_N_GR_HI;
  if (*count < n || !clocksMHz) {
    nvmlReturn_t r = *count < n ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_ERROR_INVALID_ARGUMENT;
    *count = n;
    LEAVE(r);
  }
  for (unsigned i = 0; i < n; ++i) clocksMHz[i] = hi - i * FAKE_F_STEP; /* descending, as NVML */
  *count = n;
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device,
                                               nvmlTemperatureSensors_t sensorType,
                                               unsigned int *temp) {
  ENTER(SYM_nvmlDeviceGetTemperature, 1);
  GET_DEV(device);
  if (!temp) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  if ((int)sensorType != (int)NVML_TEMPERATURE_GPU) LEAVE(NVML_ERROR_NOT_SUPPORTED);
  double load = average_w(ctx.sh, d, ctx.now) / 700.0;
  if (!(load > 0)) load = 0;
  if (load > 1) load = 1;
  *temp = (unsigned)lround(40.0 + 30.0 * load);
  LEAVE(NVML_SUCCESS);
}

static nvmlReturn_t do_reasons(nvmlDevice_t device, unsigned long long *reasons, int sym) {
  ENTER(sym, 1);
  GET_DEV(device);
  if (!reasons) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  *reasons = seg_at(d, ctx.now)->capped ? FAKE_REASON_SW_POWER_CAP : 0ULL;
  LEAVE(NVML_SUCCESS);
}
#ifndef FAKE_NVML_MINIMAL
FAKE_API nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                             unsigned long long *reasons) {
  return do_reasons(device, reasons, SYM_nvmlDeviceGetCurrentClocksEventReasons);
}
#endif
FAKE_API nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                                unsigned long long *reasons) {
  return do_reasons(device, reasons, SYM_nvmlDeviceGetCurrentClocksThrottleReasons);
}

FAKE_API nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit) {
  ENTER(SYM_nvmlDeviceGetPowerManagementLimit, 1);
  GET_DEV(device);
  if (!limit) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  *limit = d->limit_mw;
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device,
                                                               unsigned int *defaultLimit) {
  ENTER(SYM_nvmlDeviceGetPowerManagementDefaultLimit, 1);
  GET_DEV(device);
  (void)d;
  if (!defaultLimit) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  *defaultLimit = FAKE_LIMIT_DEFAULT_MW;
  LEAVE(NVML_SUCCESS);
}

FAKE_API nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(nvmlDevice_t device,
                                                                   unsigned int *minLimit,
                                                                   unsigned int *maxLimit) {
  ENTER(SYM_nvmlDeviceGetPowerManagementLimitConstraints, 1);
  GET_DEV(device);
  (void)d;
  if (!minLimit || !maxLimit) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  *minLimit = FAKE_LIMIT_MIN_MW;
  *maxLimit = FAKE_LIMIT_MAX_MW;
  LEAVE(NVML_SUCCESS);
}

static nvmlReturn_t do_processes(nvmlDevice_t device, unsigned int *infoCount,
                                 nvmlProcessInfo_t *infos, int sym) {
  ENTER(sym, 1);
  GET_DEV(device);
  if (!infoCount) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  unsigned n = d->nproc;
  if (*infoCount < n || (n > 0 && !infos)) {
    *infoCount = n;
    LEAVE(NVML_ERROR_INSUFFICIENT_SIZE);
  }
  for (unsigned i = 0; i < n; ++i) {
    memset(&infos[i], 0, sizeof infos[i]);
    infos[i].pid = d->pids[i];
    infos[i].usedGpuMemory = FAKE_MEM_PER_PROC;
    infos[i].gpuInstanceId = 0xFFFFFFFFu; /* NVML_VALUE_NOT_AVAILABLE: no MIG */
    infos[i].computeInstanceId = 0xFFFFFFFFu;
  }
  *infoCount = n;
  LEAVE(NVML_SUCCESS);
}
#ifndef FAKE_NVML_MINIMAL
FAKE_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                              unsigned int *infoCount,
                                                              nvmlProcessInfo_t *infos) {
  return do_processes(device, infoCount, infos, SYM_nvmlDeviceGetComputeRunningProcesses_v3);
}
#endif
FAKE_API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device,
                                                              unsigned int *infoCount,
                                                              nvmlProcessInfo_t *infos) {
  return do_processes(device, infoCount, infos, SYM_nvmlDeviceGetComputeRunningProcesses_v2);
}

/* ------------------------------------------------------------------------------------------ */
/* NVML: setters (validated against the tables, subject to the permission switch)              */
/* ------------------------------------------------------------------------------------------ */
#define CHECK_PERMISSION() \
  if (!ctx.sh->permission) LEAVE(NVML_ERROR_NO_PERMISSION);

FAKE_API nvmlReturn_t nvmlDeviceSetGpuLockedClocks(nvmlDevice_t device, unsigned int minGpuClockMHz,
                                                   unsigned int maxGpuClockMHz) {
  ENTER(SYM_nvmlDeviceSetGpuLockedClocks, 1);
  GET_DEV(device);
  /* Real NVML accepts any range and clamps; the emulator is strict so tests catch bad values. */
  if (!gr_in_table(FAKE_MEM_HI, minGpuClockMHz) || !gr_in_table(FAKE_MEM_HI, maxGpuClockMHz) ||
      minGpuClockMHz > maxGpuClockMHz)
    LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  CHECK_PERMISSION();
  d->locked_min = minGpuClockMHz;
  d->locked_max = maxGpuClockMHz;
  LEAVE(apply_settings(d, ctx.now));
}

FAKE_API nvmlReturn_t nvmlDeviceResetGpuLockedClocks(nvmlDevice_t device) {
  ENTER(SYM_nvmlDeviceResetGpuLockedClocks, 1);
  GET_DEV(device);
  CHECK_PERMISSION();
  d->locked_min = d->locked_max = 0;
  LEAVE(apply_settings(d, ctx.now));
}

FAKE_API nvmlReturn_t nvmlDeviceSetMemoryLockedClocks(nvmlDevice_t device,
                                                      unsigned int minMemClockMHz,
                                                      unsigned int maxMemClockMHz) {
  ENTER(SYM_nvmlDeviceSetMemoryLockedClocks, 1);
  GET_DEV(device);
  if (!mem_in_table(minMemClockMHz) || !mem_in_table(maxMemClockMHz) ||
      minMemClockMHz > maxMemClockMHz)
    LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  CHECK_PERMISSION();
  d->mem_locked_min = minMemClockMHz;
  d->mem_locked_max = maxMemClockMHz;
  LEAVE(apply_settings(d, ctx.now));
}

FAKE_API nvmlReturn_t nvmlDeviceResetMemoryLockedClocks(nvmlDevice_t device) {
  ENTER(SYM_nvmlDeviceResetMemoryLockedClocks, 1);
  GET_DEV(device);
  CHECK_PERMISSION();
  d->mem_locked_min = d->mem_locked_max = 0;
  LEAVE(apply_settings(d, ctx.now));
}

FAKE_API nvmlReturn_t nvmlDeviceSetApplicationsClocks(nvmlDevice_t device, unsigned int memClockMHz,
                                                      unsigned int graphicsClockMHz) {
  ENTER(SYM_nvmlDeviceSetApplicationsClocks, 1);
  GET_DEV(device);
  if (!mem_in_table(memClockMHz) || !gr_in_table(memClockMHz, graphicsClockMHz))
    LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  CHECK_PERMISSION();
  d->app_mem = memClockMHz;
  d->app_gr = graphicsClockMHz;
  LEAVE(apply_settings(d, ctx.now));
}

FAKE_API nvmlReturn_t nvmlDeviceResetApplicationsClocks(nvmlDevice_t device) {
  ENTER(SYM_nvmlDeviceResetApplicationsClocks, 1);
  GET_DEV(device);
  CHECK_PERMISSION();
  d->app_mem = FAKE_MEM_HI;
  d->app_gr = FAKE_F_MAX;
  LEAVE(apply_settings(d, ctx.now));
}

FAKE_API nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit) {
  ENTER(SYM_nvmlDeviceSetPowerManagementLimit, 1);
  GET_DEV(device);
  if (limit < FAKE_LIMIT_MIN_MW || limit > FAKE_LIMIT_MAX_MW) LEAVE(NVML_ERROR_INVALID_ARGUMENT);
  CHECK_PERMISSION();
  d->limit_mw = limit;
  LEAVE(apply_settings(d, ctx.now));
}

/* ------------------------------------------------------------------------------------------ */
/* Control functions (tests call these through ctypes)                                         */
/* ------------------------------------------------------------------------------------------ */
#define CTL_ENTER(now_var)                           \
  int64_t now_var = 0;                               \
  fake_shared_t *sh = ctl_enter(&now_var);           \
  if (!sh) return NVML_ERROR_UNKNOWN;                \
  (void)now_var;
#define CTL_DEV(dev)                                 \
  if ((dev) >= dev_count(sh)) {                         \
    ctl_leave(sh);                                   \
    return NVML_ERROR_INVALID_ARGUMENT;              \
  }                                                  \
  fake_dev_t *d = &sh->dev[dev];

FAKE_API int fake_nvml_reset(void) {
  CTL_ENTER(now);
  state_reset(sh);
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_device_count(void) {
  CTL_ENTER(now);
  int n = (int)dev_count(sh);
  ctl_leave(sh);
  return n;
}

FAKE_API int fake_nvml_set_power_w(unsigned dev, double watts) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  double t0 = 0.0;
  int r = set_base(d, now, &t0, &watts, 1, 0);
  ctl_leave(sh);
  return r;
}

FAKE_API int fake_nvml_set_trace(unsigned dev, const double *t_s, const double *watts, unsigned n) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  int r = set_base(d, now, t_s, watts, n, 1);
  ctl_leave(sh);
  return r;
}

FAKE_API double fake_nvml_trace_start_s(unsigned dev) {
  fake_shared_t *sh = ctl_enter(NULL);
  if (!sh) return NAN;
  double r = dev < dev_count(sh) ? (double)sh->dev[dev].trace_start_ns * 1e-9 : NAN;
  ctl_leave(sh);
  return r;
}

FAKE_API int fake_nvml_set_idle_w(unsigned dev, double watts) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  int r = NVML_ERROR_INVALID_ARGUMENT;
  if (isfinite(watts) && watts >= 0 && watts <= 1e4) {
    d->idle_w = watts;
    r = apply_settings(d, now);
  }
  ctl_leave(sh);
  return r;
}

FAKE_API int fake_nvml_fail(const char *nvml_function, int nvml_return, int count) {
  int fn = resolve_fn(nvml_function);
  if (fn < 0) return NVML_ERROR_NOT_FOUND;
  CTL_ENTER(now);
  if (count == 0 || nvml_return == 0) {
    sh->fail_code[fn] = 0;
    sh->fail_left[fn] = 0;
  } else {
    sh->fail_code[fn] = nvml_return;
    sh->fail_left[fn] = count < 0 ? -1 : count;
  }
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_fail_field(unsigned field_id, int nvml_return, int count) {
  CTL_ENTER(now);
  int r = NVML_ERROR_INSUFFICIENT_SIZE, slot = -1;
  for (int k = 0; k < FAKE_MAX_FIELD_FAILS; ++k)
    if (sh->field_fail[k].field_id == field_id && sh->field_fail[k].left != 0) slot = k;
  if (slot < 0)
    for (int k = 0; k < FAKE_MAX_FIELD_FAILS && slot < 0; ++k)
      if (sh->field_fail[k].left == 0) slot = k;
  if (slot >= 0) {
    fake_field_fail_t *f = &sh->field_fail[slot];
    f->field_id = field_id;
    f->code = nvml_return;
    f->left = (count == 0 || nvml_return == 0) ? 0 : (count < 0 ? -1 : count);
    r = 0;
  }
  ctl_leave(sh);
  return r;
}

FAKE_API int fake_nvml_clear_failures(void) {
  CTL_ENTER(now);
  memset(sh->fail_code, 0, sizeof sh->fail_code);
  memset(sh->fail_left, 0, sizeof sh->fail_left);
  memset(sh->field_fail, 0, sizeof sh->field_fail);
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_set_latency_us(const char *nvml_function, unsigned us) {
  int fn = resolve_fn(nvml_function);
  if (fn < 0) return NVML_ERROR_NOT_FOUND;
  CTL_ENTER(now);
  sh->latency_us[fn] = us > 10000000u ? 10000000u : us;
  ctl_leave(sh);
  return 0;
}

FAKE_API long fake_nvml_call_count(const char *fn_name) {
  int fn = resolve_fn(fn_name);
  if (fn < 0) return -1;
  fake_shared_t *sh = ctl_enter(NULL);
  if (!sh) return -1;
  long n = (long)sh->calls[fn];
  ctl_leave(sh);
  return n;
}

FAKE_API long fake_nvml_call_count_exact(const char *symbol) {
  int sym = -1;
  for (int i = 0; i < SYM_COUNT && symbol; ++i)
    if (strcmp(symbol, g_sym_names[i]) == 0) sym = i;
  if (sym < 0) return -1;
  fake_shared_t *sh = ctl_enter(NULL);
  if (!sh) return -1;
  long n = (long)sh->sym_calls[sym];
  ctl_leave(sh);
  return n;
}

FAKE_API int fake_nvml_set_permission(int allowed) {
  CTL_ENTER(now);
  sh->permission = allowed ? 1 : 0;
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_set_lag_ms(double ms) {
  CTL_ENTER(now);
  sh->lag_ns = clamp_lag_ns(ms);
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_set_jitter_ms(double ms) {
  CTL_ENTER(now);
  sh->jitter_ns = clamp_jitter_ns(ms);
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_set_buffer_gain(unsigned dev, double gain) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  int r = NVML_ERROR_INVALID_ARGUMENT;
  if (gain_ok(gain)) {
    d->buffer_gain = gain;
    r = apply_settings(d, now); /* a segment at now: older samples keep their gain */
  }
  ctl_leave(sh);
  return r;
}

FAKE_API int fake_nvml_set_counter_period_ms(unsigned dev, unsigned ms) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  int r = NVML_ERROR_INVALID_ARGUMENT;
  if (ms <= FAKE_MAX_COUNTER_PERIOD_MS) {
    d->counter_period_ns = (int64_t)ms * 1000000LL;
    r = 0;
  }
  ctl_leave(sh);
  return r;
}

FAKE_API int fake_nvml_set_samples_min_count(unsigned count) {
  if (count > FAKE_MAX_MIN_COUNT) return NVML_ERROR_INVALID_ARGUMENT;
  CTL_ENTER(now);
  sh->samples_min_count = count;
  ctl_leave(sh);
  return 0;
}

/* The driver's CLOCK_REALTIME is offset_us off the model's from now on, as after a step of the
 * host clock: stamps of samples taken from now on, and field timestamps, carry the offset;
 * samples already taken keep theirs. The model (energy_between, power_at) stays unstepped. */
FAKE_API int fake_nvml_set_realtime_offset_us(long long offset_us) {
  if (offset_us < -86400000000LL || offset_us > 86400000000LL) return NVML_ERROR_INVALID_ARGUMENT;
  CTL_ENTER(now);
  if (sh->nsteps == FAKE_MAX_RT_STEPS) { /* forget the oldest step */
    memmove(&sh->rt_step[0], &sh->rt_step[1], (FAKE_MAX_RT_STEPS - 1) * sizeof sh->rt_step[0]);
    sh->nsteps--;
  }
  sh->rt_step[sh->nsteps].t_ns = now;
  sh->rt_step[sh->nsteps].offset_ns = (int64_t)offset_us * 1000;
  sh->nsteps++;
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_get_locked_clocks(unsigned dev, unsigned *min_mhz, unsigned *max_mhz) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  if (min_mhz) *min_mhz = d->locked_min;
  if (max_mhz) *max_mhz = d->locked_max;
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_get_mem_locked_clocks(unsigned dev, unsigned *min_mhz, unsigned *max_mhz) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  if (min_mhz) *min_mhz = d->mem_locked_min;
  if (max_mhz) *max_mhz = d->mem_locked_max;
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_get_app_clocks(unsigned dev, unsigned *mem_mhz, unsigned *sm_mhz) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  if (mem_mhz) *mem_mhz = d->app_mem;
  if (sm_mhz) *sm_mhz = d->app_gr;
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_get_power_limit_mw(unsigned dev, unsigned *mw) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  if (mw) *mw = d->limit_mw;
  ctl_leave(sh);
  return 0;
}

FAKE_API int fake_nvml_set_processes(unsigned dev, unsigned n, const unsigned *pids) {
  CTL_ENTER(now);
  CTL_DEV(dev);
  int r = NVML_ERROR_INVALID_ARGUMENT;
  if (n <= FAKE_MAX_PROCS && (n == 0 || pids)) {
    for (unsigned i = 0; i < n; ++i) d->pids[i] = pids[i];
    d->nproc = n;
    r = 0;
  }
  ctl_leave(sh);
  return r;
}

FAKE_API double fake_nvml_energy_between(unsigned dev, double t0_realtime_s, double t1_realtime_s) {
  if (!isfinite(t0_realtime_s) || !isfinite(t1_realtime_s)) return NAN;
  fake_shared_t *sh = ctl_enter(NULL);
  if (!sh) return NAN;
  double r = NAN;
  if (dev < dev_count(sh)) {
    const fake_dev_t *d = &sh->dev[dev];
    r = energy_at(d, (int64_t)llround(t1_realtime_s * 1e9)) -
        energy_at(d, (int64_t)llround(t0_realtime_s * 1e9));
  }
  ctl_leave(sh);
  return r;
}

FAKE_API double fake_nvml_power_at(unsigned dev, double t_realtime_s) {
  if (!isfinite(t_realtime_s)) return NAN;
  fake_shared_t *sh = ctl_enter(NULL);
  if (!sh) return NAN;
  double r = dev < dev_count(sh) ? power_at(&sh->dev[dev], (int64_t)llround(t_realtime_s * 1e9)) : NAN;
  ctl_leave(sh);
  return r;
}

FAKE_API int fake_nvml_refcount(void) { return __atomic_load_n(&g_refcount, __ATOMIC_ACQUIRE); }

FAKE_API const char *fake_nvml_state_path(void) {
  fake_shared_t *sh = map_acquire();
  if (!sh) return "";
  map_release();
  return g_sh_path; /* stable until FAKE_NVML_STATE changes */
}

/* Test-only: hold the shared lock for `seconds` (a child killed meanwhile tests robustness). */
FAKE_API int fake_nvml_debug_hold_lock(double seconds) {
  CTL_ENTER(now);
  __atomic_store_n(&sh->debug_holder_pid, (int32_t)getpid(), __ATOMIC_RELEASE);
  if (seconds > 0 && seconds < 60) sleep_us((uint64_t)(seconds * 1e6));
  __atomic_store_n(&sh->debug_holder_pid, 0, __ATOMIC_RELEASE);
  ctl_leave(sh);
  return 0;
}

/* Test-only: pid inside fake_nvml_debug_hold_lock now (read without taking the mutex). */
FAKE_API int fake_nvml_debug_lock_holder(void) {
  fake_shared_t *sh = map_acquire();
  if (!sh) return -1;
  int pid = __atomic_load_n(&sh->debug_holder_pid, __ATOMIC_ACQUIRE);
  map_release();
  return pid;
}

#ifdef __cplusplus
} /* extern "C" */
#endif

/* ------------------------------------------------------------------------------------------ */
/* Compile-time ABI check against csrc/nvml_api.h (C++ only, full variant)                     */
/* ------------------------------------------------------------------------------------------ */
#if defined(FAKE_NVML_ABI_CHECK) && !defined(FAKE_NVML_MINIMAL) && !defined(FAKE_NVML_NO_REQUIRED)
namespace fake_abi {
constexpr bool streq(const char *a, const char *b) {
  return (a == nullptr || b == nullptr) ? a == b : (*a == *b && (*a == '\0' || streq(a + 1, b + 1)));
}
#define FAKE_ABI_DECL(member, required, primary, fallback, ret, params) \
  using sig_##member = ret(*) params;                                    \
  constexpr const char *primary_##member = primary;                      \
  constexpr const char *fallback_##member = fallback;
LLM_DVFS_NVML_SYMBOLS(FAKE_ABI_DECL)
#undef FAKE_ABI_DECL

#define FAKE_ABI_ONE(member, prim)                                                         \
  static_assert(std::is_same<decltype(&prim), sig_##member>::value, #prim ": signature");  \
  static_assert(streq(primary_##member, #prim) && fallback_##member == nullptr,            \
                #member ": names");                                                         \
  constexpr int checked_##member = 1;
#define FAKE_ABI_TWO(member, prim, fb)                                                     \
  static_assert(std::is_same<decltype(&prim), sig_##member>::value, #prim ": signature");  \
  static_assert(std::is_same<decltype(&fb), sig_##member>::value, #fb ": signature");      \
  static_assert(streq(primary_##member, #prim) && streq(fallback_##member, #fb),           \
                #member ": names");                                                         \
  constexpr int checked_##member = 1;

FAKE_ABI_TWO(Init, nvmlInit_v2, nvmlInit)
FAKE_ABI_ONE(Shutdown, nvmlShutdown)
FAKE_ABI_ONE(ErrorString, nvmlErrorString)
FAKE_ABI_ONE(SystemGetDriverVersion, nvmlSystemGetDriverVersion)
FAKE_ABI_ONE(SystemGetNVMLVersion, nvmlSystemGetNVMLVersion)
FAKE_ABI_TWO(DeviceGetCount, nvmlDeviceGetCount_v2, nvmlDeviceGetCount)
FAKE_ABI_TWO(DeviceGetHandleByIndex, nvmlDeviceGetHandleByIndex_v2, nvmlDeviceGetHandleByIndex)
FAKE_ABI_ONE(DeviceGetName, nvmlDeviceGetName)
FAKE_ABI_ONE(DeviceGetUUID, nvmlDeviceGetUUID)
FAKE_ABI_TWO(DeviceGetPciInfo, nvmlDeviceGetPciInfo_v3, nvmlDeviceGetPciInfo_v2)
FAKE_ABI_ONE(DeviceGetMemoryInfo, nvmlDeviceGetMemoryInfo)
FAKE_ABI_ONE(DeviceGetPowerUsage, nvmlDeviceGetPowerUsage)
FAKE_ABI_ONE(DeviceGetTotalEnergyConsumption, nvmlDeviceGetTotalEnergyConsumption)
FAKE_ABI_ONE(DeviceGetSamples, nvmlDeviceGetSamples)
FAKE_ABI_ONE(DeviceGetFieldValues, nvmlDeviceGetFieldValues)
FAKE_ABI_ONE(DeviceGetClockInfo, nvmlDeviceGetClockInfo)
FAKE_ABI_ONE(DeviceGetApplicationsClock, nvmlDeviceGetApplicationsClock)
FAKE_ABI_ONE(DeviceGetSupportedMemoryClocks, nvmlDeviceGetSupportedMemoryClocks)
FAKE_ABI_ONE(DeviceGetSupportedGraphicsClocks, nvmlDeviceGetSupportedGraphicsClocks)
FAKE_ABI_ONE(DeviceGetTemperature, nvmlDeviceGetTemperature)
FAKE_ABI_TWO(DeviceGetCurrentClocksEventReasons, nvmlDeviceGetCurrentClocksEventReasons,
             nvmlDeviceGetCurrentClocksThrottleReasons)
FAKE_ABI_ONE(DeviceGetPowerManagementLimit, nvmlDeviceGetPowerManagementLimit)
FAKE_ABI_ONE(DeviceGetPowerManagementDefaultLimit, nvmlDeviceGetPowerManagementDefaultLimit)
FAKE_ABI_ONE(DeviceGetPowerManagementLimitConstraints,
             nvmlDeviceGetPowerManagementLimitConstraints)
FAKE_ABI_TWO(DeviceGetComputeRunningProcesses, nvmlDeviceGetComputeRunningProcesses_v3,
             nvmlDeviceGetComputeRunningProcesses_v2)
FAKE_ABI_ONE(DeviceSetGpuLockedClocks, nvmlDeviceSetGpuLockedClocks)
FAKE_ABI_ONE(DeviceResetGpuLockedClocks, nvmlDeviceResetGpuLockedClocks)
FAKE_ABI_ONE(DeviceSetMemoryLockedClocks, nvmlDeviceSetMemoryLockedClocks)
FAKE_ABI_ONE(DeviceResetMemoryLockedClocks, nvmlDeviceResetMemoryLockedClocks)
FAKE_ABI_ONE(DeviceSetApplicationsClocks, nvmlDeviceSetApplicationsClocks)
FAKE_ABI_ONE(DeviceResetApplicationsClocks, nvmlDeviceResetApplicationsClocks)
FAKE_ABI_ONE(DeviceSetPowerManagementLimit, nvmlDeviceSetPowerManagementLimit)

/* Every member of the package's list is checked above (a new member fails to compile here). */
#define FAKE_ABI_COUNT(member, ...) +checked_##member
constexpr int n_checked = 0 LLM_DVFS_NVML_SYMBOLS(FAKE_ABI_COUNT);
#undef FAKE_ABI_COUNT
#define FAKE_ABI_ONE_MEMBER(...) +1
static_assert(n_checked == 0 LLM_DVFS_NVML_SYMBOLS(FAKE_ABI_ONE_MEMBER), "member count");
static_assert(FN_COUNT == 0 LLM_DVFS_NVML_SYMBOLS(FAKE_ABI_ONE_MEMBER), "fake function list");
#undef FAKE_ABI_ONE_MEMBER
}  // namespace fake_abi
#endif
