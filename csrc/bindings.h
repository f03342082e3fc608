// Each source file registers its own functions; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace r1fast {
void register_device(pybind11::module_& m);
void register_kv_cache(pybind11::module_& m);
void register_block_manager(pybind11::module_& m);
void register_decode_attention(pybind11::module_& m);
}  // namespace r1fast
