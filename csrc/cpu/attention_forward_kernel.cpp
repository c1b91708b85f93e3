// Fused (flash-style) attention forward on the CPU, and the attention weights; one build per
// vector ISA (see cpu/attention_kernels.h).
//
// Work items are (batch, key/value head, a chunk of its query heads (HeadChunks), block of
// queries). For each block of keys the item may see: S^T = K (scale Q)^T, the score modifiers
// and masks (ScoreTransform), online softmax per query (running max m and sum l), O += P V.
// The query heads of a grouped-query group share each key and value tile while it is in cache;
// in short blocks (decoding) they sit side by side as the columns of one score tile, and a lone
// query of a head without a group is scored as a row, so that neither fills one lane in eight.
// A problem of one query block with too few such items (decoding with a KV cache, short
// prefills) also splits its keys and combines the ranges through their log-sum-exp, so that one
// token with a small batch x heads still uses every core. Memory is O(L): the L x S
// probabilities are only written when the caller asks for the attention weights.
#ifndef CPU_CAPABILITY
#error "attention_forward_kernel.cpp is compiled once per ISA with -DCPU_CAPABILITY=<ISA>"
#endif

#include <ATen/Dispatch.h>

#include <limits>

#include "cpu/tile_helpers.h"

namespace torch_mha::cpu::CPU_CAPABILITY {
namespace {

// Query heads of one group handled together: each keeps a Q^T panel and an output accumulator
// (32 KiB each at head_dim 128), and four of them plus the key/value tiles fit in a 512 KiB L2.
constexpr int64_t kMaxHeadsPerItem = 4;

// Query blocks of at most this many rows (decoding, speculative and short prefill chunks) put
// the heads of a grouped-query group side by side as the columns of one score tile: one query
// per head would otherwise fill one lane of each vector of S^T = K (scale Q)^T and waste the
// rest, and the group's heads share every key and value load.
constexpr int64_t kMaxStackedRows = kBlockQ / 4;

// Below this many (batch, key/value head, head chunk, query block) work items, a problem of one
// query block (decoding, short prefills) also splits its keys into ranges processed in parallel
// and combined through their log-sum-exp (flash-decoding). A constant, not the thread count:
// the split, and so the summation order, depends on the problem alone.
constexpr int64_t kSplitTargetItems = 64;
constexpr int64_t kMinKeyBlocksPerSplit = 2;

// How the query heads of a key/value group are dealt out to work items, and whether an item's
// heads are stacked as the columns of one tile (head g's row i is column g * rows + i) or take
// turns on their own tiles. A function of the shapes alone.
struct HeadChunks {
  int64_t group;
  int64_t rows;  // query rows of the largest block
  bool stacked;
  int64_t heads_per_item;
  int64_t count;

  explicit HeadChunks(const AttentionParams& p)
      : group(p.group_size()),
        rows(std::min(p.query_len, kBlockQ)),
        stacked(group > 1 && rows > 0 && rows <= kMaxStackedRows),
        heads_per_item(
            std::min(group, stacked ? kBlockQ / std::max<int64_t>(rows, 1) : kMaxHeadsPerItem)),
        count(heads_per_item > 0 ? (group + heads_per_item - 1) / heads_per_item : 0) {}

  int64_t first_head(int64_t kv_head, int64_t chunk) const {
    return kv_head * group + chunk * heads_per_item;
  }
  int64_t heads_in(int64_t kv_head, int64_t chunk) const {
    return std::min(heads_per_item, (kv_head + 1) * group - first_head(kv_head, chunk));
  }
  // Score-tile columns an item uses (whole vectors): per tile, and over its tiles.
  int64_t columns(int64_t width) const {
    return stacked ? round_up(heads_per_item * rows, width) : round_up(rows, width);
  }
  int64_t columns_per_item(int64_t width) const {
    return (stacked ? 1 : heads_per_item) * columns(width);
  }
};

// The online softmax of one query block, for the query heads of one work item, against a
// stream of key blocks: (scale Q)^T, the output accumulator and the running max and sum per
// query. Per-thread buffers sized for the problem's blocks, reused from item to item.
template <typename scalar_t>
class QueryBlockAccumulator {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  QueryBlockAccumulator(const AttentionParams& p, const HeadChunks& chunks,
                        ReducedProducts reduced_products)
      : p_(p),
        transform_{p},
        dropout_(p),
        brgemm_(brgemm_can_run(p, reduced_products)),
        stacked_(chunks.stacked),
        ld_(chunks.columns(kWidth)),
        tiles_(stacked_ ? 1 : chunks.heads_per_item),
        value_dim_padded_(round_up(p.value_dim, kWidth)),
        qt_ld_(conflict_free_row_stride<acc_t>(ld_)),
        qt_(tiles_ * p.head_dim * qt_ld_),
        query_rows_(stacked_ ? 0 : tiles_ * p.head_dim),
        acc_(tiles_ * ld_ * value_dim_padded_),
        m_(tiles_ * ld_),
        l_(tiles_ * ld_),
        st_(kBlockK * ld_),
        factors_(dropout_.enabled ? kBlockK * ld_ : 0),
        block_max_(ld_),
        offset_(ld_),
        rescale_(ld_),
        block_sum_(ld_) {}

