#include "kv_cache.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "bindings.h"
#include "common.h"

namespace r1fast {

static void check_args(const StoreKVArgs& a) {
  if (a.num_tokens < 0) fail("store_kv: num_tokens must be >= 0, got ", a.num_tokens);
  // one CUDA block per token on grid.x
  if (a.num_tokens > 2147483647LL) fail("store_kv: num_tokens ", a.num_tokens, " exceeds 2^31 - 1");
  if (a.row_bytes <= 0) fail("store_kv: row_bytes must be > 0, got ", a.row_bytes);
  if (a.key_stride_bytes < a.row_bytes || a.value_stride_bytes < a.row_bytes)
    fail("store_kv: token strides (", a.key_stride_bytes, ", ", a.value_stride_bytes, ") are smaller than a row (",
         a.row_bytes, " bytes)");
  if (a.num_slots <= 0) fail("store_kv: num_slots must be > 0, got ", a.num_slots);
  // byte offsets (slot * row, token * stride) are int64 on both paths
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  if (a.row_bytes > kMax / a.num_slots ||
      (a.num_tokens > 0 && std::max(a.key_stride_bytes, a.value_stride_bytes) > kMax / a.num_tokens))
    fail("store_kv: cache or token sizes overflow 64-bit byte offsets");
  if (a.num_tokens > 0 && (!a.key || !a.value || !a.k_cache || !a.v_cache || !a.slot_mapping))
    fail("store_kv: null pointer");
}

void store_kv_cpu(const StoreKVArgs& a) {
  check_args(a);
  const auto* slots = as_ptr<const std::int64_t>(a.slot_mapping);
  // Bounds are checked before anything is written, so a bad mapping leaves the cache untouched.
  for (std::int64_t t = 0; t < a.num_tokens; ++t) {
    if (slots[t] < -1 || slots[t] >= a.num_slots)
      fail("store_kv: slot_mapping[", t, "] = ", slots[t], " is outside [-1, ", a.num_slots, ")");
  }
  const auto* key = as_ptr<const char>(a.key);
  const auto* value = as_ptr<const char>(a.value);
  auto* kc = as_ptr<char>(a.k_cache);
  auto* vc = as_ptr<char>(a.v_cache);
  for (std::int64_t t = 0; t < a.num_tokens; ++t) {
    const std::int64_t s = slots[t];
    if (s < 0) continue;
    std::memcpy(kc + s * a.row_bytes, key + t * a.key_stride_bytes, a.row_bytes);
    std::memcpy(vc + s * a.row_bytes, value + t * a.value_stride_bytes, a.row_bytes);
  }
}

void register_kv_cache(pybind11::module_& m) {
  namespace py = pybind11;
  auto make = [](std::uintptr_t key, std::uintptr_t value, std::uintptr_t kc, std::uintptr_t vc, std::uintptr_t slots,
                 std::int64_t n, std::int64_t row, std::int64_t ks, std::int64_t vs, std::int64_t num_slots) {
    return StoreKVArgs{key, value, kc, vc, slots, n, row, ks, vs, num_slots};
  };
  m.def("store_kv_cpu",
        [make](std::uintptr_t key, std::uintptr_t value, std::uintptr_t kc, std::uintptr_t vc, std::uintptr_t slots,
               std::int64_t n, std::int64_t row, std::int64_t ks, std::int64_t vs, std::int64_t num_slots) {
          py::gil_scoped_release nogil;
          store_kv_cpu(make(key, value, kc, vc, slots, n, row, ks, vs, num_slots));
        },
        py::arg("key"), py::arg("value"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("num_tokens"), py::arg("row_bytes"), py::arg("key_stride_bytes"), py::arg("value_stride_bytes"),
        py::arg("num_slots"),
        "Host twin of the CUDA store_kv (use r1fast.ops.store_kv, which validates tensors first).");
  m.def("store_kv_cuda",
        [make](std::uintptr_t key, std::uintptr_t value, std::uintptr_t kc, std::uintptr_t vc, std::uintptr_t slots,
               std::int64_t n, std::int64_t row, std::int64_t ks, std::int64_t vs, std::int64_t num_slots,
               std::uintptr_t stream) {
          auto a = make(key, value, kc, vc, slots, n, row, ks, vs, num_slots);
          check_args(a);
#ifdef R1FAST_WITH_CUDA
          store_kv_cuda(a, stream);
#else
          (void)stream;
          require_cuda("store_kv_cuda");
#endif
        },
        py::arg("key"), py::arg("value"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("num_tokens"), py::arg("row_bytes"), py::arg("key_stride_bytes"), py::arg("value_stride_bytes"),
        py::arg("num_slots"), py::arg("stream"),
        "CUDA store_kv on the given stream; slots outside [-1, num_slots) are skipped (the wrapper checks them).");
}

}  // namespace r1fast
