#include "block_manager.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_set>

#include "bindings.h"
#include "common.h"

namespace r1fast {

BlockManager::BlockManager(std::int64_t num_blocks, std::int64_t block_size, bool enable_prefix_caching)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching) {
  if (num_blocks <= 0) fail("BlockManager: num_blocks must be > 0, got ", num_blocks);
  if (num_blocks > kMaxBlocks)
    fail("BlockManager: num_blocks = ", num_blocks, " exceeds the limit ", kMaxBlocks, " (2**26): the pool's "
         "bookkeeping alone takes ~90 bytes of host memory a block, and no real KV cache (an H200's, even at "
         "block_size 1) has more blocks");
  if (block_size <= 0) fail("BlockManager: block_size must be > 0, got ", block_size);
  // slots (block id x block_size) must fit in int64; the kernels take block_size as int32
  if (block_size > INT32_MAX) fail("BlockManager: block_size must fit in int32, got ", block_size);
  blocks_.resize(num_blocks);
  for (std::int32_t b = 0; b < static_cast<std::int32_t>(num_blocks); ++b) {
    blocks_[b].free_pos = free_.insert(free_.end(), b);
    blocks_[b].in_free = true;
  }
}

const BlockManager::Seq& BlockManager::get(std::int64_t seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("BlockManager: unknown sequence id ", seq);
  return it->second;
}

BlockManager::Seq& BlockManager::get(std::int64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("BlockManager: unknown sequence id ", seq);
  return it->second;
}

std::int32_t BlockManager::ref_count(std::int64_t block) const {
  if (block < 0 || block >= num_blocks()) fail("BlockManager: block id ", block, " outside [0, ", num_blocks(), ")");
  return blocks_[block].ref;
}