  // Packs the query heads [first_head, first_head + heads) of the block and clears the state.
  void start(const Sequence& seq, const QueryBlock& block, int64_t first_head, int64_t heads) {
    seq_ = &seq;
    block_ = &block;
    first_head_ = first_head;
    heads_ = heads;
    head_stride_ = stacked_ ? block.rows : ld_;
    const int64_t panel_rows = stacked_ ? block.rows : block.padded_rows;
    // With brgemm: Q^T unscaled, in the input type, the B operand of the library's S^T = K Q^T.
    scalar_t* qt_reduced =
        uses_brgemm() ? scratch(qt_reduced_, heads * p_.head_dim * ld_) : nullptr;
    for (int64_t g = 0; g < heads; ++g) {
      const scalar_t* query = p_.query.row<const scalar_t>(seq.batch, first_head + g, block.q0);
      if (qt_reduced != nullptr) {
        pack_transposed(query, p_.query.stride_row, block.rows, p_.head_dim, scalar_t(1),
                        qt_reduced + g * p_.head_dim * ld_, ld_, block.padded_rows);
        continue;
      }
      if (!stacked_ && block.rows == 1) {
        // One query of its own: scored by dot products (add_keys), as a row.
        pack_rows(query, p_.query.stride_row, 1, p_.head_dim, static_cast<acc_t>(p_.scale),
                  query_rows_.data() + g * p_.head_dim, p_.head_dim);
        continue;
      }
      acc_t* panel = stacked_ ? qt_.data() + g * block.rows : qt_.data() + g * p_.head_dim * qt_ld_;
      pack_transposed(query, p_.query.stride_row, block.rows, p_.head_dim,
                      static_cast<acc_t>(p_.scale), panel, qt_ld_, panel_rows);
    }
    if (stacked_) {
      const int64_t used = heads * block.rows;
      for (int64_t c = 0; c < p_.head_dim; ++c) {
        std::fill(qt_.data() + c * qt_ld_ + used, qt_.data() + c * qt_ld_ + stacked_columns(),
                  acc_t(0));
      }
    }
    std::fill(acc_.data(), acc_.data() + acc_.size(), acc_t(0));
    std::fill(m_.data(), m_.data() + m_.size(), negative_infinity<acc_t>());
    std::fill(l_.data(), l_.data() + l_.size(), acc_t(0));
  }

  // Folds keys [k0, k0 + cols) of key/value head kv_head into every head's state.
  void add_keys(int64_t kv_head, int64_t k0, int64_t cols) {
    const scalar_t* key_rows = p_.key.row<const scalar_t>(seq_->batch, kv_head, k0);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {  // brgemm has no float64 form
      if (uses_brgemm()) {
        add_keys_brgemm(key_rows, p_.value.row<const scalar_t>(seq_->batch, kv_head, k0), k0, cols);
        return;
      }
    }
    const RowsOperand<acc_t> keys = key_operand(key_rows, cols);
    const RowsOperand<acc_t> values =
        rows_operand(p_.value.row<const scalar_t>(seq_->batch, kv_head, k0), p_.value.stride_row,
                     cols, p_.value_dim, v_buffer_);
    if (stacked_) {
      add_keys_stacked(keys, values, k0, cols);
    } else if (block_->rows == 1) {
      add_keys_single_query(keys, values, k0, cols);
    } else {
      add_keys_per_head(keys, values, k0, cols);
    }
  }

