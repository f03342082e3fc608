// Build facts and CUDA availability, as seen from inside the extension.
#include <pybind11/stl.h>

#include <string>

#include "bindings.h"
#include "common.h"

#ifndef R1FAST_SOURCES_DIGEST
#define R1FAST_SOURCES_DIGEST ""  // built without setup.py
#endif

namespace r1fast {

#ifdef R1FAST_WITH_CUDA
int cuda_device_count_or_throw();  // cuda_device.cu
#endif

void register_device(pybind11::module_& m) {
  m.def("build_info", []() {
    pybind11::dict d;
    d["with_cuda"] = kWithCuda;
#ifdef R1FAST_WITH_CUDA
    d["cuda_archs"] = std::string(R1FAST_CUDA_ARCHS);
    d["cuda_version"] = std::string(R1FAST_CUDA_VERSION);
#else
    d["cuda_archs"] = std::string();
    d["cuda_version"] = std::string();
#endif
    d["cxx"] = std::string(__VERSION__);
    d["sources_digest"] = std::string(R1FAST_SOURCES_DIGEST);
    return d;
  }, "How this module was compiled: with_cuda, cuda_archs, cuda_version, cxx, sources_digest.");

  m.def("cuda_device_count", []() -> int {
#ifdef R1FAST_WITH_CUDA
    return cuda_device_count_or_throw();
#else
    require_cuda("cuda_device_count");
#endif
  }, "Number of CUDA devices the extension's runtime sees; raises RuntimeError without a usable driver.");
}

}  // namespace r1fast