std::vector<std::int64_t> BlockManager::seq_ids() const {
  std::vector<std::int64_t> ids;
  for (const auto& kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

// FNV-1a over the chain key and the block's tokens, then a splitmix finaliser.
std::uint64_t BlockManager::block_hash(std::uint64_t prev, const std::int32_t* tokens) const {
  std::uint64_t h = 1469598103934665603ULL ^ prev;
  for (std::int64_t i = 0; i < block_size_; ++i) {
    h ^= static_cast<std::uint32_t>(tokens[i]);
    h *= 1099511628211ULL;
  }
  h ^= h >> 30; h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27; h *= 0x94d049bb133111ebULL;
  return h ^ (h >> 31);
}

std::int32_t BlockManager::lookup(std::uint64_t key, const std::int32_t* tokens) const {
  auto it = cache_.find(key);
  if (it == cache_.end()) return -1;
  const Block& b = blocks_[it->second];
  if (!std::equal(b.tokens.begin(), b.tokens.end(), tokens)) return -1;
  return it->second;
}

std::int32_t BlockManager::take_free() {
  if (free_.empty()) fail("BlockManager: no free KV blocks (check blocks_to_allocate/blocks_to_append first)");
  const std::int32_t b = free_.front();
  free_.pop_front();
  Block& blk = blocks_[b];
  blk.in_free = false;
  if (blk.hashed) {  // its old content is overwritten: forget the key
    auto it = cache_.find(blk.hash);
    if (it != cache_.end() && it->second == b) cache_.erase(it);
    blk.hashed = false;
    blk.tokens.clear();
  }
  blk.ref = 1;
  return b;
}

void BlockManager::take_cached(std::int32_t b) {
  Block& blk = blocks_[b];
  if (blk.in_free) {
    free_.erase(blk.free_pos);
    blk.in_free = false;
  }
  blk.ref += 1;
}

void BlockManager::release(std::int32_t b) {
  Block& blk = blocks_[b];
  if (blk.ref <= 0) fail("BlockManager: double free of block ", b);
  if (--blk.ref == 0) {
    blk.free_pos = free_.insert(free_.end(), b);
    blk.in_free = true;
  }
}

// Token ids are >= 0; a negative id would be taken for an unknown token (kUnknownToken) and silently
// keep its block out of the prefix cache.
static void check_token_ids(const std::int32_t* tokens, std::int64_t n) {
  const auto bad = std::find_if(tokens, tokens + n, [](std::int32_t t) { return t < 0; });
  if (bad != tokens + n)
    fail("BlockManager: tokens[", bad - tokens, "] = ", *bad, " is negative; token ids lie in [0, ", INT32_MAX, "]");
}

std::int64_t BlockManager::blocks_to_allocate(const std::int32_t* tokens, std::int64_t n) const {
  if (n <= 0) fail("BlockManager: a sequence needs at least one token, got ", n);
  check_token_ids(tokens, n);
  const std::int64_t total = (n + block_size_ - 1) / block_size_;
  if (!prefix_caching_) return total;
  std::int64_t in_use_hits = 0;
  std::uint64_t key = 0;
  const std::int64_t max_hits = (n - 1) / block_size_;
  for (std::int64_t i = 0; i < max_hits; ++i) {
    key = block_hash(key, tokens + i * block_size_);
    const std::int32_t b = lookup(key, tokens + i * block_size_);
    if (b < 0) break;
    if (blocks_[b].ref > 0) ++in_use_hits;
  }
  return total - in_use_hits;
}

std::int64_t BlockManager::allocate(std::int64_t seq, const std::int32_t* tokens, std::int64_t n) {
  if (seqs_.count(seq)) fail("BlockManager: sequence id ", seq, " is already allocated");
  const std::int64_t need = blocks_to_allocate(tokens, n);
  if (need > num_free_blocks())
    fail("BlockManager: allocate needs ", need, " free blocks, ", num_free_blocks(), " are free");
  Seq s;
  s.tokens.assign(tokens, tokens + n);
  const std::int64_t total = (n + block_size_ - 1) / block_size_;
  std::int64_t i = 0;
  if (prefix_caching_) {
    const std::int64_t max_hits = (n - 1) / block_size_;
    std::uint64_t key = 0;
    for (; i < max_hits; ++i) {
      const std::uint64_t next = block_hash(key, tokens + i * block_size_);
      const std::int32_t b = lookup(next, tokens + i * block_size_);
      if (b < 0) break;
      take_cached(b);
      s.table.push_back(b);
      key = next;
    }
    s.num_hashed = i;
    s.last_hash = key;
  }
  const std::int64_t cached_tokens = i * block_size_;
  for (; i < total; ++i) s.table.push_back(take_free());
  seqs_.emplace(seq, std::move(s));
  return cached_tokens;
}

void BlockManager::fork(std::int64_t parent, std::int64_t child) {
  if (seqs_.count(child)) fail("BlockManager: fork target id ", child, " is already allocated");
  Seq s = get(parent);
  for (std::int32_t b : s.table) blocks_[b].ref += 1;
  seqs_.emplace(child, std::move(s));
}

std::int64_t BlockManager::blocks_to_append(std::int64_t seq) const {
  const Seq& s = get(seq);
  const std::int64_t pos = static_cast<std::int64_t>(s.tokens.size());
  if (pos % block_size_ == 0) return 1;
  return blocks_[s.table.back()].ref > 1 ? 1 : 0;
}

std::int64_t BlockManager::blocks_to_append(const std::int64_t* seqs, std::int64_t n) const {
  std::int64_t need = 0;
  std::unordered_map<std::int32_t, std::int64_t> holders;  // shared partial block -> holders appending
  for (std::int64_t i = 0; i < n; ++i) {
    const Seq& s = get(seqs[i]);
    if (s.tokens.size() % block_size_ == 0) {
      need += 1;
    } else if (blocks_[s.table.back()].ref > 1) {
      holders[s.table.back()] += 1;
    }
  }
  for (const auto& [block, k] : holders) need += std::min<std::int64_t>(k, blocks_[block].ref - 1);
  return need;
}

std::int64_t BlockManager::append(std::int64_t seq, std::int32_t token, std::int32_t* copy_src,
                                  std::int32_t* copy_dst) {
  if (token < 0 && token != kUnknownToken)
    fail("BlockManager.append: token id ", token, " is negative; token ids lie in [0, ", INT32_MAX, "]");
  Seq& s = get(seq);
  *copy_src = *copy_dst = -1;
  const std::int64_t pos = static_cast<std::int64_t>(s.tokens.size());
  if (pos % block_size_ == 0) {
    s.table.push_back(take_free());
  } else {
    const std::int32_t last = s.table.back();
    if (blocks_[last].ref > 1) {  // copy-on-write of a shared partial block
      const std::int32_t fresh = take_free();
      release(last);
      s.table.back() = fresh;
      *copy_src = last;
      *copy_dst = fresh;
    }
  }
  s.tokens.push_back(token);
  return static_cast<std::int64_t>(s.table[pos / block_size_]) * block_size_ + pos % block_size_;
}

void BlockManager::mark_computed(std::int64_t seq, std::int64_t n) {
  Seq& s = get(seq);
  if (n < 0 || n > static_cast<std::int64_t>(s.tokens.size()))
    fail("BlockManager: mark_computed(", n, ") outside [0, ", s.tokens.size(), "] tokens of sequence ", seq);
  if (!prefix_caching_ || !s.cacheable) return;
  while ((s.num_hashed + 1) * block_size_ <= n) {
    const std::int32_t* toks = s.tokens.data() + s.num_hashed * block_size_;
    // a token appended unknown (still being sampled) has no key: neither its block nor any after it
    if (std::any_of(toks, toks + block_size_, [](std::int32_t t) { return t < 0; })) return;
    const std::uint64_t key = block_hash(s.last_hash, toks);
    const std::int32_t b = s.table[s.num_hashed];
    if (!cache_.count(key) && !blocks_[b].hashed) {
      Block& blk = blocks_[b];
      blk.hashed = true;
      blk.hash = key;
      blk.tokens.assign(toks, toks + block_size_);
      cache_.emplace(key, b);
    }
    s.last_hash = key;
    s.num_hashed += 1;
  }
}

void BlockManager::free(std::int64_t seq) {
  Seq& s = get(seq);
  for (auto it = s.table.rbegin(); it != s.table.rend(); ++it) release(*it);
  seqs_.erase(seq);
}

void BlockManager::reset_prefix_cache() {
  for (auto& kv : cache_) {
    Block& blk = blocks_[kv.second];
    blk.hashed = false;
    blk.tokens.clear();
  }
  cache_.clear();
  for (auto& kv : seqs_) kv.second.cacheable = false;
}

void BlockManager::check_invariants() const {
  std::vector<std::int32_t> refs(blocks_.size(), 0);
  for (const auto& kv : seqs_) {
    const Seq& s = kv.second;
    const std::int64_t need = (static_cast<std::int64_t>(s.tokens.size()) + block_size_ - 1) / block_size_;
    if (static_cast<std::int64_t>(s.table.size()) != need)
      fail("invariant: sequence ", kv.first, " has ", s.table.size(), " blocks for ", s.tokens.size(), " tokens");
    for (std::int32_t b : s.table) refs[b] += 1;
  }
  std::int64_t free_count = 0;
  for (std::size_t b = 0; b < blocks_.size(); ++b) {
    if (refs[b] != blocks_[b].ref) fail("invariant: block ", b, " count ", blocks_[b].ref, " != ", refs[b], " users");
    if (blocks_[b].in_free != (refs[b] == 0)) fail("invariant: block ", b, " free-queue membership is wrong");
    free_count += refs[b] == 0;
  }
  if (free_count != num_free_blocks()) fail("invariant: free queue holds ", num_free_blocks(), ", expected ", free_count);
  for (const auto& kv : cache_) {
    const Block& blk = blocks_[kv.second];
    if (!blk.hashed || blk.hash != kv.first) fail("invariant: cache entry for block ", kv.second, " is stale");
  }
}

namespace {
namespace py = pybind11;
using I32 = py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// A 1-D integer array (or list of ints) as a C-contiguous array of T. Taking py::object instead of
// a forcecast array_t: forcecast would silently truncate floats and wrap int64 -> int32. An array
// already of type T is passed through without a copy.
template <typename T>
py::array_t<T, py::array::c_style | py::array::forcecast> int_array(const py::object& obj, const char* name) {
  py::array a = py::array::ensure(obj);
  if (!a) fail("BlockManager: ", name, " must be a 1-D integer array");
  if (a.ndim() != 1) fail("BlockManager: ", name, " must be 1-D, got ", a.ndim(), " dimensions");
  const char kind = a.dtype().kind();
  if (a.size() > 0 && kind != 'i' && kind != 'u')
    fail("BlockManager: ", name, " must hold integers, got dtype ", std::string(py::str(a.dtype())));
  const bool may_overflow = a.size() > 0 && (static_cast<std::size_t>(a.itemsize()) > sizeof(T) ||
                                             (kind == 'u' && static_cast<std::size_t>(a.itemsize()) >= sizeof(T)));
  if (may_overflow) {
    constexpr auto lo = static_cast<std::int64_t>(std::numeric_limits<T>::min());
    constexpr auto hi = static_cast<std::uint64_t>(std::numeric_limits<T>::max());
    if (kind == 'u') {
      auto u = py::array_t<std::uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
      const auto mx = *std::max_element(u.data(), u.data() + u.size());
      if (mx > hi) fail("BlockManager: ", name, " value ", mx, " does not fit in ", sizeof(T) * 8, "-bit ints");
    } else {
      auto w = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
      const auto mm = std::minmax_element(w.data(), w.data() + w.size());
      if (*mm.first < lo || (*mm.second > 0 && static_cast<std::uint64_t>(*mm.second) > hi))
        fail("BlockManager: ", name, " values [", *mm.first, ", ", *mm.second, "] do not fit in ", sizeof(T) * 8,
             "-bit ints");
    }
  }
  auto out = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!out) fail("BlockManager: ", name, " cannot be read as ", sizeof(T) * 8, "-bit ints");
  return out;
}
I32 i32_array(const py::object& o, const char* name) { return int_array<std::int32_t>(o, name); }
I64 i64_array(const py::object& o, const char* name) { return int_array<std::int64_t>(o, name); }

constexpr std::int64_t kI64Min = std::numeric_limits<std::int64_t>::min();
constexpr std::int64_t kI64Max = std::numeric_limits<std::int64_t>::max();

// Whether obj holds several values (a sequence, or an array or tensor of one or more dimensions) rather than
// one. Tensors are read through __array__, as the array arguments read them: a 1-D tensor's __index__ answers
// only for one element, so blocks_to_append(torch.tensor([1, 2])) failed inside int_arg.
bool is_array_of_values(const py::handle& obj) {
  if (PyLong_Check(obj.ptr())) return false;
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj).ndim() != 0;  // 0-d: one value
  if (py::isinstance<py::sequence>(obj)) return true;
  const py::array a = py::array::ensure(obj);  // null (error cleared) where numpy cannot read obj
  return a && a.ndim() != 0;
}

// A bool, numpy bool or bool tensor: the last two have an __index__ too (torch.tensor(True) read as 1).
bool holds_bool(const py::handle& obj) {
  if (PyLong_Check(obj.ptr())) return PyBool_Check(obj.ptr());
  const py::array a = py::array::ensure(obj);
  return a && a.dtype().kind() == 'b';
}

[[noreturn]] void not_an_int(const py::handle& value, const char* fn, const char* name) {
  std::string got = py::str(py::type::of(value).attr("__name__"));
  if (py::hasattr(value, "dtype")) {  // a 0-d array or tensor; numpy scalars are named by their dtype already
    const std::string dtype = py::str(value.attr("dtype"));
    if (dtype != got) got += " of dtype " + dtype;
  }
  throw py::type_error(std::string("BlockManager.") + fn + ": " + name + " must be an int, got " + got);
}

// A Python int argument (or a numpy integer) checked against [lo, hi]. Taking py::object instead of
// std::int64_t/int32_t: pybind's casters turned an out-of-range int into "incompatible function
// arguments", which names neither the argument nor the range.
std::int64_t int_arg(const py::handle& value, const char* fn, const char* name, std::int64_t lo, std::int64_t hi) {
  if (holds_bool(value) || !PyIndex_Check(value.ptr()) || is_array_of_values(value)) not_an_int(value, fn, name);
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) {  // a 0-d float array or tensor has an __index__ that refuses, naming neither fn nor name
    PyErr_Clear();
    not_an_int(value, fn, name);
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || v < lo || v > hi)
    fail("BlockManager.", fn, ": ", name, " = ", std::string(py::str(index)), " lies outside [", lo, ", ", hi, "]");
  return v;
}
// A True/False argument. Taking py::object instead of bool: pybind's caster read any number or None as a
// bool (enable_prefix_caching=0.0 or None was off, 2 on) and answered a string with "incompatible constructor
// arguments". numpy bools and 0-d bool tensors are bools too.
bool bool_arg(const py::handle& value, const char* fn, const char* name) {
  if (!holds_bool(value) || is_array_of_values(value)) {
    std::string got = py::str(py::type::of(value).attr("__name__"));
    throw py::type_error(std::string("BlockManager.") + fn + ": " + name + " must be True or False, got " +
                         std::string(py::repr(value)) + " (" + got + ")");
  }
  return PyObject_IsTrue(value.ptr()) == 1;
}

