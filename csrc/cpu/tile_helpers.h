// Building blocks of the CPU kernels (attention_forward_kernel.cpp, attention_backward_kernel.cpp):
// packing, score tiles with every score modifier and mask, dropout factors, and the work-item
// scheduler. Part of the per-ISA build: everything lives in torch_mha::cpu::CPU_CAPABILITY.
//
// The kernels work on transposed score tiles: st[j * ld + i] is the score of key k0 + j against
// query q0 + i. Keys run down the rows and a block of queries along the vectorised dimension, so
// the online softmax (per-query maxima and sums) is element-wise over vectors, and the products
// read K, V, Q and dO straight from the caller's tensors (see block_matmul.h).
#pragma once

#ifndef CPU_CAPABILITY
#error "tile_helpers.h belongs to the per-ISA kernel build (see cpu/attention_kernels.h)"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "attention_params.h"
#include "common/dropout.h"
#include "common/masking.h"
#include "common/softmax.h"
#include "cpu/attention_kernels.h"
#include "cpu/block_matmul.h"

namespace torch_mha::cpu::CPU_CAPABILITY {

// A fixed-size array whose elements start indeterminate: for per-thread tiles that are always
// written before they are read, where zeroing them (std::vector) would cost more than a small
// problem's whole kernel.
template <typename T>
class UninitializedBuffer {
 public:
  explicit UninitializedBuffer(int64_t size) : data_(new T[size]), size_(size) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  int64_t size() const { return size_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
  int64_t size_;
};

// Per-thread scratch that grows on demand and is reused across work items.
template <typename T>
T* scratch(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) {
    buffer.resize(size);
  }
  return buffer.data();
}

// Multiply-adds (about 50 us on one core) up to which a parallel region costs more than it
// saves: OpenMP's fork and join take microseconds, and tens of them when the other threads are
// descheduled on a busy machine. One decode step of a small model is that small (measured on
// the AVX2 EPYC: 1 query, 8 heads on 2 key/value heads, D = 32, 256 keys: 46 us inline, 55 us
// on 2 threads; 1024 keys: 143 us inline, 100 us on 2 threads).
constexpr int64_t kMinParallelWork = int64_t{1} << 20;

// Runs `thread_body(claim)` once on each of torch's threads (or inline inside another parallel
// region, or when count items of work_per_item multiply-adds are too little to share);
// claim() hands out the next unclaimed item of [0, count). Items of unequal cost (causal or
// windowed query blocks, packed sequences of different lengths) then spread evenly over the
// threads. Each item's result depends on the item alone, never on which thread ran it or when,
// so results are bitwise the same for any thread count.
template <typename ThreadBody>
void parallel_over_items(int64_t count, int64_t work_per_item, const ThreadBody& thread_body) {
  if (count <= 0) {
    return;
  }
  std::atomic<int64_t> next{0};
  const auto claim = [&next]() { return next.fetch_add(1, std::memory_order_relaxed); };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  if (threads <= 1 || work_per_item <= kMinParallelWork / count) {
    thread_body(claim);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t /*begin*/, int64_t /*end*/) { thread_body(claim); });
}

// dst[r, c] = multiplier * src[r, c] for r < rows, c < cols; columns [cols, ld) are zeroed.
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
               acc_t multiplier, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * src_row_stride;
    acc_t* out = dst + r * ld;
    for (int64_t c = 0; c < cols; ++c) {
      out[c] = multiplier * static_cast<acc_t>(in[c]);
    }
    std::fill(out + cols, out + ld, acc_t(0));
  }
}

// dst[c, r] = multiplier * src[r, c] for r < rows, c < cols; columns [rows, padded_rows) of
// dst are zeroed. Used for Q^T and dO^T of a query block.
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
                     acc_t multiplier, acc_t* dst, int64_t ld, int64_t padded_rows) {
  for (int64_t c = 0; c < cols; ++c) {
    std::fill(dst + c * ld + rows, dst + c * ld + padded_rows, acc_t(0));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* in = src + r * src_row_stride;
    for (int64_t c = 0; c < cols; ++c) {
      dst[c * ld + r] = multiplier * static_cast<acc_t>(in[c]);
    }
  }
}

