// Paged decode attention: one new query token per sequence against its cached context.
//   q        [num_seqs, num_heads, head_dim]            (contiguous)
//   k/v cache [num_blocks, block_size, num_kv_heads, head_dim] (layout of kv_cache.h)
//   block_tables int32 [num_seqs, max_blocks_per_seq]; context_lens int32 [num_seqs] (>= 1, KV of the
//   current token already stored)
//   out      [num_seqs, num_heads, head_dim]
// Query head h reads KV head h / (num_heads / num_kv_heads) (GQA). The context is cut into
// `num_splits` partitions of `partition_size` tokens (split-K); with more than one split each
// partition writes (max, sum, acc) to float32 workspaces and a second kernel merges them.
// Shared prefix (optional, all three set or none): row_start int32 [num_seqs], with
// 0 <= row_start[b] < context_lens[b]; rows with row_start[b] > 0 have the unnormalised softmax state
// of their first row_start[b] tokens in prefix_ml float32 [num_seqs, num_heads, 2] (max, sum) and
// prefix_acc float32 [num_seqs, num_heads, head_dim] (from the Triton prefix kernel). The kernel
// then walks tokens [row_start[b], context_lens[b]) only, split s covering
// [row_start + s * partition_size, row_start + (s + 1) * partition_size), and starts from that state.
#pragma once
#include <cstdint>

namespace r1fast {

struct DecodeAttentionArgs {
  std::uintptr_t out, q, k_cache, v_cache, block_tables, context_lens;
  std::uintptr_t workspace_acc;  // float32 [num_seqs, num_heads, num_splits, head_dim] (num_splits > 1)
  std::uintptr_t workspace_ml;   // float32 [num_seqs, num_heads, num_splits, 2]
  std::uintptr_t row_start, prefix_ml, prefix_acc;  // shared prefix, or all 0
  std::int64_t num_seqs, num_heads, num_kv_heads, head_dim;
  std::int64_t num_blocks, block_size, max_blocks_per_seq;
  std::int64_t num_splits, partition_size;
  float scale;
  int dtype;  // 0 float32, 1 float16, 2 bfloat16
};

#ifdef R1FAST_WITH_CUDA
void decode_attention_cuda(const DecodeAttentionArgs& a, std::uintptr_t stream);
#endif

}  // namespace r1fast
