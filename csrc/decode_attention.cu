#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"
#include "decode_attention.h"

namespace r1fast {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxDim = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// VPL contiguous elements per lane, read in vector loads of at most 16 bytes (the wrapper checks
// 16-byte base alignment; head_dim % 8 == 0 keeps every lane's offset aligned to its pack).
template <typename T, int VPL>
struct alignas(sizeof(T) * VPL > 16 ? 16 : sizeof(T) * VPL) Pack {
  T v[VPL];
};

template <typename T, int VPL>
__device__ __forceinline__ void load_row(const T* p, float (&dst)[VPL]) {
  const Pack<T, VPL> pk = *reinterpret_cast<const Pack<T, VPL>*>(p);
#pragma unroll
  for (int i = 0; i < VPL; ++i) dst[i] = to_float(pk.v[i]);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// One CTA = one (sequence, KV head, tile of GQ_TILE query heads, context partition). Each warp walks
// its share of the partition's tokens with a running (max, sum, acc) per query head, so every K/V
// row is read once for all query heads that share it; the warps are merged through shared memory.
template <typename T, int VPL, int GQ_TILE>
__global__ void __launch_bounds__(kWarps * 32)
decode_partition_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k_cache,
                        const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                        const int* __restrict__ context_lens, float* __restrict__ ws_acc, float* __restrict__ ws_ml,
                        const int* __restrict__ row_start, const float* __restrict__ prefix_ml,
                        const float* __restrict__ prefix_acc, int num_heads, int num_kv_heads, int head_dim,
                        int block_size, int max_blocks, int num_splits, int partition_size, float scale) {
  const int seq = blockIdx.x;
  const int group = num_heads / num_kv_heads;
  const int head_tiles = (group + GQ_TILE - 1) / GQ_TILE;
  const int kvh = blockIdx.y / head_tiles;
  const int h0 = kvh * group + (blockIdx.y % head_tiles) * GQ_TILE;
  const int nh = min(GQ_TILE, kvh * group + group - h0);
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ctx = context_lens[seq];
  // with a shared prefix, tokens [0, rs) were attended by the prefix kernel: walk [rs, ctx) only
  const int rs = row_start ? row_start[seq] : 0;
  const int start = rs + split * partition_size;
  const int end = min(ctx, start + partition_size);
  const bool lane_on = lane * VPL < head_dim;

  if (start >= end) {  // an empty partition (short sequence in a long-context launch)
    if (num_splits > 1 && threadIdx.x < nh) {
      const long base = ((long)seq * num_heads + h0 + threadIdx.x) * num_splits + split;
      ws_ml[base * 2] = -INFINITY;
      ws_ml[base * 2 + 1] = 0.f;
    }
    return;
  }

  float qv[GQ_TILE][VPL], acc[GQ_TILE][VPL], m[GQ_TILE], l[GQ_TILE];
#pragma unroll
  for (int g = 0; g < GQ_TILE; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) { qv[g][i] = 0.f; acc[g][i] = 0.f; }
    if (g < nh && lane_on) {
      load_row<T, VPL>(q + ((long)seq * num_heads + h0 + g) * head_dim + lane * VPL, qv[g]);
#pragma unroll
      for (int i = 0; i < VPL; ++i) qv[g][i] *= scale;
    }
  }
  // Warp 0 of split 0 starts from the prefix's (max, sum, acc); the warp merge below folds it in.
  if (rs > 0 && split == 0 && warp == 0) {
#pragma unroll
    for (int g = 0; g < GQ_TILE; ++g) {
      if (g >= nh) break;
      const long hrow = (long)seq * num_heads + h0 + g;
      m[g] = prefix_ml[hrow * 2];
      l[g] = prefix_ml[hrow * 2 + 1];
      if (lane_on) {
#pragma unroll
        for (int i = 0; i < VPL; ++i) acc[g][i] = prefix_acc[hrow * head_dim + lane * VPL + i];
      }
    }
  }

  // Each warp takes U consecutive tokens per iteration and issues all their K/V loads before any
  // math, so enough bytes are in flight to keep HBM busy at modest occupancy.
  constexpr int U = VPL >= 8 ? 2 : 4;
  const int* table = block_tables + (long)seq * max_blocks;
  for (int t0 = start + warp * U; t0 < end; t0 += kWarps * U) {
    float kr[U][VPL], vr[U][VPL];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u;
#pragma unroll
      for (int i = 0; i < VPL; ++i) { kr[u][i] = 0.f; vr[u][i] = 0.f; }
      if (t < end && lane_on) {
        const long row = (((long)table[t / block_size] * block_size + t % block_size) * num_kv_heads + kvh) * head_dim;
        load_row<T, VPL>(k_cache + row + lane * VPL, kr[u]);
        load_row<T, VPL>(v_cache + row + lane * VPL, vr[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (t0 + u >= end) break;
#pragma unroll
      for (int g = 0; g < GQ_TILE; ++g) {
        if (g >= nh) break;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < VPL; ++i) s += qv[g][i] * kr[u][i];
        s = warp_sum(s);
        const float m_new = fmaxf(m[g], s);
        const float corr = __expf(m[g] - m_new);
        const float p = __expf(s - m_new);
        l[g] = l[g] * corr + p;
#pragma unroll
        for (int i = 0; i < VPL; ++i) acc[g][i] = acc[g][i] * corr + p * vr[u][i];
        m[g] = m_new;
      }
    }
  }

  __shared__ float s_m[kWarps][GQ_TILE], s_l[kWarps][GQ_TILE];
  __shared__ float s_acc[kWarps][GQ_TILE][kMaxDim];
#pragma unroll
  for (int g = 0; g < GQ_TILE; ++g) {
    if (lane == 0) { s_m[warp][g] = m[g]; s_l[warp][g] = l[g]; }
    if (lane_on) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) s_acc[warp][g][lane * VPL + i] = acc[g][i];
    }
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < nh * head_dim; idx += kWarps * 32) {
    const int g = idx / head_dim, d = idx % head_dim;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w][g]);
    float sum = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float c = s_l[w][g] > 0.f ? __expf(s_m[w][g] - mx) : 0.f;
      sum += s_l[w][g] * c;
      a += s_acc[w][g][d] * c;
    }
    const long hrow = (long)seq * num_heads + h0 + g;
    if (num_splits == 1) {
      out[hrow * head_dim + d] = from_float<T>(a / sum);
    } else {
      const long base = hrow * num_splits + split;
      ws_acc[base * head_dim + d] = a;
      if (d == 0) { ws_ml[base * 2] = mx; ws_ml[base * 2 + 1] = sum; }
    }
  }
}

