// dlopen/dlsym with RAII. The only place that touches the dynamic loader.
#pragma once

#include <string>

namespace llm_dvfs {

class DynLib {
 public:
  DynLib() = default;
  // Tries each candidate in order; on failure ok() is false and error() has every dlerror().
  explicit DynLib(const std::initializer_list<std::string>& candidates);
  ~DynLib();
  DynLib(const DynLib&) = delete;
  DynLib& operator=(const DynLib&) = delete;
  DynLib(DynLib&& other) noexcept;
  DynLib& operator=(DynLib&& other) noexcept;

  bool ok() const { return handle_ != nullptr; }
  void* symbol(const char* name) const;  // nullptr when absent
  const std::string& path() const { return path_; }    // the candidate that loaded
  const std::string& error() const { return error_; }  // why nothing loaded

 private:
  void* handle_ = nullptr;
  std::string path_;
  std::string error_;
};

// Looks up `primary`, else `fallback` (may be nullptr: a versioned symbol's older name).
// Sets *used to the name that resolved (primary when neither did); returns nullptr if none did.
void* resolve_versioned(const DynLib& lib, const char* primary, const char* fallback,
                        const char** used);

// Body of a symbol-table X-macro: resolves one entry of `api` (with enum `SymEnum`) from `lib`
// and appends a missing required symbol's name to the std::string `missing`.
#define LLM_DVFS_RESOLVE_ENTRY(SymEnum, member, required, primary, fallback, ret, params) \
  {                                                                                    \
    const char* used = nullptr;                                                        \
    void* p = ::llm_dvfs::resolve_versioned(lib, primary, fallback, &used);            \
    api.member = reinterpret_cast<ret(*) params>(p);                                   \
    api.resolved[static_cast<int>(SymEnum::member)] = used;                            \
    if (!p && (required)) missing += std::string(missing.empty() ? "" : ", ") + primary; \
  }

// Value of an environment variable, or "" when unset.
std::string env_or_empty(const char* name);

}  // namespace llm_dvfs
