#include "nvml.h"

#include <memory>
#include <mutex>

#include "dynlib.h"

namespace llm_dvfs {
namespace {

std::mutex g_mu;  // guards everything below; held only while loading/unloading
int g_refcount = 0;
std::unique_ptr<DynLib> g_lib;
NvmlApi g_api;

void resolve_all(const DynLib& lib, NvmlApi& api) {
  std::string missing;
#define LLM_DVFS_X(...) LLM_DVFS_RESOLVE_ENTRY(NvmlSym, __VA_ARGS__)
  LLM_DVFS_NVML_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  if (!missing.empty())
    throw LoadError(LoadError::Kind::kSymbolNotFound,
                    "the NVML library at " + lib.path() + " lacks required symbol(s): " + missing +
                        " (driver too old? llm_dvfs needs an NVIDIA driver >= 450)");
}

}  // namespace

[[noreturn]] void throw_nvml_error(int code, const char* function) {
  std::string msg;
  // ErrorString is read without the lock: the table is immutable while any session lives.
  if (g_api.ErrorString) {
    const char* s = g_api.ErrorString(code);
    if (s) msg = s;
  }
  throw NvmlError(code, function ? function : "nvml", msg);
}

NvmlSession::NvmlSession() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_refcount == 0) {
    std::string override_path = env_or_empty("LLM_DVFS_NVML_LIBRARY");
    auto lib = override_path.empty()
                   ? std::make_unique<DynLib>(std::initializer_list<std::string>{
                         "libnvidia-ml.so.1", "libnvidia-ml.so"})
                   : std::make_unique<DynLib>(std::initializer_list<std::string>{override_path});
    if (!lib->ok()) {
      throw LoadError(LoadError::Kind::kLibraryNotFound,
                      "could not load the NVIDIA management library (" + lib->error() +
                          "). Install the NVIDIA driver, or point LLM_DVFS_NVML_LIBRARY at "
                          "libnvidia-ml.so.1");
    }
    NvmlApi api;
    resolve_all(*lib, api);
    nvmlReturn_t r = api.Init();
    if (r != NVML_SUCCESS) {
      const char* s = api.ErrorString ? api.ErrorString(r) : nullptr;
      throw NvmlError(r, api.name(NvmlSym::Init), s ? s : "");
    }
    g_api = api;
    g_lib = std::move(lib);
  }
  ++g_refcount;
  api_ = &g_api;
}

NvmlSession::~NvmlSession() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (--g_refcount == 0) {
    if (g_api.Shutdown) g_api.Shutdown();
    g_api = NvmlApi{};
    g_lib.reset();
  }
}

std::string NvmlSession::library_path() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_lib ? g_lib->path() : std::string();
}

std::map<std::string, bool> NvmlSession::symbol_table() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::map<std::string, bool> out;
  if (!g_lib) return out;
#define LLM_DVFS_X(member, ...) \
  out[g_api.name(NvmlSym::member)] = g_api.member != nullptr;
  LLM_DVFS_NVML_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  return out;
}

int NvmlSession::refcount() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_refcount;
}

}  // namespace llm_dvfs