template <typename acc_t>
struct RowsOperand {
  const acc_t* data;
  int64_t ld;
};

// A row stride for packed B operands of block_matmul: whole vectors, and not a multiple of two
// cache lines. block_matmul reads one B row per step down a column of register tiles; rows 256
// or 512 bytes apart (head dims 64 and 128 in float32) fall into 1/4 or 1/8 of the L1 sets, a
// 128-row tile evicts itself and every B load comes from L2. One extra line per row spreads
// them over every set (7-9% on forward + backward, AVX2, docs/performance.md).
template <typename T>
int64_t conflict_free_row_stride(int64_t cols) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t ld = round_up(cols, vector_width<T>());
  return ld % (2 * kLine) == 0 ? ld + kLine : ld;
}

// Row stride of the packed (scale Q)^T and dO^T panels of a query block: kBlockQ queries per row.
template <typename acc_t>
int64_t query_panel_ld() {
  return conflict_free_row_stride<acc_t>(kBlockQ);
}

// Rows of an input as the B operand of block_matmul: the input itself when it already is a
// dense float tensor of whole vectors (a copy at a conflict-free stride measured no faster: it
// costs about what the conflicts do), else a packed float copy in `buffer`, rows a
// conflict-free stride apart. Rows far apart (the per-head views of a packed projection) are
// always copied: they share a few cache sets and evict each other on every pass.
template <typename scalar_t, typename acc_t>
RowsOperand<acc_t> rows_operand(const scalar_t* src, int64_t src_row_stride, int64_t rows,
                                int64_t cols, std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (cols % vector_width<acc_t>() == 0 && (rows <= 1 || src_row_stride == cols)) {
      return {src, src_row_stride};
    }
  }
  const int64_t ld = conflict_free_row_stride<acc_t>(cols);
  acc_t* packed = scratch(buffer, rows * ld);
  pack_rows(src, src_row_stride, rows, cols, acc_t(1), packed, ld);
  return {packed, ld};
}

// The scores of a single query against the keys of a tile: scores[j] = k_j . q (float key
// rows key_stride apart). A query block of one row would fill one lane of every vector of the
// K (scale Q)^T product and of the softmax that follows: dot products along the head dim, and
// a softmax along the keys, use them all.
template <typename acc_t>
void single_query_scores(const acc_t* keys, int64_t key_stride, int64_t cols, int64_t dim,
                         const acc_t* query, acc_t* scores) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t vector_end = dim - dim % Vec::size();
  for (int64_t j = 0; j < cols; ++j) {
    const acc_t* key = keys + j * key_stride;
    Vec sum(acc_t(0));
    for (int64_t d = 0; d < vector_end; d += Vec::size()) {
      sum = at::vec::fmadd(Vec::loadu(key + d), Vec::loadu(query + d), sum);
    }
    acc_t dot = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum);
    for (int64_t d = vector_end; d < dim; ++d) {
      dot += key[d] * query[d];
    }
    scores[j] = dot;
  }
}

template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t count, acc_t multiplier, scalar_t* dst) {
  for (int64_t c = 0; c < count; ++c) {
    dst[c] = static_cast<scalar_t>(multiplier * src[c]);
  }
}

template <typename acc_t>
at::vec::Vectorized<acc_t> exp_vec(const at::vec::Vectorized<acc_t>& x) {
  // float: PyTorch's fast exp (about 20 ulp, exact 0 for -inf), as its own flash kernel uses.
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// out[j * ld + i] = a[j * ld + i] * b[j * ld + i] over a (cols x width-padded rows) tile.
template <typename acc_t>
void multiply_tiles(const acc_t* a, const acc_t* b, acc_t* out, int64_t cols, int64_t padded_rows,
                    int64_t ld) {
  using Vec = at::vec::Vectorized<acc_t>;
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < padded_rows; i += Vec::size()) {
      (Vec::loadu(a + j * ld + i) * Vec::loadu(b + j * ld + i)).store(out + j * ld + i);
    }
  }
}