// Merge the partitions of one (sequence, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
template <typename T>
__global__ void decode_reduce_kernel(T* __restrict__ out, const float* __restrict__ ws_acc,
                                     const float* __restrict__ ws_ml, int head_dim, int num_splits) {
  const long hrow = (long)blockIdx.x * gridDim.y + blockIdx.y;
  const float* ml = ws_ml + hrow * num_splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < num_splits; ++s)
    if (ml[2 * s + 1] > 0.f) mx = fmaxf(mx, ml[2 * s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.f, a = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float l = ml[2 * s + 1];
      if (l <= 0.f) continue;
      const float c = __expf(ml[2 * s] - mx);
      sum += l * c;
      a += ws_acc[(hrow * num_splits + s) * head_dim + d] * c;
    }
    out[hrow * head_dim + d] = from_float<T>(a / sum);
  }
}

template <typename T, int VPL, int GQ_TILE>
void launch(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const int head_tiles = (group + GQ_TILE - 1) / GQ_TILE;
  dim3 grid(static_cast<unsigned>(a.num_seqs), static_cast<unsigned>(a.num_kv_heads * head_tiles),
            static_cast<unsigned>(a.num_splits));
  decode_partition_kernel<T, VPL, GQ_TILE><<<grid, kWarps * 32, 0, stream>>>(
      as_ptr<T>(a.out), as_ptr<const T>(a.q), as_ptr<const T>(a.k_cache), as_ptr<const T>(a.v_cache),
      as_ptr<const int>(a.block_tables), as_ptr<const int>(a.context_lens), as_ptr<float>(a.workspace_acc),
      as_ptr<float>(a.workspace_ml), as_ptr<const int>(a.row_start), as_ptr<const float>(a.prefix_ml),
      as_ptr<const float>(a.prefix_acc), static_cast<int>(a.num_heads), static_cast<int>(a.num_kv_heads),
      static_cast<int>(a.head_dim), static_cast<int>(a.block_size), static_cast<int>(a.max_blocks_per_seq),
      static_cast<int>(a.num_splits), static_cast<int>(a.partition_size), a.scale);
  if (a.num_splits > 1) {
    dim3 rgrid(static_cast<unsigned>(a.num_seqs), static_cast<unsigned>(a.num_heads));
    const int threads = static_cast<int>(((a.head_dim + 31) / 32) * 32);
    decode_reduce_kernel<T><<<rgrid, threads, 0, stream>>>(as_ptr<T>(a.out), as_ptr<const float>(a.workspace_acc),
                                                           as_ptr<const float>(a.workspace_ml),
                                                           static_cast<int>(a.head_dim), static_cast<int>(a.num_splits));
  }
}

template <typename T, int VPL>
void dispatch_group(const DecodeAttentionArgs& a, cudaStream_t stream) {
  const auto group = a.num_heads / a.num_kv_heads;
  if (group == 1) launch<T, VPL, 1>(a, stream);
  else if (group == 2) launch<T, VPL, 2>(a, stream);
  else if (group <= 4) launch<T, VPL, 4>(a, stream);
  else {
    // A tile of 6 (Qwen2.5-1.5B's group) at head_dim 128 needs 123 registers on sm_90a against the
    // 8-tile's 146 (ptxas -v): four CTAs per SM instead of three, more K/V bytes in flight. At
    // head_dim <= 64 both tiles fit anyway, and ptxas spills a few bytes in the 6-tile build there.
    if constexpr (VPL >= 4) {
      if (group <= 6) return launch<T, VPL, 6>(a, stream);
    }
    launch<T, VPL, 8>(a, stream);
  }
}

template <typename T>
void dispatch_dim(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if (a.head_dim <= 32) dispatch_group<T, 1>(a, stream);
  else if (a.head_dim <= 64) dispatch_group<T, 2>(a, stream);
  else if (a.head_dim <= 128) dispatch_group<T, 4>(a, stream);
  else dispatch_group<T, 8>(a, stream);
}

}  // namespace

void decode_attention_cuda(const DecodeAttentionArgs& a, std::uintptr_t stream_handle) {
  require_cuda("decode_attention_cuda");
  if (a.num_seqs == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (a.dtype == 0) dispatch_dim<float>(a, stream);
  else if (a.dtype == 1) dispatch_dim<__half>(a, stream);
  else dispatch_dim<__nv_bfloat16>(a, stream);
  check_launch("decode_attention_cuda");
}

}  // namespace r1fast
