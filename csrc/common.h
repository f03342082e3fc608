// Shared helpers for r1fast._C. No torch header anywhere in csrc/: functions take raw pointers
// (as uintptr_t) that the Python wrappers have validated, plus sizes and a stream handle.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace r1fast {

// Raised as ValueError in Python (see module.cpp): the caller passed something the op cannot take.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

template <typename... Args>
[[noreturn]] void fail(Args&&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw InvalidArgument(os.str());
}

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

#ifdef R1FAST_WITH_CUDA
constexpr bool kWithCuda = true;
// Throws std::runtime_error naming the op when no usable driver/device is present.
void require_cuda(const char* op);
// After a kernel launch: throws std::runtime_error naming the op if the launch failed.
void check_launch(const char* op);
#else
constexpr bool kWithCuda = false;
[[noreturn]] inline void require_cuda(const char* op) {
  throw std::runtime_error(std::string("r1fast._C.") + op +
                           ": this build of r1fast._C has no CUDA (nvcc was not found or R1FAST_CUDA=0)");
}
#endif

}  // namespace r1fast