  // Query row i of head g: its running max and sum, and its unnormalised output row.
  acc_t running_max(int64_t g, int64_t i) const { return m_[g * head_stride_ + i]; }
  acc_t running_sum(int64_t g, int64_t i) const { return l_[g * head_stride_ + i]; }
  const acc_t* output_row(int64_t g, int64_t i) const {
    return acc_.data() + (g * head_stride_ + i) * value_dim_padded_;
  }

 private:
  // The key rows of a tile as the A operand of S^T = K (scale Q)^T, or as rows of dot products
  // for a lone query. block_matmul broadcasts one A element per register-tile row and step: a
  // bfloat16 or half element would be converted there, once per column block, so reduced types
  // are converted once per tile instead (the backward does the same).
  RowsOperand<acc_t> key_operand(const scalar_t* rows, int64_t cols) {
    if (!stacked_ && block_->rows == 1) {
      return rows_operand(rows, p_.key.stride_row, cols, p_.head_dim, k_buffer_);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return {rows, p_.key.stride_row};
    } else {
      acc_t* tile = scratch(k_buffer_, cols * p_.head_dim);
      pack_rows(rows, p_.key.stride_row, cols, p_.head_dim, acc_t(1), tile, p_.head_dim);
      return {tile, p_.head_dim};
    }
  }

  // Whether cpublas::brgemm multiplies this call's tiles: asked for (reduced_products.h), a
  // reduced input type, and rows the library reads as a plain matrix (a leading dimension of at
  // least the row length and within int; broadcast rows of stride 0 are not).
  static bool brgemm_can_run(const AttentionParams& p, ReducedProducts reduced_products) {
    constexpr int64_t kMaxLd = std::numeric_limits<int32_t>::max();
    return !std::is_same_v<scalar_t, acc_t> && reduced_products == ReducedProducts::kBrgemm &&
           p.key.stride_row >= p.head_dim && p.key.stride_row <= kMaxLd &&
           p.value.stride_row >= p.value_dim && p.value.stride_row <= kMaxLd;
  }

  // The library takes blocks with a tile per head (prefill, training); stacked heads and lone
  // query rows keep the kernels' own layouts.
  bool uses_brgemm() const { return brgemm_ && !stacked_ && block_->rows > 1; }

  int64_t stacked_columns() const { return round_up(heads_ * block_->rows, kWidth); }

  // Every head of the item in one tile: head g's scores are columns [g * rows, (g + 1) * rows).
  void add_keys_stacked(const RowsOperand<acc_t>& keys, const RowsOperand<acc_t>& values,
                        int64_t k0, int64_t cols) {
    const int64_t b = seq_->batch, q0 = block_->q0, rows = block_->rows;
    const int64_t columns = stacked_columns();
    acc_t* st = st_.data();
    block_matmul<acc_t, acc_t>(cols, columns, p_.head_dim, keys.data, keys.ld, 1, qt_.data(),
                               qt_ld_, st, ld_, /*accumulate=*/false);
    transform_.apply_softcap(cols, columns, st, ld_, static_cast<acc_t*>(nullptr));
    for (int64_t g = 0; g < heads_; ++g) {
      transform_.apply_head_terms(*seq_, first_head_ + g, q0, rows, k0, cols, st + g * rows, ld_);
      if (dropout_.enabled) {
        dropout_.tile_factors(b, first_head_ + g, q0, rows, k0, cols, factors_.data() + g * rows,
                              ld_);
      }
    }
    softmax_and_accumulate(heads_ * rows, columns, cols, values, m_.data(), l_.data(), acc_.data());
  }

  // One query per head, heads in turn: the scores as a row (ld 1), which the softcap sees as
  // one row of whole vectors.
  void add_keys_single_query(const RowsOperand<acc_t>& key_rows, const RowsOperand<acc_t>& values,
                             int64_t k0, int64_t cols) {
    const int64_t b = seq_->batch, q0 = block_->q0;
    acc_t* scores = st_.data();
    for (int64_t g = 0; g < heads_; ++g) {
      const int64_t h = first_head_ + g;
      single_query_scores(key_rows.data, key_rows.ld, cols, p_.head_dim,
                          query_rows_.data() + g * p_.head_dim, scores);
      transform_.apply_softcap(1, round_up(cols, kWidth), scores, 0, static_cast<acc_t*>(nullptr));
      transform_.apply_head_terms(*seq_, h, q0, 1, k0, cols, scores, 1);
      if (dropout_.enabled) {
        dropout_.tile_factors(b, h, q0, 1, k0, cols, factors_.data(), 1);
      }
      single_query_softmax_and_accumulate(cols, values, m_.data() + g * ld_, l_.data() + g * ld_,
                                          acc_.data() + g * ld_ * value_dim_padded_);
    }
  }