// ---- Score modifiers and masks on a transposed tile (queries q0 + i, keys k0 + j).

template <typename acc_t, typename mask_t>
void add_mask_transposed(const mask_t* mask, int64_t stride_query, int64_t stride_key, int64_t rows,
                         int64_t cols, acc_t* st, int64_t ld) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (stride_query == 0) {
    // The same value for every query (key padding masks, (N, 1, 1, S) biases): one broadcast
    // add per key, skipped where the mask adds nothing.
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t bias = mask_bias<acc_t>(mask[j * stride_key]);
      if (bias != acc_t(0)) {
        at::vec::map([bias](Vec x) { return x + Vec(bias); }, st + j * ld, st + j * ld, rows);
      }
    }
    return;
  }
  for (int64_t j = 0; j < cols; ++j) {
    acc_t* s = st + j * ld;
    const mask_t* m = mask + j * stride_key;
    for (int64_t i = 0; i < rows; ++i) {
      s[i] += mask_bias<acc_t>(m[i * stride_query]);
    }
  }
}

template <typename acc_t>
void apply_mask(const MaskView& mask, int64_t batch, int64_t head, int64_t q0, int64_t rows,
                int64_t k0, int64_t cols, acc_t* st, int64_t ld) {
  const int64_t offset = mask.row_offset(batch, head, q0) + k0 * mask.stride_key;
  const int64_t sq = mask.stride_query, sk = mask.stride_key;
  switch (mask.kind) {
    case MaskKind::kBool:
      add_mask_transposed(static_cast<const bool*>(mask.data) + offset, sq, sk, rows, cols, st, ld);
      break;
    case MaskKind::kFloat:
      add_mask_transposed(static_cast<const float*>(mask.data) + offset, sq, sk, rows, cols, st,
                          ld);
      break;
    case MaskKind::kDouble:
      add_mask_transposed(static_cast<const double*>(mask.data) + offset, sq, sk, rows, cols, st,
                          ld);
      break;
    case MaskKind::kBFloat16:
      add_mask_transposed(static_cast<const c10::BFloat16*>(mask.data) + offset, sq, sk, rows, cols,
                          st, ld);
      break;
    case MaskKind::kHalf:
      add_mask_transposed(static_cast<const c10::Half*>(mask.data) + offset, sq, sk, rows, cols, st,
                          ld);
      break;
    case MaskKind::kNone:
      break;
  }
}

// One sequence of a (possibly packed) batch: its lengths and its visibility rule.
struct Sequence {
  int64_t batch;
  int64_t query_len;
  int64_t key_len;

  Sequence(const AttentionParams& p, int64_t b)
      : batch(b), query_len(p.query_len_of(b)), key_len(p.key_len_of(b)) {}
};

// Everything that turns raw scores (scale Q) K^T into the scores the softmax sees, in the order
// the API defines: softcap, then ALiBi, attn_mask and key_padding_mask added, then the causal
// rule and the window. Identical in the forward, the weights sweep and the backward.
struct ScoreTransform {
  const AttentionParams& p;

  // `softcap_slope`, if given, receives d(capped)/d(raw) = 1 - tanh^2 per element: the backward
  // needs it to carry dS through the cap.
  template <typename acc_t>
  void apply(const Sequence& seq, int64_t h, int64_t q0, int64_t rows, int64_t padded_rows,
             int64_t k0, int64_t cols, acc_t* st, int64_t ld, acc_t* softcap_slope) const {
    apply_softcap(cols, padded_rows, st, ld, softcap_slope);
    apply_head_terms(seq, h, q0, rows, k0, cols, st, ld);
  }

