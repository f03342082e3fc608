#include "bindings.h"
#include "common.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "r1fast native extension: KV-cache block manager and CUDA kernels (no torch headers)";
  py::register_exception<r1fast::InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);
  r1fast::register_device(m);
  r1fast::register_kv_cache(m);
  r1fast::register_block_manager(m);
  r1fast::register_decode_attention(m);
}