  // Each head on its own tile of the block's rows, heads in turn (they share the key and value
  // tiles while those are in cache).
  void add_keys_per_head(const RowsOperand<acc_t>& keys, const RowsOperand<acc_t>& values,
                         int64_t k0, int64_t cols) {
    const int64_t b = seq_->batch, q0 = block_->q0, rows = block_->rows;
    acc_t* st = st_.data();
    for (int64_t g = 0; g < heads_; ++g) {
      const int64_t h = first_head_ + g;
      block_matmul<acc_t, acc_t>(cols, block_->padded_rows, p_.head_dim, keys.data, keys.ld, 1,
                                 qt_.data() + g * p_.head_dim * qt_ld_, qt_ld_, st, ld_,
                                 /*accumulate=*/false);
      transform_.apply(*seq_, h, q0, rows, block_->padded_rows, k0, cols, st, ld_,
                       static_cast<acc_t*>(nullptr));
      if (dropout_.enabled) {
        dropout_.tile_factors(b, h, q0, rows, k0, cols, factors_.data(), ld_);
      }
      softmax_and_accumulate(rows, block_->padded_rows, cols, values, m_.data() + g * ld_,
                             l_.data() + g * ld_, acc_.data() + g * ld_ * value_dim_padded_);
    }
  }

  // add_keys_per_head with both products in cpublas::brgemm on the input type, float32
  // accumulation: S^T = K Q^T from the key rows in place, scaled afterwards in float32, and
  // O += P V from the value rows in place, P rounded to the input type (as PyTorch's kernel does).
  void add_keys_brgemm(const scalar_t* keys, const scalar_t* values, int64_t k0, int64_t cols) {
    const int64_t b = seq_->batch, q0 = block_->q0, rows = block_->rows;
    const int64_t padded_rows = block_->padded_rows;
    acc_t* st = st_.data();
    scalar_t* probs = scratch(p_reduced_, kBlockQ * kBlockK);  // P, rows kBlockK apart
    const Vec scale(static_cast<acc_t>(p_.scale));
    for (int64_t g = 0; g < heads_; ++g) {
      const int64_t h = first_head_ + g;
      reduced_matmul(cols, padded_rows, p_.head_dim, keys, p_.key.stride_row,
                     qt_reduced_.data() + g * p_.head_dim * ld_, ld_, st, ld_,
                     /*accumulate=*/false);
      for (int64_t j = 0; j < cols; ++j) {
        at::vec::map([scale](Vec x) { return x * scale; }, st + j * ld_, st + j * ld_, padded_rows);
      }
      transform_.apply(*seq_, h, q0, rows, padded_rows, k0, cols, st, ld_,
                       static_cast<acc_t*>(nullptr));
      if (dropout_.enabled) {
        dropout_.tile_factors(b, h, q0, rows, k0, cols, factors_.data(), ld_);
      }
      acc_t* acc = acc_.data() + g * ld_ * value_dim_padded_;
      online_softmax(rows, padded_rows, cols, m_.data() + g * ld_, l_.data() + g * ld_, acc);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          probs[i * kBlockK + j] = static_cast<scalar_t>(st[j * ld_ + i]);
        }
      }
      reduced_matmul(rows, p_.value_dim, cols, probs, kBlockK, values, p_.value.stride_row, acc,
                     value_dim_padded_, /*accumulate=*/true);
    }
  }

  // One key block of the online softmax for the score tile in st_ (`columns` queries, the
  // first `used` of them real): running max m, sum l, and acc += P V, element-wise over the
  // queries.
  void softmax_and_accumulate(int64_t used, int64_t columns, int64_t cols,
                              const RowsOperand<acc_t>& values, acc_t* m, acc_t* l, acc_t* acc) {
    online_softmax(used, columns, cols, m, l, acc);
    block_matmul<acc_t, acc_t>(used, value_dim_padded_, cols, st_.data(), 1, ld_, values.data,
                               values.ld, acc, value_dim_padded_, /*accumulate=*/true);
  }

