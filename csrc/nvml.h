// Refcounted, lazily loaded NVML. Nothing here runs at import: the library is opened by the
// first NvmlSession and closed (nvmlShutdown + dlclose) when the last one ends.
#pragma once

#include <map>
#include <stdexcept>
#include <string>

#include "nvml_api.h"

namespace llm_dvfs {

enum class NvmlSym : int {
#define LLM_DVFS_X(member, ...) member,
  LLM_DVFS_NVML_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  kCount
};

// The pointer table generated from the X-macro list; unresolved optional entries are nullptr.
struct NvmlApi {
#define LLM_DVFS_X(member, required, primary, fallback, ret, params) ret(*member) params = nullptr;
  LLM_DVFS_NVML_SYMBOLS(LLM_DVFS_X)
#undef LLM_DVFS_X
  // Name that resolved for each symbol (primary or fallback), or the primary name if none did.
  const char* resolved[static_cast<int>(NvmlSym::kCount)] = {};
  const char* name(NvmlSym s) const { return resolved[static_cast<int>(s)]; }
};

// An NVML call returned an error. code is the nvmlReturn_t, function the NVML symbol name.
class NvmlError : public std::runtime_error {
 public:
  NvmlError(int code, std::string function, const std::string& message)
      : std::runtime_error(message), code(code), function(std::move(function)) {}
  int code;
  std::string function;
};

// The library or one of its required symbols could not be loaded.
class LoadError : public std::runtime_error {
 public:
  enum class Kind { kLibraryNotFound, kSymbolNotFound };
  LoadError(Kind kind, const std::string& message) : std::runtime_error(message), kind(kind) {}
  Kind kind;
};

[[noreturn]] void throw_nvml_error(int code, const char* function);

inline void nvml_check(nvmlReturn_t r, const char* function) {
  if (r != NVML_SUCCESS) throw_nvml_error(r, function);
}

// Calls api.member(args...) and throws NvmlError on failure; a missing optional symbol is
// NVML_ERROR_FUNCTION_NOT_FOUND, so callers treat it like "not supported".
#define LLM_DVFS_NVML_CALL(api, member, ...)                                                   \
  ::llm_dvfs::nvml_check(                                                                      \
      (api).member ? (api).member(__VA_ARGS__) : NVML_ERROR_FUNCTION_NOT_FOUND,                \
      (api).name(::llm_dvfs::NvmlSym::member))

// Return code without throwing (for the sampler's hot path and capability probes).
#define LLM_DVFS_NVML_TRY(api, member, ...) \
  ((api).member ? (api).member(__VA_ARGS__) : NVML_ERROR_FUNCTION_NOT_FOUND)

// RAII reference to the loaded, initialised library. Construction loads it on first use
// (LLM_DVFS_NVML_LIBRARY, else libnvidia-ml.so.1) and calls nvmlInit; the last destruction
// calls nvmlShutdown and unloads it. Thread-safe; never called on a hot path.
class NvmlSession {
 public:
  NvmlSession();
  ~NvmlSession();
  NvmlSession(const NvmlSession&) = delete;
  NvmlSession& operator=(const NvmlSession&) = delete;
  const NvmlApi& api() const { return *api_; }

  static std::string library_path();                  // "" when not loaded
  static std::map<std::string, bool> symbol_table();  // resolved name -> present
  static int refcount();

 private:
  const NvmlApi* api_;
};

}  // namespace llm_dvfs
