#include "dynlib.h"

#include <dlfcn.h>

#include <cstdlib>
#include <utility>

namespace llm_dvfs {

DynLib::DynLib(const std::initializer_list<std::string>& candidates) {
  for (const auto& c : candidates) {
    if (c.empty()) continue;
    // RTLD_LOCAL: never let the driver's symbols leak into the process's global namespace.
    handle_ = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_) {
      path_ = c;
      error_.clear();
      return;
    }
    const char* e = dlerror();
    if (!error_.empty()) error_ += "; ";
    error_ += e ? e : c + ": unknown dlopen error";
  }
}

DynLib::~DynLib() {
  if (handle_) dlclose(handle_);
}

DynLib::DynLib(DynLib&& o) noexcept
    : handle_(std::exchange(o.handle_, nullptr)), path_(std::move(o.path_)), error_(std::move(o.error_)) {}

DynLib& DynLib::operator=(DynLib&& o) noexcept {
  if (this != &o) {
    if (handle_) dlclose(handle_);
    handle_ = std::exchange(o.handle_, nullptr);
    path_ = std::move(o.path_);
    error_ = std::move(o.error_);
  }
  return *this;
}

void* DynLib::symbol(const char* name) const {
  return handle_ ? dlsym(handle_, name) : nullptr;
}

void* resolve_versioned(const DynLib& lib, const char* primary, const char* fallback,
                        const char** used) {
  *used = primary;
  void* p = lib.symbol(primary);
  if (!p && fallback) {
    p = lib.symbol(fallback);
    if (p) *used = fallback;
  }
  return p;
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

}  // namespace llm_dvfs