  // The online softmax of softmax_and_accumulate: st_ becomes P^T (dropped out where dropout is
  // on), m and l are updated and acc rescaled to the new maximum; P V is left to the caller.
  void online_softmax(int64_t used, int64_t columns, int64_t cols, acc_t* m, acc_t* l, acc_t* acc) {
    acc_t* st = st_.data();
    for (int64_t i = 0; i < columns; i += kWidth) {
      Vec mx(negative_infinity<acc_t>());
      for (int64_t j = 0; j < cols; ++j) {
        mx = at::vec::maximum(mx, Vec::loadu(st + j * ld_ + i));
      }
      mx.store(block_max_.data() + i);
    }
    for (int64_t i = 0; i < columns; ++i) {
      rescale_[i] = online_softmax_update_max(m[i], block_max_[i]);
      offset_[i] = softmax_exp_offset(m[i]);
    }
    for (int64_t i = 0; i < columns; i += kWidth) {
      const Vec off = Vec::loadu(offset_.data() + i);
      Vec sum(acc_t(0));
      for (int64_t j = 0; j < cols; ++j) {
        const Vec prob = exp_vec(Vec::loadu(st + j * ld_ + i) - off);
        prob.store(st + j * ld_ + i);
        sum = sum + prob;
      }
      sum.store(block_sum_.data() + i);
    }
    for (int64_t i = 0; i < used; ++i) {
      l[i] = l[i] * rescale_[i] + block_sum_[i];
      if (rescale_[i] != acc_t(1)) {
        acc_t* row = acc + i * value_dim_padded_;
        const acc_t f = rescale_[i];
        at::vec::map([f](Vec x) { return x * Vec(f); }, row, row, value_dim_padded_);
      }
    }
    if (dropout_.enabled) {
      // The running sum above uses the undropped probabilities; only P V sees the mask.
      multiply_tiles(st, factors_.data(), st, cols, columns, ld_);
    }
  }

  // The same for a single query whose scores st_ holds as a row: max, exponentials and sum
  // along the keys.
  void single_query_softmax_and_accumulate(int64_t cols, const RowsOperand<acc_t>& values, acc_t* m,
                                           acc_t* l, acc_t* acc) {
    acc_t* scores = st_.data();
    const acc_t block_max = at::vec::reduce_all<acc_t>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, scores, cols);
    const acc_t rescale = online_softmax_update_max(m[0], block_max);
    const Vec offset(softmax_exp_offset(m[0]));
    at::vec::map([offset](Vec x) { return exp_vec(x - offset); }, scores, scores, cols);
    const acc_t sum =
        at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, scores, cols);
    l[0] = l[0] * rescale + sum;
    if (rescale != acc_t(1)) {
      at::vec::map([rescale](Vec x) { return x * Vec(rescale); }, acc, acc, value_dim_padded_);
    }
    if (dropout_.enabled) {
      // The running sum above uses the undropped probabilities; only P V sees the mask.
      at::vec::map2([](Vec x, Vec f) { return x * f; }, scores, scores, factors_.data(), cols);
    }
    block_matmul<acc_t, acc_t>(1, value_dim_padded_, cols, scores, cols, 1, values.data, values.ld,
                               acc, value_dim_padded_, /*accumulate=*/true);
  }

  const AttentionParams& p_;
  const ScoreTransform transform_;
  const DropoutConfig dropout_;
  const bool brgemm_;  // reduced-type tiles multiplied by cpublas::brgemm where the layout allows
  const bool stacked_;
  const int64_t ld_;     // leading dimension of every transposed tile: the item's columns
  const int64_t tiles_;  // score tiles per item: one per head, or one for stacked heads
  const int64_t value_dim_padded_;
  const int64_t qt_ld_;  // Q^T rows: the B operand of S^T = K Q^T
  // Written before they are read: no need to clear them per call.
  UninitializedBuffer<acc_t> qt_, query_rows_, acc_, m_, l_, st_;
  std::vector<acc_t> factors_;  // padding columns stay 0
  // Per query: the block's max, exp offset, rescale factor, column sum.
  UninitializedBuffer<acc_t> block_max_, offset_, rescale_, block_sum_;
  std::vector<acc_t> k_buffer_, v_buffer_;
  std::vector<scalar_t> qt_reduced_, p_reduced_;  // Q^T and P in the input type, for brgemm
  const Sequence* seq_ = nullptr;
  const QueryBlock* block_ = nullptr;
  int64_t first_head_ = 0;
  int64_t heads_ = 0;
  int64_t head_stride_ = 0;  // column of (head g, row i) = g * head_stride_ + i
};

