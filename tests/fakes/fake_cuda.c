/* A tiny fake libcuda.so.1: exports the driver symbols llm_dvfs's timeline uses, so the native
 * mark/resolve path runs in CI without a GPU. Load it through LLM_DVFS_CUDA_LIBRARY.
 *
 * Model: every stream is a FIFO that is busy until `busy_until` (host CLOCK_MONOTONIC ns).
 * fake_cuda_enqueue(stream, ns) appends "kernel" work. An event recorded on a stream completes
 * when the stream drains up to it (at least `launch_latency` after the record call); its GPU
 * timestamp is the completion time on a GPU clock that runs at (1 + drift_ppm 1e-6) the host
 * rate plus an offset, quantised to 32 ns like the globaltimer. Host functions run on a worker
 * thread `callback_latency` after the stream reaches them and block the stream meanwhile.
 * Control functions (fake_cuda_*) script the clock, latencies and errors, and expose the true
 * completion time of every record for the tests to compare against.
 *
 * Devices: the emulated GPUs of tests/fakes/fake_nvml.c, seen from CUDA. Their number is the
 * caller's FAKE_NVML_DEVICES (1..8, default 1); NVML device i has the 16 UUID bytes
 * fa 4e 00 00 .. 00 0i, i.e. NVML's "GPU-fa4e0000-0000-0000-0000-00000000000i". CUDA enumerates
 * them in the order FAKE_CUDA_DEVICE_ORDER gives ("1,0": a comma-separated permutation of NVML
 * indices, as CUDA's default FASTEST_FIRST order may differ from NVML's PCI order; indices left
 * out follow in NVML order; default identity), or in NVML (PCI) order under
 * CUDA_DEVICE_ORDER=PCI_BUS_ID. CUDA_VISIBLE_DEVICES is applied as the driver does: ordinals index
 * that order, UUIDs (or unique prefixes, with or without "GPU-") name devices, the first invalid
 * entry ends the list, repeated devices count once. Unlike the real driver, which reads these
 * variables once in cuInit, the fake re-reads them at every call (so a test can change them), and
 * cuInit succeeds even when no device is visible (cuDeviceGetCount then says 0). CUdevice handles
 * are 0x1000 + NVML index, never the ordinal, so a caller that skips cuDeviceGet is caught.
 *
 * Build: tests/fakes/build.py (build_fake_cuda) or
 *        cc -shared -fPIC -O2 -o libfake_cuda.so fake_cuda.c -lpthread
 *   -DFAKE_CUDA_OLD: export only unversioned names (cuEventDestroy, cuEventElapsedTime,
 *                    cuDeviceGetUuid, ...) and no cuLaunchHostFunc, to test the loader's fallbacks.
 *   -DFAKE_CUDA_NO_DEVICES: no cuDeviceGetCount / cuDeviceGet / cuDeviceGetUuid(_v2) (a driver
 *                    without device enumeration: the package falls back to assumed PCI order).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef struct {
  char bytes[16];
} CUuuid;
typedef void* CUcontext;
typedef void* CUstream;
typedef struct fake_event* CUevent;
typedef void (*CUhostFn)(void*);

enum {
  CUDA_SUCCESS = 0,
  CUDA_ERROR_INVALID_VALUE = 1,
  CUDA_ERROR_NOT_INITIALIZED = 3,
  CUDA_ERROR_NO_DEVICE = 100,
  CUDA_ERROR_INVALID_DEVICE = 101,
  CUDA_ERROR_INVALID_CONTEXT = 201,
  CUDA_ERROR_INVALID_HANDLE = 400,
  CUDA_ERROR_NOT_READY = 600,
  CUDA_ERROR_UNKNOWN = 999,
};

struct fake_event {
  uint32_t magic;
  int recorded;
  int64_t complete_ns;
};
#define EVENT_MAGIC 0xE7E47u

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static int g_initialized = 0;
static int g_has_context = 1;
static int g_context_token;
static double g_drift_ppm = 0.0;
static int64_t g_offset_ns = 0;
static int64_t g_launch_latency_ns = 3000;
static int64_t g_callback_latency_ns = 20000;
static int64_t g_live_events = 0;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t) {
  for (;;) {
    int64_t d = t - now_ns();
    if (d <= 0) return;
    struct timespec ts = {(time_t)(d / 1000000000LL), (long)(d % 1000000000LL)};
    nanosleep(&ts, NULL);
  }
}

/* ---- call counting and error injection ---------------------------------------------------- */
#define MAX_NAMES 64
static struct {
  char name[48];
  long calls;
  int fail_code;
  int fail_count;
} g_fn[MAX_NAMES];
static int g_nfn = 0;