  // The part that is the same for every head: the softcap, over `columns` (whole vectors).
  template <typename acc_t>
  void apply_softcap(int64_t cols, int64_t columns, acc_t* st, int64_t ld,
                     acc_t* softcap_slope) const {
    using Vec = at::vec::Vectorized<acc_t>;
    if (p.softcap <= 0.0) {
      return;
    }
    const Vec cap(static_cast<acc_t>(p.softcap));
    const Vec inverse_cap(static_cast<acc_t>(1.0 / p.softcap));
    for (int64_t j = 0; j < cols; ++j) {
      for (int64_t i = 0; i < columns; i += Vec::size()) {
        const Vec t = (Vec::loadu(st + j * ld + i) * inverse_cap).tanh();
        (cap * t).store(st + j * ld + i);
        if (softcap_slope != nullptr) {
          (Vec(acc_t(1)) - t * t).store(softcap_slope + j * ld + i);
        }
      }
    }
  }

  // The part that depends on head h and the positions: ALiBi, the masks, the visibility rule.
  // Touches exactly `rows` columns, so the heads of a grouped-query group may sit side by side
  // in one tile.
  template <typename acc_t>
  void apply_head_terms(const Sequence& seq, int64_t h, int64_t q0, int64_t rows, int64_t k0,
                        int64_t cols, acc_t* st, int64_t ld) const {
    using Vec = at::vec::Vectorized<acc_t>;
    const int64_t b = seq.batch;
    if (p.alibi_slopes != nullptr) {
      // -slope * |i + S - L - j| for query q0 + i, key k0 + j.
      const Vec negative_slope(-static_cast<acc_t>(p.alibi_slope(b, h)));
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t first = static_cast<acc_t>(q0 + seq.key_len - seq.query_len - (k0 + j));
        for (int64_t i = 0; i < rows; i += Vec::size()) {
          const int count = static_cast<int>(std::min<int64_t>(Vec::size(), rows - i));
          const Vec distance = Vec::arange(first + static_cast<acc_t>(i), acc_t(1)).abs();
          (Vec::loadu(st + j * ld + i, count) + negative_slope * distance)
              .store(st + j * ld + i, count);
        }
      }
    }
    apply_mask(p.attn_mask, b, h, q0, rows, k0, cols, st, ld);
    apply_mask(p.key_padding_mask, b, h, q0, rows, k0, cols, st, ld);
    if (p.visibility.restricts()) {
      // Key k0 + j is seen by the queries queries_of(k0 + j): hide the rest of the block. Keys
      // that every query of the block sees (all of them when decoding) need nothing.
      const IndexRange everyone =
          p.visibility.keys_of_every_query(q0, q0 + rows - 1, seq.query_len, seq.key_len);
      const int64_t skip_begin = std::clamp<int64_t>(everyone.begin - k0, 0, cols);
      const int64_t skip_end = std::clamp<int64_t>(everyone.end - k0, skip_begin, cols);
      auto hide_unseen = [&](int64_t j) {
        const IndexRange seen = p.visibility.queries_of(k0 + j, seq.query_len, seq.key_len);
        const int64_t begin = std::clamp<int64_t>(seen.begin - q0, 0, rows);
        const int64_t end = std::clamp<int64_t>(seen.end - q0, begin, rows);
        std::fill(st + j * ld, st + j * ld + begin, negative_infinity<acc_t>());
        std::fill(st + j * ld + end, st + j * ld + rows, negative_infinity<acc_t>());
      };
      for (int64_t j = 0; j < skip_begin; ++j) {
        hide_unseen(j);
      }
      for (int64_t j = skip_end; j < cols; ++j) {
        hide_unseen(j);
      }
    }
  }
};

struct DropoutConfig {
  bool enabled;
  uint64_t seed;
  uint32_t threshold;
  double keep_scale;  // 1 / (1 - p)
  int64_t heads;
  int64_t query_len;

  explicit DropoutConfig(const AttentionParams& p)
      : enabled(p.has_dropout()),
        seed(p.has_dropout() ? static_cast<uint64_t>(*p.dropout_seed) : 0),
        threshold(dropout_threshold(p.dropout_p)),
        keep_scale(p.has_dropout() ? 1.0 / (1.0 - p.dropout_p) : 1.0),
        heads(p.heads),
        query_len(p.query_len) {}