// Writes query row i of head h: sinks join the denominator, then the normalised output and the
// row statistics.
template <typename scalar_t, typename acc_t>
void finish_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i, acc_t row_max,
                acc_t row_sum, const acc_t* unnormalised_output) {
  const acc_t* sinks = static_cast<const acc_t*>(p.sinks);
  const acc_t sink_factor =
      sinks != nullptr ? online_softmax_add_sink(row_max, row_sum, sinks[h]) : acc_t(1);
  const SoftmaxRowStats<acc_t> stats = online_softmax_finish(row_max, row_sum);
  acc_t* stats_row = p.softmax_stats.row<acc_t>(b, h, i);
  stats_row[0] = stats.offset;
  stats_row[1] = stats.log_sum;
  store_row(unnormalised_output, p.value_dim, stats.inverse_sum * sink_factor,
            p.output.row<scalar_t>(b, h, i));
}

// Work items (batch, key/value head, head chunk, query block), each over every key its block
// may see.
template <typename scalar_t>
void attention_forward_typed(const AttentionParams& p, ReducedProducts reduced_products) {
  constexpr int64_t kWidth = vector_width<at::opmath_type<scalar_t>>();
  const int64_t query_blocks = (p.query_len + kBlockQ - 1) / kBlockQ;
  const HeadChunks chunks(p);
  const int64_t items = p.batch * p.kv_heads * chunks.count * query_blocks;
  const int64_t work_per_item =
      chunks.columns_per_item(kWidth) * p.key_len * (p.head_dim + p.value_dim);

  parallel_over_items(items, work_per_item, [&](const auto& claim) {
    QueryBlockAccumulator<scalar_t> state(p, chunks, reduced_products);
    for (int64_t item = claim(); item < items; item = claim()) {
      const int64_t qb = item % query_blocks;
      const int64_t head_chunk = (item / query_blocks) % chunks.count;
      const int64_t kv_head = (item / (query_blocks * chunks.count)) % p.kv_heads;
      const Sequence seq(p, item / (query_blocks * chunks.count * p.kv_heads));
      if (qb * kBlockQ >= seq.query_len) {
        continue;  // past the end of a shorter sequence of a packed batch
      }
      const QueryBlock block(p, seq, qb, kWidth);
      const int64_t first_head = chunks.first_head(kv_head, head_chunk);
      const int64_t heads = chunks.heads_in(kv_head, head_chunk);
      state.start(seq, block, first_head, heads);
      for (int64_t k0 = block.keys.begin; k0 < block.keys.end; k0 += kBlockK) {
        state.add_keys(kv_head, k0, std::min(kBlockK, block.keys.end - k0));
      }
      for (int64_t g = 0; g < heads; ++g) {
        for (int64_t i = 0; i < block.rows; ++i) {
          finish_row<scalar_t>(p, seq.batch, first_head + g, block.q0 + i, state.running_max(g, i),
                               state.running_sum(g, i), state.output_row(g, i));
        }
      }
    }
  });
}

// Number of key ranges each (batch, key/value head, head chunk) of a one-block problem is split
// into: 1 when there are enough items already.
int64_t key_splits(const AttentionParams& p, int64_t head_chunks) {
  const int64_t items = p.batch * p.kv_heads * head_chunks;
  const int64_t key_blocks = (p.key_len + kBlockK - 1) / kBlockK;
  if (p.query_len > kBlockQ || items == 0 || items >= kSplitTargetItems) {
    return 1;
  }
  const int64_t wanted = (kSplitTargetItems + items - 1) / items;
  return std::max<int64_t>(1, std::min(wanted, key_blocks / kMinKeyBlocksPerSplit));
}