static int fn_slot(const char* name) {
  for (int i = 0; i < g_nfn; ++i)
    if (strcmp(g_fn[i].name, name) == 0) return i;
  if (g_nfn == MAX_NAMES) return MAX_NAMES - 1;
  strncpy(g_fn[g_nfn].name, name, sizeof g_fn[0].name - 1);
  return g_nfn++;
}

/* Counts the call; returns an injected error code (consuming one), or 0. Caller holds g_mu. */
static int enter(const char* name) {
  int i = fn_slot(name);
  g_fn[i].calls++;
  if (g_fn[i].fail_count != 0) {
    if (g_fn[i].fail_count > 0) g_fn[i].fail_count--;
    return g_fn[i].fail_code;
  }
  return 0;
}
#define ENTER(name)                  \
  pthread_mutex_lock(&g_mu);         \
  {                                  \
    int injected_ = enter(name);     \
    if (injected_) {                 \
      pthread_mutex_unlock(&g_mu);   \
      return injected_;              \
    }                                \
  }

/* ---- streams ------------------------------------------------------------------------------ */
#define MAX_STREAMS 256
static struct {
  uintptr_t handle;
  int64_t busy_until;
  int used;
} g_streams[MAX_STREAMS];

static int64_t* stream_busy(uintptr_t h) {
  int free_slot = -1;
  for (int i = 0; i < MAX_STREAMS; ++i) {
    if (g_streams[i].used && g_streams[i].handle == h) return &g_streams[i].busy_until;
    if (!g_streams[i].used && free_slot < 0) free_slot = i;
  }
  if (free_slot < 0) free_slot = 0;
  g_streams[free_slot].used = 1;
  g_streams[free_slot].handle = h;
  g_streams[free_slot].busy_until = 0;
  return &g_streams[free_slot].busy_until;
}

/* ---- record log --------------------------------------------------------------------------- */
#define MAX_LOG 65536
static uintptr_t g_log_stream[MAX_LOG];
static int64_t g_log_complete[MAX_LOG];
static int g_log_n = 0;

static void log_record(uintptr_t stream, int64_t complete) {
  if (g_log_n < MAX_LOG) {
    g_log_stream[g_log_n] = stream;
    g_log_complete[g_log_n] = complete;
    g_log_n++;
  }
}

/* ---- host-function worker ----------------------------------------------------------------- */
#define MAX_CB 65536
static struct {
  CUhostFn fn;
  void* data;
  int64_t due;
} g_cb[MAX_CB];
static int g_cb_head = 0, g_cb_tail = 0; /* ring indices; pending = tail - head */
__attribute__((unused)) static int g_worker_started = 0;

__attribute__((unused)) static void* worker(void* arg) {
  (void)arg;
  pthread_mutex_lock(&g_mu);
  for (;;) {
    while (g_cb_head == g_cb_tail) pthread_cond_wait(&g_cv, &g_mu);
    int i = g_cb_head % MAX_CB;
    CUhostFn fn = g_cb[i].fn;
    void* data = g_cb[i].data;
    int64_t due = g_cb[i].due;
    pthread_mutex_unlock(&g_mu);
    sleep_until(due);
    fn(data);
    pthread_mutex_lock(&g_mu);
    g_cb_head++;
    pthread_cond_broadcast(&g_cv);
  }
  return NULL;
}

static int64_t gpu_ts(int64_t host_ns) {
  double g = (double)host_ns * (1.0 + g_drift_ppm * 1e-6) + (double)g_offset_ns;
  int64_t q = (int64_t)g;
  return q - (q % 32);
}

