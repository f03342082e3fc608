// KV-cache block manager for the rollout engine (host side, no CUDA).
//
// A fixed pool of `num_blocks` blocks of `block_size` token slots. Each sequence owns a block
// table (block ids in token order); a token at position p lives in slot
// table[p / block_size] * block_size + p % block_size of the paged cache
// (layout [num_blocks, block_size, num_kv_heads, head_dim], see kv_cache.h).
//
// Rules (mirrored by the plain-Python model in tests/test_block_manager.py):
// - reference counts: a block is free when its count is 0; free blocks sit in an LRU queue,
//   freed blocks go to the back, fresh allocations take the front. A sequence's blocks are freed
//   last-to-first so that a prompt's first blocks are evicted last.
// - fork(parent, child): the child shares every block of the parent (counts + 1). G samples of a
//   prompt are one prefill and G - 1 forks.
// - append(seq, token): reserves the slot of the next position. A new block is taken when the
//   position starts a block; when the last block is partial and shared, it is copied on write:
//   the sequence gets a fresh block and the caller must copy the src block's KV into it
//   (returned as a (src, dst) pair) before the step's attention runs.
// - prefix cache (optional): a full block whose KV has been computed (mark_computed) is keyed by
//   a hash of its tokens chained with the previous block's key. allocate() reuses cached blocks
//   for the leading full blocks of a new sequence, never the block holding the last token (its
//   logits must be computed). Cached blocks stay reusable while free, until the LRU queue hands
//   them out again. reset_prefix_cache() forgets every key: after a weight update no stale KV is
//   ever reused. A hit also compares the block's own tokens, so a 64-bit collision would have to match
//   those too; the earlier blocks of the chain are compared only through the chained key.
//   A block holding a token appended as unknown (kUnknownToken: the engine appends a decode step's
//   slots before its tokens are sampled) is never registered, nor any block after it.
//   Sequences alive at a reset never register blocks afterwards: their KV chains back to stale
//   blocks (a later block's KV attended to them), so it must not be handed to new sequences.
// - token ids are >= 0 (kUnknownToken only through append_batch(tokens=None)); every int argument is
//   range-checked by the bindings (ValueError naming it and its range), not cast by pybind.
// - threads: no internal locking. Every method runs under the GIL (the bindings never release it),
//   which serialises callers; do not share one instance across free-threaded interpreters.
#pragma once
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

namespace r1fast {

constexpr std::int32_t kUnknownToken = -1;

// The largest pool: its bookkeeping costs ~90 bytes of host memory a block (6 GB here), and
// 2**31 - 1 blocks (what int32 block ids allow) would have taken ~190 GB before the first sequence.
// A real cache never comes near: the smallest KV per token of a supported model (Qwen2.5-0.5B,
// bf16: 24 layers x K,V x 2 heads x 64 x 2 bytes = 12 KiB) fills a 141 GB H200 with ~11.5M tokens,
// i.e. fewer blocks than this even at block_size 1.
constexpr std::int64_t kMaxBlocks = std::int64_t{1} << 26;

class BlockManager {
 public:
  BlockManager(std::int64_t num_blocks, std::int64_t block_size, bool enable_prefix_caching);

  std::int64_t num_blocks() const { return static_cast<std::int64_t>(blocks_.size()); }
  std::int64_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  std::int64_t num_free_blocks() const { return static_cast<std::int64_t>(free_.size()); }
  std::int64_t num_cached_blocks() const { return static_cast<std::int64_t>(cache_.size()); }
  bool has_seq(std::int64_t seq) const { return seqs_.count(seq) != 0; }

  // Blocks a new sequence with these tokens would take from the free queue (prefix hits on blocks
  // in use by others cost nothing; hits on free cached blocks still take them out of the queue).
  std::int64_t blocks_to_allocate(const std::int32_t* tokens, std::int64_t n) const;
  // Allocates the whole token list; returns the number of leading tokens whose KV is cached.
  std::int64_t allocate(std::int64_t seq, const std::int32_t* tokens, std::int64_t n);
  void fork(std::int64_t parent, std::int64_t child);
  // Blocks append(seq) would take now (0 or 1).
  std::int64_t blocks_to_append(std::int64_t seq) const;
  // Blocks appending one token to each of these (distinct) sequences, in order, would take: a shared
  // partial block held by k of them and r sequences in all is copied min(k, r - 1) times (the last
  // holder writes it in place), so G forks of a prompt need G - 1 copies, not G.
  std::int64_t blocks_to_append(const std::int64_t* seqs, std::int64_t n) const;
  // Returns the slot of the new token; *copy_src/*copy_dst = -1 unless a copy-on-write happened.
  std::int64_t append(std::int64_t seq, std::int32_t token, std::int32_t* copy_src, std::int32_t* copy_dst);
  // The first n tokens of seq have their KV in the cache: register its full blocks for reuse.
  void mark_computed(std::int64_t seq, std::int64_t n);
  void free(std::int64_t seq);
  void reset_prefix_cache();

  std::int64_t num_tokens(std::int64_t seq) const { return get(seq).tokens.size(); }
  const std::vector<std::int32_t>& table(std::int64_t seq) const { return get(seq).table; }
  std::int32_t ref_count(std::int64_t block) const;
  std::vector<std::int64_t> seq_ids() const;
  // Invariants, checked from scratch (tests): counts equal table references, free queue = count 0.
  void check_invariants() const;

 private:
  struct Block {
    std::int32_t ref = 0;
    bool hashed = false;
    std::uint64_t hash = 0;
    std::vector<std::int32_t> tokens;  // the block's tokens when hashed (collision check)
    std::list<std::int32_t>::iterator free_pos;
    bool in_free = false;
  };
  struct Seq {
    std::vector<std::int32_t> table;
    std::vector<std::int32_t> tokens;
    std::int64_t num_hashed = 0;  // leading blocks whose key is known (registered or hit)
    std::uint64_t last_hash = 0;  // key of block num_hashed - 1
    bool cacheable = true;        // false once a reset_prefix_cache() happened while it was alive
  };

  const Seq& get(std::int64_t seq) const;
  Seq& get(std::int64_t seq);
  std::int32_t take_free();            // front of the LRU queue, its stale key dropped
  void take_cached(std::int32_t b);    // a cache hit: out of the free queue if there, count + 1
  void release(std::int32_t b);
  std::uint64_t block_hash(std::uint64_t prev, const std::int32_t* tokens) const;
  // Cached block holding tokens[i*bs:(i+1)*bs] after a chain key `prev`, or -1.
  std::int32_t lookup(std::uint64_t key, const std::int32_t* tokens) const;

  std::int64_t block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::list<std::int32_t> free_;
  std::unordered_map<std::int64_t, Seq> seqs_;
  std::unordered_map<std::uint64_t, std::int32_t> cache_;
};

}  // namespace r1fast