// One query block, keys split into `splits` ranges of whole key blocks: work items (batch,
// key/value head, head chunk, split) write each range's running max, sum and unnormalised
// output; then every query row combines its ranges in order, as the online softmax would have
// met them.
template <typename scalar_t>
void attention_forward_split_typed(const AttentionParams& p, int64_t splits,
                                   ReducedProducts reduced_products) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  const HeadChunks chunks(p);
  const int64_t value_dim_padded = round_up(p.value_dim, kWidth);
  const int64_t items = p.batch * p.kv_heads * chunks.count * splits;
  // Per (split, batch, head, query row): max, sum, then the output row.
  const int64_t partial_size = 2 + value_dim_padded;
  const int64_t rows_per_split = p.batch * p.heads * p.query_len;
  std::vector<acc_t> partials(splits * rows_per_split * partial_size);
  auto partial = [&](int64_t split, int64_t b, int64_t h, int64_t i) {
    return partials.data() +
           ((split * p.batch + b) * p.heads * p.query_len + h * p.query_len + i) * partial_size;
  };

  const int64_t work_per_item =
      chunks.columns_per_item(kWidth) * (p.key_len / splits) * (p.head_dim + p.value_dim);
  parallel_over_items(items, work_per_item, [&](const auto& claim) {
    QueryBlockAccumulator<scalar_t> state(p, chunks, reduced_products);
    for (int64_t item = claim(); item < items; item = claim()) {
      const int64_t split = item % splits;
      const int64_t head_chunk = (item / splits) % chunks.count;
      const int64_t kv_head = (item / (splits * chunks.count)) % p.kv_heads;
      const Sequence seq(p, item / (splits * chunks.count * p.kv_heads));
      if (seq.query_len == 0) {
        continue;
      }
      const QueryBlock block(p, seq, 0, kWidth);
      const int64_t first_head = chunks.first_head(kv_head, head_chunk);
      const int64_t heads = chunks.heads_in(kv_head, head_chunk);
      // This split's whole key blocks of the block's visible range.
      const int64_t blocks = (block.keys.end - block.keys.begin + kBlockK - 1) / kBlockK;
      const int64_t k_begin = block.keys.begin + split * blocks / splits * kBlockK;
      const int64_t k_end =
          std::min(block.keys.end, block.keys.begin + (split + 1) * blocks / splits * kBlockK);
      state.start(seq, block, first_head, heads);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
        state.add_keys(kv_head, k0, std::min(kBlockK, k_end - k0));
      }
      for (int64_t g = 0; g < heads; ++g) {
        for (int64_t i = 0; i < block.rows; ++i) {
          acc_t* out = partial(split, seq.batch, first_head + g, i);
          out[0] = state.running_max(g, i);
          out[1] = state.running_sum(g, i);
          std::copy(state.output_row(g, i), state.output_row(g, i) + p.value_dim, out + 2);
        }
      }
    }
  });

  const int64_t combine_grain = std::max<int64_t>(
      1, kMinParallelWork / std::max<int64_t>(1, splits * p.query_len * value_dim_padded));
  at::parallel_for(0, p.batch * p.heads, combine_grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> output(p.value_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.heads, h = item % p.heads;
      for (int64_t i = 0; i < p.query_len_of(b); ++i) {
        acc_t row_max = negative_infinity<acc_t>(), row_sum = 0;
        std::fill(output.begin(), output.end(), acc_t(0));
        for (int64_t split = 0; split < splits; ++split) {
          const acc_t* in = partial(split, b, h, i);
          // The split's state as one more block of the online softmax: rescale what was
          // accumulated so far to the new maximum, then add the split, rescaled likewise.
          const acc_t factor = online_softmax_update_max(row_max, in[0]);
          const acc_t split_factor =
              in[0] == negative_infinity<acc_t>()
                  ? acc_t(0)
                  : static_cast<acc_t>(std::exp(in[0] - softmax_exp_offset(row_max)));
          row_sum = row_sum * factor + in[1] * split_factor;
          for (int64_t d = 0; d < p.value_dim; ++d) {
            output[d] = output[d] * factor + in[2 + d] * split_factor;
          }
        }
        finish_row<scalar_t>(p, b, h, i, row_max, row_sum, output.data());
      }
    }
  });
}

