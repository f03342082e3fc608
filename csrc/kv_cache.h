// Paged KV cache layout (shared by every backend):
//   k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous.
//   A token's slot is block_id * block_size + offset; its row is num_kv_heads * head_dim elements.
// store_kv copies the new K/V rows of num_tokens tokens into their slots; slot -1 means "skip"
// (padding, or a token whose KV is already cached).
#pragma once
#include <cstdint>

namespace r1fast {

struct StoreKVArgs {
  std::uintptr_t key, value, k_cache, v_cache, slot_mapping;  // slot_mapping: int64[num_tokens]
  std::int64_t num_tokens;
  std::int64_t row_bytes;          // num_kv_heads * head_dim * element size
  std::int64_t key_stride_bytes;   // bytes between consecutive tokens of key (rows are contiguous)
  std::int64_t value_stride_bytes;
  std::int64_t num_slots;          // num_blocks * block_size
};

void store_kv_cpu(const StoreKVArgs& a);
#ifdef R1FAST_WITH_CUDA
void store_kv_cuda(const StoreKVArgs& a, std::uintptr_t stream);
#endif

}  // namespace r1fast