/* ---- the driver API ----------------------------------------------------------------------- */
EXPORT CUresult cuInit(unsigned int flags) {
  ENTER("cuInit");
  g_initialized = flags == 0;
  pthread_mutex_unlock(&g_mu);
  return flags == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuDriverGetVersion(int* v) {
  ENTER("cuDriverGetVersion");
  pthread_mutex_unlock(&g_mu);
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = 12080;
  return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorName(CUresult r, const char** s) {
  switch (r) {
    case CUDA_SUCCESS: *s = "CUDA_SUCCESS"; return CUDA_SUCCESS;
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; return CUDA_SUCCESS;
    case CUDA_ERROR_NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; return CUDA_SUCCESS;
    case CUDA_ERROR_NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; return CUDA_SUCCESS;
    case CUDA_ERROR_INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; return CUDA_SUCCESS;
    case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; return CUDA_SUCCESS;
    case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; return CUDA_SUCCESS;
    case CUDA_ERROR_NOT_READY: *s = "CUDA_ERROR_NOT_READY"; return CUDA_SUCCESS;
    case CUDA_ERROR_UNKNOWN: *s = "CUDA_ERROR_UNKNOWN"; return CUDA_SUCCESS;
    default: *s = NULL; return CUDA_ERROR_INVALID_VALUE;
  }
}

EXPORT CUresult cuGetErrorString(CUresult r, const char** s) {
  *s = r == CUDA_ERROR_UNKNOWN ? "unknown error (injected by fake_cuda)" : NULL;
  return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ---- devices (see the header comment) ------------------------------------------------------ */
#ifndef FAKE_CUDA_NO_DEVICES
#define FAKE_MAX_DEV 8
#define DEVICE_HANDLE_BASE 0x1000

/* FAKE_NVML_DEVICES as fake_nvml.c reads it (an integer 1..8), else 1. */
static int device_total(void) {
  const char* v = getenv("FAKE_NVML_DEVICES");
  if (!v || !*v) return 1;
  char* end = NULL;
  double n = strtod(v, &end);
  return (end != v && n >= 1 && n <= FAKE_MAX_DEV && n == floor(n)) ? (int)n : 1;
}

static void uuid_bytes(int nvml_index, unsigned char b[16]) {
  memset(b, 0, 16);
  b[0] = 0xfa;
  b[1] = 0x4e;
  b[14] = (unsigned char)((nvml_index >> 8) & 0xff);
  b[15] = (unsigned char)(nvml_index & 0xff);
}

/* NVML's text form of the bytes: "GPU-" + 8-4-4-4-12 lower-case hex digits. */
static void uuid_text(int nvml_index, char out[48]) {
  unsigned char b[16];
  uuid_bytes(nvml_index, b);
  snprintf(out, 48, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
           b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
           b[14], b[15]);
}

/* The enumeration order before CUDA_VISIBLE_DEVICES: NVML indices. */
static void base_order(int n, int order[FAKE_MAX_DEV]) {
  int used[FAKE_MAX_DEV] = {0};
  int k = 0;
  const char* mode = getenv("CUDA_DEVICE_ORDER");
  const char* v = (mode && strcmp(mode, "PCI_BUS_ID") == 0) ? NULL : getenv("FAKE_CUDA_DEVICE_ORDER");
  while (v && *v) {
    char* end = NULL;
    long i = strtol(v, &end, 10);
    if (end == v) break;
    if (i >= 0 && i < n && !used[i]) {
      used[i] = 1;
      order[k++] = (int)i;
    }
    v = end;
    while (*v == ' ') ++v;
    if (*v != ',') break;
    ++v;
  }
  for (int i = 0; i < n; ++i)
    if (!used[i]) order[k++] = i;
}

/* NVML indices of the devices this process sees, in CUDA ordinal order; returns how many. */
static int visible_devices(int out[FAKE_MAX_DEV]) {
  const int n = device_total();
  int order[FAKE_MAX_DEV];
  base_order(n, order);
  const char* p = getenv("CUDA_VISIBLE_DEVICES");
  if (!p) {
    memcpy(out, order, sizeof(int) * (size_t)n);
    return n;
  }
  int k = 0, seen[FAKE_MAX_DEV] = {0};
  for (;;) {
    const size_t len = strcspn(p, ",");
    const char* t = p;
    size_t tl = len;
    while (tl > 0 && isspace((unsigned char)t[0])) {
      ++t;
      --tl;
    }
    while (tl > 0 && isspace((unsigned char)t[tl - 1])) --tl;
    if (tl == 0 || tl >= 44) break;
    char tok[48];
    memcpy(tok, t, tl);
    tok[tl] = '\0';
    int dev = -1;
    if (strspn(tok, "0123456789") == tl) {
      const long o = strtol(tok, NULL, 10);
      if (o < n) dev = order[o];
    } else if (strncmp(tok, "MIG-", 4) != 0) {
      char want[56];
      snprintf(want, sizeof want, "%s%s", strncmp(tok, "GPU-", 4) == 0 ? "" : "GPU-", tok);
      int matches = 0;
      for (int i = 0; i < n; ++i) {
        char u[48];
        uuid_text(order[i], u);
        if (strncmp(u, want, strlen(want)) == 0) {
          ++matches;
          dev = order[i];
        }
      }
      if (matches != 1) dev = -1;
    }
    if (dev < 0) break;
    if (!seen[dev]) {
      seen[dev] = 1;
      out[k++] = dev;
    }
    if (p[len] != ',') break;
    p += len + 1;
  }
  return k;
}

EXPORT CUresult cuDeviceGetCount(int* count) {
  ENTER("cuDeviceGetCount");
  const int init = g_initialized;
  pthread_mutex_unlock(&g_mu);
  if (!init) return CUDA_ERROR_NOT_INITIALIZED;
  if (!count) return CUDA_ERROR_INVALID_VALUE;
  int vis[FAKE_MAX_DEV];
  *count = visible_devices(vis);
  return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
  ENTER("cuDeviceGet");
  const int init = g_initialized;
  pthread_mutex_unlock(&g_mu);
  if (!init) return CUDA_ERROR_NOT_INITIALIZED;
  if (!device) return CUDA_ERROR_INVALID_VALUE;
  int vis[FAKE_MAX_DEV];
  const int n = visible_devices(vis);
  if (ordinal < 0 || ordinal >= n) return CUDA_ERROR_INVALID_DEVICE;
  *device = DEVICE_HANDLE_BASE + vis[ordinal];
  return CUDA_SUCCESS;
}

static CUresult uuid_impl(const char* name, CUuuid* uuid, CUdevice device) {
  ENTER(name);
  const int init = g_initialized;
  pthread_mutex_unlock(&g_mu);
  if (!init) return CUDA_ERROR_NOT_INITIALIZED;
  if (!uuid) return CUDA_ERROR_INVALID_VALUE;
  const int idx = device - DEVICE_HANDLE_BASE;
  if (idx < 0 || idx >= device_total()) return CUDA_ERROR_INVALID_DEVICE;
  unsigned char b[16];
  uuid_bytes(idx, b);
  memcpy(uuid->bytes, b, 16);
  return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice device) {
  return uuid_impl("cuDeviceGetUuid", uuid, device);
}
#ifndef FAKE_CUDA_OLD
EXPORT CUresult cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice device) {
  return uuid_impl("cuDeviceGetUuid_v2", uuid, device);
}
#endif
#endif /* FAKE_CUDA_NO_DEVICES */

EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
  ENTER("cuCtxGetCurrent");
  *c = g_has_context ? (CUcontext)&g_context_token : NULL;
  pthread_mutex_unlock(&g_mu);
  return g_initialized ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

static CUresult push_impl(CUcontext c) {
  ENTER("cuCtxPushCurrent");
  pthread_mutex_unlock(&g_mu);
  return c == (CUcontext)&g_context_token ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}
static CUresult pop_impl(CUcontext* c) {
  ENTER("cuCtxPopCurrent");
  pthread_mutex_unlock(&g_mu);
  if (c) *c = (CUcontext)&g_context_token;
  return CUDA_SUCCESS;
}

static CUresult stream_create_impl(CUstream* s, unsigned int flags) {
  (void)flags;
  ENTER("cuStreamCreate");
  void* token = malloc(1);
  *s = token;
  *stream_busy((uintptr_t)token) = now_ns();
  pthread_mutex_unlock(&g_mu);
  return CUDA_SUCCESS;
}

static CUresult stream_destroy_impl(CUstream s) {
  ENTER("cuStreamDestroy");
  for (int i = 0; i < MAX_STREAMS; ++i)
    if (g_streams[i].used && g_streams[i].handle == (uintptr_t)s) g_streams[i].used = 0;
  pthread_mutex_unlock(&g_mu);
  free(s);
  return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamCreate(CUstream* s, unsigned int flags) { return stream_create_impl(s, flags); }

EXPORT CUresult cuStreamSynchronize(CUstream s) {
  ENTER("cuStreamSynchronize");
  int64_t until = *stream_busy((uintptr_t)s);
  pthread_mutex_unlock(&g_mu);
  sleep_until(until);
  pthread_mutex_lock(&g_mu);
  while (g_cb_head != g_cb_tail) pthread_cond_wait(&g_cv, &g_mu);
  pthread_mutex_unlock(&g_mu);
  return CUDA_SUCCESS;
}

EXPORT CUresult cuEventCreate(CUevent* e, unsigned int flags) {
  (void)flags;
  ENTER("cuEventCreate");
  struct fake_event* ev = calloc(1, sizeof *ev);
  ev->magic = EVENT_MAGIC;
  *e = ev;
  g_live_events++;
  pthread_mutex_unlock(&g_mu);
  return CUDA_SUCCESS;
}

static CUresult event_destroy_impl(CUevent e) {
  ENTER("cuEventDestroy");
  if (!e || e->magic != EVENT_MAGIC) {
    pthread_mutex_unlock(&g_mu);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  e->magic = 0;
  g_live_events--;
  pthread_mutex_unlock(&g_mu);
  free(e);
  return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(CUevent e, CUstream s) {
  ENTER("cuEventRecord");
  if (!e || e->magic != EVENT_MAGIC) {
    pthread_mutex_unlock(&g_mu);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  int64_t* busy = stream_busy((uintptr_t)s);
  int64_t t = now_ns() + g_launch_latency_ns;
  if (*busy > t) t = *busy;
  *busy = t;
  e->recorded = 1;
  e->complete_ns = t;
  log_record((uintptr_t)s, t);
  pthread_mutex_unlock(&g_mu);
  return CUDA_SUCCESS;
}

EXPORT CUresult cuEventQuery(CUevent e) {
  ENTER("cuEventQuery");
  CUresult r = CUDA_SUCCESS;
  if (!e || e->magic != EVENT_MAGIC)
    r = CUDA_ERROR_INVALID_HANDLE;
  else if (e->recorded && now_ns() < e->complete_ns)
    r = CUDA_ERROR_NOT_READY;
  pthread_mutex_unlock(&g_mu);
  return r;
}

EXPORT CUresult cuEventSynchronize(CUevent e) {
  ENTER("cuEventSynchronize");
  if (!e || e->magic != EVENT_MAGIC) {
    pthread_mutex_unlock(&g_mu);
    return CUDA_ERROR_INVALID_HANDLE;
  }
  int64_t until = e->recorded ? e->complete_ns : 0;
  pthread_mutex_unlock(&g_mu);
  sleep_until(until);
  return CUDA_SUCCESS;
}

static CUresult elapsed_impl(float* ms, CUevent a, CUevent b) {
  ENTER("cuEventElapsedTime");
  CUresult r = CUDA_SUCCESS;
  int64_t now = now_ns();
  if (!a || !b || a->magic != EVENT_MAGIC || b->magic != EVENT_MAGIC || !a->recorded || !b->recorded)
    r = CUDA_ERROR_INVALID_HANDLE;
  else if (now < a->complete_ns || now < b->complete_ns)
    r = CUDA_ERROR_NOT_READY;
  else
    *ms = (float)((double)(gpu_ts(b->complete_ns) - gpu_ts(a->complete_ns)) / 1e6);
  pthread_mutex_unlock(&g_mu);
  return r;
}

#ifdef FAKE_CUDA_OLD
EXPORT CUresult cuCtxPushCurrent(CUcontext c) { return push_impl(c); }
EXPORT CUresult cuCtxPopCurrent(CUcontext* c) { return pop_impl(c); }
EXPORT CUresult cuStreamDestroy(CUstream s) { return stream_destroy_impl(s); }
EXPORT CUresult cuEventDestroy(CUevent e) { return event_destroy_impl(e); }
EXPORT CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) { return elapsed_impl(ms, a, b); }
#else
/* Like the real library: both the versioned and the legacy names. */
EXPORT CUresult cuCtxPushCurrent(CUcontext c) { return push_impl(c); }
EXPORT CUresult cuCtxPopCurrent(CUcontext* c) { return pop_impl(c); }
EXPORT CUresult cuStreamDestroy(CUstream s) { return stream_destroy_impl(s); }
EXPORT CUresult cuEventDestroy(CUevent e) { return event_destroy_impl(e); }
EXPORT CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) { return elapsed_impl(ms, a, b); }
EXPORT CUresult cuCtxPushCurrent_v2(CUcontext c) { return push_impl(c); }
EXPORT CUresult cuCtxPopCurrent_v2(CUcontext* c) { return pop_impl(c); }
EXPORT CUresult cuStreamDestroy_v2(CUstream s) { return stream_destroy_impl(s); }
EXPORT CUresult cuEventDestroy_v2(CUevent e) { return event_destroy_impl(e); }
EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
  return elapsed_impl(ms, a, b);
}

EXPORT CUresult cuLaunchHostFunc(CUstream s, CUhostFn fn, void* data) {
  ENTER("cuLaunchHostFunc");
  if (g_cb_tail - g_cb_head >= MAX_CB) {
    pthread_mutex_unlock(&g_mu);
    return CUDA_ERROR_UNKNOWN;
  }
  if (!g_worker_started) {
    pthread_t th;
    pthread_create(&th, NULL, worker, NULL);
    pthread_detach(th);
    g_worker_started = 1;
  }
  int64_t* busy = stream_busy((uintptr_t)s);
  int64_t t = now_ns() + g_launch_latency_ns;
  if (*busy > t) t = *busy;
  int64_t due = t + g_callback_latency_ns;
  *busy = due + 1000; /* the host function blocks the stream while it runs */
  int i = g_cb_tail % MAX_CB;
  g_cb[i].fn = fn;
  g_cb[i].data = data;
  g_cb[i].due = due;
  g_cb_tail++;
  log_record((uintptr_t)s, t); /* when the stream reached the callback (true mark time) */
  pthread_cond_broadcast(&g_cv);
  pthread_mutex_unlock(&g_mu);
  return CUDA_SUCCESS;
}
#endif

/* ---- control functions -------------------------------------------------------------------- */
EXPORT void fake_cuda_reset(void) {
  pthread_mutex_lock(&g_mu);
  while (g_cb_head != g_cb_tail) pthread_cond_wait(&g_cv, &g_mu);
  g_has_context = 1;
  g_drift_ppm = 0.0;
  g_offset_ns = 0;
  g_launch_latency_ns = 3000;
  g_callback_latency_ns = 20000;
  g_log_n = 0;
  for (int i = 0; i < g_nfn; ++i) {
    g_fn[i].calls = 0;
    g_fn[i].fail_count = 0;
    g_fn[i].fail_code = 0;
  }
  pthread_mutex_unlock(&g_mu);
}

EXPORT void fake_cuda_set_clock(double drift_ppm, int64_t offset_ns) {
  pthread_mutex_lock(&g_mu);
  g_drift_ppm = drift_ppm;
  g_offset_ns = offset_ns;
  pthread_mutex_unlock(&g_mu);
}

EXPORT void fake_cuda_set_latency(int64_t launch_ns, int64_t callback_ns) {
  pthread_mutex_lock(&g_mu);
  g_launch_latency_ns = launch_ns;
  g_callback_latency_ns = callback_ns;
  pthread_mutex_unlock(&g_mu);
}

EXPORT void fake_cuda_set_context(int has_context) {
  pthread_mutex_lock(&g_mu);
  g_has_context = has_context;
  pthread_mutex_unlock(&g_mu);
}

/* Append `duration_ns` of work to the stream; returns when it will be done (host ns). */
EXPORT int64_t fake_cuda_enqueue(uintptr_t stream, int64_t duration_ns) {
  pthread_mutex_lock(&g_mu);
  int64_t* busy = stream_busy(stream);
  int64_t t = now_ns();
  if (*busy > t) t = *busy;
  *busy = t + duration_ns;
  int64_t done = *busy;
  pthread_mutex_unlock(&g_mu);
  return done;
}

/* Copies the (stream, true completion host ns) of every record since the last reset. */
EXPORT int fake_cuda_log(uintptr_t* streams, int64_t* complete_ns, int max) {
  pthread_mutex_lock(&g_mu);
  int n = g_log_n < max ? g_log_n : max;
  for (int i = 0; i < n; ++i) {
    if (streams) streams[i] = g_log_stream[i];
    if (complete_ns) complete_ns[i] = g_log_complete[i];
  }
  pthread_mutex_unlock(&g_mu);
  return n;
}

EXPORT long fake_cuda_calls(const char* name) {
  pthread_mutex_lock(&g_mu);
  long n = 0;
  for (int i = 0; i < g_nfn; ++i)
    if (strcmp(g_fn[i].name, name) == 0) n = g_fn[i].calls;
  pthread_mutex_unlock(&g_mu);
  return n;
}

/* The next `count` calls of `name` return `code` (count < 0: until reset). */
EXPORT void fake_cuda_fail(const char* name, int code, int count) {
  pthread_mutex_lock(&g_mu);
  int i = fn_slot(name);
  g_fn[i].fail_code = code;
  g_fn[i].fail_count = count;
  pthread_mutex_unlock(&g_mu);
}

EXPORT int64_t fake_cuda_live_events(void) {
  pthread_mutex_lock(&g_mu);
  int64_t n = g_live_events;
  pthread_mutex_unlock(&g_mu);
  return n;
}

EXPORT int64_t fake_cuda_now_ns(void) { return now_ns(); }