// The attention weights, once the forward has produced the final row statistics: recompute each
// probability tile, apply dropout, and write it, or, for head-averaged weights, sum the heads of
// a query block in a fixed order in float32 and write the mean. Dense batches only.
template <typename scalar_t>
void attention_weights_typed(const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kWidth = vector_width<acc_t>();
  constexpr int64_t ld = kBlockQ;
  const int64_t heads = p.heads, query_len = p.query_len, key_len = p.key_len,
                head_dim = p.head_dim;
  const int64_t query_blocks = (query_len + kBlockQ - 1) / kBlockQ;
  const bool average = p.average_weights;
  scalar_t* weights_data = static_cast<scalar_t*>(p.weights);
  if (heads == 0) {
    // No head to average over: the mean is taken as 0 (a per-head tensor is empty anyway).
    if (average) {
      std::fill(weights_data, weights_data + p.batch * query_len * key_len, scalar_t(0));
    }
    return;
  }
  const int64_t heads_per_item = average ? heads : 1;
  const ScoreTransform transform{p};
  const DropoutConfig dropout(p);
  const acc_t head_weight = acc_t(1) / static_cast<acc_t>(heads_per_item);

  const int64_t items = p.batch * (heads / heads_per_item) * query_blocks;
  const int64_t work_per_item = heads_per_item * kBlockQ * key_len * head_dim;
  parallel_over_items(items, work_per_item, [&](const auto& claim) {
    const int64_t qt_ld = query_panel_ld<acc_t>();
    std::vector<acc_t> qt(head_dim * qt_ld), pt(kBlockK * ld);
    BlockStats<acc_t> stats;
    std::vector<acc_t> factors(dropout.enabled ? kBlockK * ld : 0);
    std::vector<acc_t> mean(average ? kBlockQ * key_len : 0);
    for (int64_t item = claim(); item < items; item = claim()) {
      const Sequence seq(p, item / ((heads / heads_per_item) * query_blocks));
      const int64_t b = seq.batch;
      const int64_t first_head = (item / query_blocks) % (heads / heads_per_item) * heads_per_item;
      const QueryBlock block(p, seq, item % query_blocks, kWidth);
      const int64_t q0 = block.q0, rows = block.rows, padded_rows = block.padded_rows;
      std::fill(mean.begin(), mean.end(), acc_t(0));
      for (int64_t h = first_head; h < first_head + heads_per_item; ++h) {
        pack_transposed(p.query.row<const scalar_t>(b, h, q0), p.query.stride_row, rows, head_dim,
                        static_cast<acc_t>(p.scale), qt.data(), qt_ld, padded_rows);
        stats.load(p, b, h, q0, rows, padded_rows);
        for (int64_t k0 = 0; k0 < key_len; k0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, key_len - k0);
          const bool visible = k0 < block.keys.end && k0 + cols > block.keys.begin;
          if (visible) {
            probability_tile(p, transform, seq, h, q0, rows, padded_rows,
                             p.key.row<const scalar_t>(b, p.kv_head_of(h), k0), p.key.stride_row,
                             qt.data(), stats.offset.data(), stats.log_sum.data(), k0, cols,
                             pt.data(), static_cast<acc_t*>(nullptr));
            if (dropout.enabled) {
              dropout.tile_factors(b, h, q0, rows, k0, cols, factors.data(), ld);
              multiply_tiles(pt.data(), factors.data(), pt.data(), cols, padded_rows, ld);
            }
          }
          for (int64_t i = 0; i < rows; ++i) {
            if (average) {
              if (visible) {
                acc_t* sum = mean.data() + i * key_len + k0;
                for (int64_t j = 0; j < cols; ++j) {
                  sum[j] += head_weight * pt[j * ld + i];
                }
              }
              continue;
            }
            scalar_t* w = weights_data + ((b * heads + h) * query_len + q0 + i) * key_len + k0;
            for (int64_t j = 0; j < cols; ++j) {
              w[j] = visible ? static_cast<scalar_t>(pt[j * ld + i]) : scalar_t(0);
            }
          }
        }
      }
      if (average) {
        for (int64_t i = 0; i < rows; ++i) {
          store_row(mean.data() + i * key_len, key_len, acc_t(1),
                    weights_data + (b * query_len + q0 + i) * key_len);
        }
      }
    }
  });
}

}  // namespace

void attention_forward_kernel(const AttentionParams& params, ReducedProducts reduced_products) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, params.dtype, "attention_forward_cpu", [&] {
        const int64_t splits = key_splits(params, HeadChunks(params).count);
        if (splits > 1) {
          attention_forward_split_typed<scalar_t>(params, splits, reduced_products);
        } else {
          attention_forward_typed<scalar_t>(params, reduced_products);
        }
        if (params.weights != nullptr) {
          attention_weights_typed<scalar_t>(params);
        }
      });
}

}  // namespace torch_mha::cpu::CPU_CAPABILITY
