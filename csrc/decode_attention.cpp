#include "decode_attention.h"

#include "bindings.h"
#include "common.h"

namespace r1fast {

static void check_args(const DecodeAttentionArgs& a) {
  if (a.num_seqs < 0) fail("decode_attention: num_seqs must be >= 0, got ", a.num_seqs);
  if (a.num_heads <= 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0)
    fail("decode_attention: num_heads (", a.num_heads, ") must be a positive multiple of num_kv_heads (",
         a.num_kv_heads, ")");
  if (a.num_heads / a.num_kv_heads > 64)
    fail("decode_attention: at most 64 query heads per KV head, got ", a.num_heads / a.num_kv_heads);
  if (a.head_dim <= 0 || a.head_dim > 256 || a.head_dim % 8 != 0)
    fail("decode_attention: head_dim must be a multiple of 8 in [8, 256], got ", a.head_dim);
  if (a.num_blocks <= 0 || a.block_size <= 0 || a.max_blocks_per_seq <= 0)
    fail("decode_attention: num_blocks, block_size, max_blocks_per_seq must be > 0");
  if (a.num_splits <= 0 || a.partition_size <= 0 || a.partition_size % a.block_size != 0)
    fail("decode_attention: num_splits must be > 0 and partition_size a positive multiple of block_size, got ",
         a.num_splits, ", ", a.partition_size);
  if (a.num_splits > 1 && (!a.workspace_acc || !a.workspace_ml))
    fail("decode_attention: num_splits > 1 needs both workspaces");
  // Launch grid: x = sequences (< 2^31), y = KV heads x head tiles (<= num_heads) and the merge's
  // heads, z = splits; CUDA caps y and z at 65535. Sizes are passed to the kernel as int.
  if (a.num_seqs > 2147483647LL) fail("decode_attention: num_seqs ", a.num_seqs, " exceeds 2^31 - 1");
  if (a.num_heads > 65535) fail("decode_attention: num_heads ", a.num_heads, " exceeds the grid limit 65535");
  if (a.num_splits > 65535) fail("decode_attention: num_splits ", a.num_splits, " exceeds the grid limit 65535");
  if (a.block_size > 2147483647LL || a.max_blocks_per_seq > 2147483647LL || a.partition_size > 2147483647LL ||
      a.max_blocks_per_seq * a.block_size > 2147483647LL)
    fail("decode_attention: block_size, max_blocks_per_seq and the context they span must fit in int32");
  // The kernel walks tokens [split * partition_size, (split + 1) * partition_size) in int, up to 16
  // past the end; tokens past num_splits * partition_size would be silently left out.
  if (a.num_splits * a.partition_size < a.max_blocks_per_seq * a.block_size)
    fail("decode_attention: num_splits (", a.num_splits, ") x partition_size (", a.partition_size,
         ") does not cover max_blocks_per_seq x block_size (", a.max_blocks_per_seq * a.block_size, " tokens)");
  // (twice with a shared prefix: a row's partitions start at its row_start, below the table's span)
  const std::int64_t span = a.num_splits * a.partition_size * (a.row_start ? 2 : 1);
  if (span > 2147483647LL - 64)
    fail("decode_attention: num_splits x partition_size (", a.num_splits * a.partition_size,
         a.row_start ? ", doubled with a shared prefix" : "", ") must stay below 2^31 - 64");
  if ((a.row_start != 0) != (a.prefix_ml != 0) || (a.row_start != 0) != (a.prefix_acc != 0))
    fail("decode_attention: row_start, prefix_ml and prefix_acc are given together or not at all");
  if (a.dtype < 0 || a.dtype > 2) fail("decode_attention: dtype code must be 0, 1 or 2, got ", a.dtype);
  if (a.num_seqs > 0 && (!a.out || !a.q || !a.k_cache || !a.v_cache || !a.block_tables || !a.context_lens))
    fail("decode_attention: null pointer");
}

void register_decode_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("decode_attention_cuda",
        [](std::uintptr_t out, std::uintptr_t q, std::uintptr_t kc, std::uintptr_t vc, std::uintptr_t bt,
           std::uintptr_t cl, std::uintptr_t ws_acc, std::uintptr_t ws_ml, std::uintptr_t row_start,
           std::uintptr_t prefix_ml, std::uintptr_t prefix_acc, std::int64_t num_seqs, std::int64_t num_heads,
           std::int64_t num_kv_heads, std::int64_t head_dim, std::int64_t num_blocks, std::int64_t block_size,
           std::int64_t max_blocks, std::int64_t num_splits, std::int64_t partition_size, float scale, int dtype,
           std::uintptr_t stream) {
          DecodeAttentionArgs a{out, q, kc, vc, bt, cl, ws_acc, ws_ml, row_start, prefix_ml, prefix_acc, num_seqs, num_heads, num_kv_heads, head_dim,
                                num_blocks, block_size, max_blocks, num_splits, partition_size, scale, dtype};
          check_args(a);
#ifdef R1FAST_WITH_CUDA
          decode_attention_cuda(a, stream);
#else
          (void)stream;
          require_cuda("decode_attention_cuda");
#endif
        },
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("workspace_acc"), py::arg("workspace_ml"), py::arg("row_start"),
        py::arg("prefix_ml"), py::arg("prefix_acc"), py::arg("num_seqs"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("num_blocks"),
        py::arg("block_size"), py::arg("max_blocks_per_seq"), py::arg("num_splits"), py::arg("partition_size"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "Paged decode attention on the given stream (use r1fast.ops.paged_decode_attention, which validates).");
}

}  // namespace r1fast