  // factors[j * ld + i] = (keep ? 1/(1-p) : 0) for queries q0 + i (i < rows) and keys k0 + j
  // (j < cols): the transposed tile of the mask the shared generator defines row by row.
  template <typename acc_t>
  void tile_factors(int64_t batch, int64_t head, int64_t q0, int64_t rows, int64_t k0, int64_t cols,
                    acc_t* factors, int64_t ld) const {
    const acc_t kept = static_cast<acc_t>(keep_scale);
    for (int64_t i = 0; i < rows; ++i) {
      DropoutRowGenerator generator(seed, dropout_row_id(batch, head, q0 + i, heads, query_len), k0,
                                    threshold);
      for (int64_t j = 0; j < cols; ++j) {
        factors[j * ld + i] = generator.next_keep() ? kept : acc_t(0);
      }
    }
  }
};

// The rows of one query block and the keys they may see.
struct QueryBlock {
  int64_t q0;
  int64_t rows;
  int64_t padded_rows;  // rounded up to whole vectors
  IndexRange keys;

  QueryBlock(const AttentionParams& p, const Sequence& seq, int64_t index, int64_t width)
      : q0(index * kBlockQ),
        rows(std::min(kBlockQ, seq.query_len - q0)),
        padded_rows(round_up(rows, width)),
        keys(p.visibility.keys_of_block(q0, q0 + rows - 1, seq.query_len, seq.key_len)) {}
};

// A query block's softmax statistics, split into vectors of offsets and log-sums and padded up
// to a whole vector with (+inf, 0): padding queries get probability 0.
template <typename acc_t>
struct BlockStats {
  std::vector<acc_t> offset = std::vector<acc_t>(kBlockQ);
  std::vector<acc_t> log_sum = std::vector<acc_t>(kBlockQ);

  void load(const AttentionParams& p, int64_t b, int64_t h, int64_t q0, int64_t rows,
            int64_t padded_rows) {
    for (int64_t i = 0; i < padded_rows; ++i) {
      const acc_t* row = i < rows ? p.softmax_stats.row<const acc_t>(b, h, q0 + i) : nullptr;
      offset[i] = i < rows ? row[0] : std::numeric_limits<acc_t>::infinity();
      log_sum[i] = i < rows ? row[1] : acc_t(0);
    }
  }
};

// P^T for queries [q0, q0 + rows) of head h against keys [k0, k0 + cols), before dropout: the
// tile exp((S^T - offset) - log_sum) with every score modifier, S^T = K (scale Q)^T. keys are the
// key rows k0.. (any element type, rows key_stride apart); qt is the query block's packed
// (scale Q)^T, rows query_panel_ld() apart; offset and log_sum hold one value per (padded) query.
template <typename key_t, typename acc_t>
void probability_tile(const AttentionParams& p, const ScoreTransform& transform,
                      const Sequence& seq, int64_t h, int64_t q0, int64_t rows, int64_t padded_rows,
                      const key_t* keys, int64_t key_stride, const acc_t* qt, const acc_t* offset,
                      const acc_t* log_sum, int64_t k0, int64_t cols, acc_t* pt,
                      acc_t* softcap_slope) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t ld = kBlockQ;
  block_matmul<acc_t, key_t>(cols, padded_rows, p.head_dim, keys, key_stride, 1, qt,
                             query_panel_ld<acc_t>(), pt, ld, /*accumulate=*/false);
  transform.apply(seq, h, q0, rows, padded_rows, k0, cols, pt, ld, softcap_slope);
  for (int64_t i = 0; i < padded_rows; i += Vec::size()) {
    const Vec row_offset = Vec::loadu(offset + i);
    const Vec row_log_sum = Vec::loadu(log_sum + i);
    for (int64_t j = 0; j < cols; ++j) {
      // (s - offset) first: exact for the scores that matter, whatever their magnitude.
      exp_vec((Vec::loadu(pt + j * ld + i) - row_offset) - row_log_sum).store(pt + j * ld + i);
    }
  }
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