std::int64_t seq_arg(const py::handle& v, const char* fn, const char* name = "seq_id") {
  return int_arg(v, fn, name, kI64Min, kI64Max);
}

}  // namespace

void register_block_manager(py::module_& m) {
  py::class_<BlockManager>(m, "BlockManager",
                           "Paged KV-cache block manager (rules in csrc/block_manager.h). Used by r1fast.rollout.")
      .def(py::init([](const py::object& num_blocks, const py::object& block_size, const py::object& prefix_caching) {
        // not by value: the blocks hold iterators into the free list
        return std::make_unique<BlockManager>(int_arg(num_blocks, "__init__", "num_blocks", 1, kI64Max),
                                              int_arg(block_size, "__init__", "block_size", 1, INT32_MAX),
                                              bool_arg(prefix_caching, "__init__", "enable_prefix_caching"));
      }), py::arg("num_blocks"), py::arg("block_size"), py::arg("enable_prefix_caching") = true)
      .def_property_readonly_static("max_num_blocks", [](const py::object&) { return kMaxBlocks; },
                                    "The largest num_blocks a pool may have (2**26).")
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("prefix_caching", &BlockManager::prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks)
      .def("has_seq", [](const BlockManager& bm, const py::object& seq) {
        return bm.has_seq(seq_arg(seq, "has_seq"));
      }, py::arg("seq_id"))
      .def("seq_ids", &BlockManager::seq_ids)
      .def("blocks_to_allocate", [](const BlockManager& bm, const py::object& obj) {
        const I32 tokens = i32_array(obj, "tokens");
        return bm.blocks_to_allocate(tokens.data(), tokens.shape(0));
      }, py::arg("tokens"))
      .def("allocate", [](BlockManager& bm, const py::object& seq, const py::object& obj) {
        const std::int64_t id = seq_arg(seq, "allocate");
        const I32 tokens = i32_array(obj, "tokens");
        return bm.allocate(id, tokens.data(), tokens.shape(0));
      }, py::arg("seq_id"), py::arg("tokens"), "Allocate blocks for all tokens; returns the number of cached tokens.")
      .def("fork", [](BlockManager& bm, const py::object& parent, const py::object& child) {
        bm.fork(seq_arg(parent, "fork", "parent"), seq_arg(child, "fork", "child"));
      }, py::arg("parent"), py::arg("child"))
      .def("blocks_to_append", [](const BlockManager& bm, const py::object& obj) -> std::int64_t {
        if (!is_array_of_values(obj)) return bm.blocks_to_append(seq_arg(obj, "blocks_to_append"));
        const I64 seqs = i64_array(obj, "seq_ids");
        std::unordered_set<std::int64_t> seen;  // a repeated id has no count that appending would match
        for (py::ssize_t i = 0; i < seqs.shape(0); ++i)
          if (!seen.insert(seqs.data()[i]).second)
            fail("BlockManager.blocks_to_append: sequence id ", seqs.data()[i], " appears more than once");
        return bm.blocks_to_append(seqs.data(), seqs.shape(0));
      }, py::arg("seq_ids"), "The blocks that appending one token to this sequence, or to each of these distinct "
         "sequences, needs in total.")
      .def("append", [](BlockManager& bm, const py::object& seq, const py::object& token) {
        const std::int64_t id = seq_arg(seq, "append");
        const auto tok = static_cast<std::int32_t>(int_arg(token, "append", "token", 0, INT32_MAX));
        std::int32_t src, dst;
        const std::int64_t slot = bm.append(id, tok, &src, &dst);
        return py::make_tuple(slot, src, dst);
      }, py::arg("seq_id"), py::arg("token"), "Returns (slot, copy_src, copy_dst); copy ids are -1 without a copy.")
      .def("append_batch", [](BlockManager& bm, const py::object& seq_obj, const py::object& tok_obj) {
        const I64 seqs = i64_array(seq_obj, "seq_ids");
        const auto n = seqs.shape(0);
        // tokens=None: the tokens are still being sampled on the device (the engine schedules the next
        // decode step before the last one's tokens reach the host); they are recorded as unknown (-1)
        I32 tokens = tok_obj.is_none() ? I32(n) : i32_array(tok_obj, "tokens");
        if (tok_obj.is_none()) std::fill_n(tokens.mutable_data(), n, kUnknownToken);
        else check_token_ids(tokens.data(), tokens.shape(0));  // -1 means unknown only when the engine says so
        if (tokens.shape(0) != n) fail("BlockManager.append_batch: ", n, " seq_ids but ", tokens.shape(0), " tokens");
        // A repeated id would make the count below too small (its second token may need a block its
        // first did not) and the batch fail half-way, breaking all-or-nothing.
        std::unordered_set<std::int64_t> seen;
        for (py::ssize_t i = 0; i < n; ++i)
          if (!seen.insert(seqs.data()[i]).second)
            fail("BlockManager.append_batch: sequence id ", seqs.data()[i], " appears more than once");
        const std::int64_t need = bm.blocks_to_append(seqs.data(), n);
        if (need > bm.num_free_blocks())
          fail("BlockManager.append_batch: needs ", need, " free blocks, ", bm.num_free_blocks(), " are free");
        I64 slots(n);
        std::vector<std::int32_t> copies;
        for (py::ssize_t i = 0; i < n; ++i) {
          std::int32_t src, dst;
          slots.mutable_data()[i] = bm.append(seqs.data()[i], tokens.data()[i], &src, &dst);
          if (src >= 0) { copies.push_back(src); copies.push_back(dst); }
        }
        I32 out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(copies.size() / 2), 2});
        if (!copies.empty()) std::memcpy(out.mutable_data(), copies.data(), copies.size() * sizeof(std::int32_t));
        return py::make_tuple(slots, out);
      }, py::arg("seq_ids"), py::arg("tokens") = py::none(),
         "Append one token to each sequence (all or nothing): (slots int64[B], copies int32[K, 2] of (src, dst)).\n"
         "tokens=None appends tokens not known yet: their blocks never enter the prefix cache.")
      .def("mark_computed", [](BlockManager& bm, const py::object& seq, const py::object& n) {
        bm.mark_computed(seq_arg(seq, "mark_computed"), int_arg(n, "mark_computed", "num_tokens", 0, kI64Max));
      }, py::arg("seq_id"), py::arg("num_tokens"))
      .def("free", [](BlockManager& bm, const py::object& seq) { bm.free(seq_arg(seq, "free")); }, py::arg("seq_id"))
      .def("preempt", [](BlockManager& bm, const py::object& seq) { bm.free(seq_arg(seq, "preempt")); },
           py::arg("seq_id"),
           "Preemption by recompute: drop the sequence's blocks (same as free; it is re-allocated later).")
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache)
      .def("num_tokens", [](const BlockManager& bm, const py::object& seq) {
        return bm.num_tokens(seq_arg(seq, "num_tokens"));
      }, py::arg("seq_id"))
      .def("ref_count", [](const BlockManager& bm, const py::object& block) {
        return bm.ref_count(int_arg(block, "ref_count", "block", 0, bm.num_blocks() - 1));
      }, py::arg("block"))
      .def("check_invariants", &BlockManager::check_invariants)
      .def("block_table", [](const BlockManager& bm, const py::object& seq) {
        const auto& t = bm.table(seq_arg(seq, "block_table"));
        I32 out(static_cast<py::ssize_t>(t.size()));
        if (!t.empty()) std::memcpy(out.mutable_data(), t.data(), t.size() * sizeof(std::int32_t));
        return out;
      }, py::arg("seq_id"))
      .def("block_tables", [](const BlockManager& bm, const py::object& obj, const py::object& width_obj,
                              const py::object& pad_obj, const py::object& out_obj) -> py::object {
        std::int64_t width = int_arg(width_obj, "block_tables", "width", 0, kI64Max);
        // no table is longer than the pool, so wider rows would be padding only, and were allocated as asked
        // (width=2**31-1 took 8 GB a row); a caller's out= buffer allocates nothing, so only its own width bounds it
        if (out_obj.is_none() && width > bm.num_blocks())
          fail("BlockManager.block_tables: width ", width, " exceeds the pool's num_blocks ", bm.num_blocks(),
               " (no block table is longer); pass out= for wider rows");
        const auto pad = static_cast<std::int32_t>(int_arg(pad_obj, "block_tables", "pad", INT32_MIN, INT32_MAX));
        const I64 seqs = i64_array(obj, "seq_ids");
        const auto n = seqs.shape(0);
        for (py::ssize_t i = 0; i < n; ++i)
          width = std::max<std::int64_t>(width, bm.table(seqs.data()[i]).size());
        py::array_t<std::int32_t> out;
        if (out_obj.is_none()) {
          out = I32(std::vector<py::ssize_t>{n, static_cast<py::ssize_t>(width)});
        } else {
          // the caller's buffer (a staging area the decode step copies to the GPU in one go): written
          // in place, so it must be exactly an int32, C-contiguous, writeable [rows >= n, cols >= width]
          if (!py::isinstance<py::array_t<std::int32_t>>(out_obj))
            fail("BlockManager.block_tables: out must be an int32 numpy array");
          out = py::reinterpret_borrow<py::array_t<std::int32_t>>(out_obj);
          if (out.ndim() != 2 || !(out.flags() & py::array::c_style) || !out.writeable())
            fail("BlockManager.block_tables: out must be a writeable, C-contiguous 2-D array");
          if (out.shape(0) < n || out.shape(1) < width)
            fail("BlockManager.block_tables: out is [", out.shape(0), ", ", out.shape(1), "], needs at least [",
                 n, ", ", width, "]");
          width = out.shape(1);
        }
        std::int32_t* o = out.mutable_data();
        // the ids are read while `out` is written: they must not live in it
        const auto* ids = reinterpret_cast<const char*>(seqs.data());
        const auto* dst = reinterpret_cast<const char*>(o);
        if (n > 0 && ids < dst + out.nbytes() && dst < ids + seqs.nbytes())
          fail("BlockManager.block_tables: seq_ids overlap the out buffer");
        std::fill(o, o + n * width, pad);
        for (py::ssize_t i = 0; i < n; ++i) {
          const auto& t = bm.table(seqs.data()[i]);
          std::copy(t.begin(), t.end(), o + i * width);
        }
        return out;
      }, py::arg("seq_ids"), py::arg("width") = 0, py::arg("pad") = 0, py::arg("out") = py::none(),
         "int32 [B, max(width, longest table)] block tables, padded with `pad`; with `out`, its first B rows "
         "are written in place (and `out` returned).")
      .def("slot_mapping", [](const BlockManager& bm, const py::object& seq_obj, const py::object& start_obj,
                              const py::object& end_obj) {
        const I64 seqs = i64_array(seq_obj, "seq_ids"), starts = i64_array(start_obj, "starts"),
                  ends = i64_array(end_obj, "ends");
        const auto n = seqs.shape(0);
        if (starts.shape(0) != n || ends.shape(0) != n)
          fail("BlockManager.slot_mapping: seq_ids, starts, ends must be 1-D of one length");
        std::int64_t total = 0;
        for (py::ssize_t i = 0; i < n; ++i) {
          const std::int64_t len = bm.num_tokens(seqs.data()[i]);
          if (starts.data()[i] < 0 || starts.data()[i] > ends.data()[i] || ends.data()[i] > len)
            fail("BlockManager.slot_mapping: range [", starts.data()[i], ", ", ends.data()[i], ") outside sequence ",
                 seqs.data()[i], " of ", len, " tokens");
          total += ends.data()[i] - starts.data()[i];
        }
        I64 out(static_cast<py::ssize_t>(total));
        std::int64_t* o = out.mutable_data();
        const std::int64_t bs = bm.block_size();
        for (py::ssize_t i = 0; i < n; ++i) {
          const auto& t = bm.table(seqs.data()[i]);
          for (std::int64_t p = starts.data()[i]; p < ends.data()[i]; ++p) *o++ = t[p / bs] * bs + p % bs;
        }
        return out;
      }, py::arg("seq_ids"), py::arg("starts"), py::arg("ends"),
         "Concatenated int64 cache slots of positions [start, end) of each sequence.");
}

}  // namespace r1fast
