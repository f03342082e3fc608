#include <cuda_runtime.h>

#include "common.h"
#include "kv_cache.h"

namespace r1fast {
namespace {

// One block per token; threads copy the row in the widest unit that the row size and every
// pointer's alignment allow (16 bytes for the usual bf16 rows of 128-dim heads).
template <typename Unit>
__global__ void store_kv_kernel(const char* __restrict__ key, const char* __restrict__ value, char* __restrict__ kc,
                                char* __restrict__ vc, const std::int64_t* __restrict__ slots, std::int64_t units,
                                std::int64_t key_stride, std::int64_t value_stride, std::int64_t num_slots) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t s = slots[t];
  if (s < 0 || s >= num_slots) return;
  const Unit* k_src = reinterpret_cast<const Unit*>(key + t * key_stride);
  const Unit* v_src = reinterpret_cast<const Unit*>(value + t * value_stride);
  Unit* k_dst = reinterpret_cast<Unit*>(kc) + s * units;
  Unit* v_dst = reinterpret_cast<Unit*>(vc) + s * units;
  for (std::int64_t i = threadIdx.x; i < units; i += blockDim.x) {
    k_dst[i] = k_src[i];
    v_dst[i] = v_src[i];
  }
}

template <typename Unit>
void launch(const StoreKVArgs& a, cudaStream_t stream) {
  const std::int64_t units = a.row_bytes / static_cast<std::int64_t>(sizeof(Unit));
  const int threads = static_cast<int>(units < 256 ? ((units + 31) / 32) * 32 : 256);
  store_kv_kernel<Unit><<<static_cast<unsigned>(a.num_tokens), threads, 0, stream>>>(
      as_ptr<const char>(a.key), as_ptr<const char>(a.value), as_ptr<char>(a.k_cache), as_ptr<char>(a.v_cache),
      as_ptr<const std::int64_t>(a.slot_mapping), units, a.key_stride_bytes, a.value_stride_bytes, a.num_slots);
}

}  // namespace

void store_kv_cuda(const StoreKVArgs& a, std::uintptr_t stream_handle) {
  require_cuda("store_kv_cuda");
  if (a.num_tokens == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const std::uintptr_t all = a.key | a.value | a.k_cache | a.v_cache | static_cast<std::uintptr_t>(a.row_bytes) |
                             static_cast<std::uintptr_t>(a.key_stride_bytes) |
                             static_cast<std::uintptr_t>(a.value_stride_bytes);
  if (all % 16 == 0) launch<uint4>(a, stream);
  else if (all % 8 == 0) launch<uint2>(a, stream);
  else if (all % 4 == 0) launch<unsigned int>(a, stream);
  else if (all % 2 == 0) launch<unsigned short>(a, stream);
  else launch<unsigned char>(a, stream);
  check_launch("store_kv_cuda");
}

}  // namespace r1fast
