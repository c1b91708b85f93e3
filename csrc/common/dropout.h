// Dropout decisions shared by the CPU and CUDA kernels (compiled by g++ and nvcc).
//
// Whether attention probability (batch b, head h, query row i, key column j) is kept is a pure
// function of (seed, b, h, i, j). The forward pass, the backward pass (which regenerates the mask
// instead of storing it) and every backend therefore agree bit for bit for the same seed.
//
// The generator is Philox4x32-10, the counter-based generator PyTorch uses (the same rounds and
// constants as ATen's philox_engine, which the tests check): key = seed, counter = (offset,
// subsequence) with subsequence = the global query row ((b * H + h) * L + i) and offset = j / 4.
// One Philox block yields the four draws for columns 4*(j/4) .. 4*(j/4)+3. It is written out here
// rather than taken from ATen's engine class so that a GPU thread can compute the draw of one
// element without a dynamically indexed state array (which would live in local memory).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace torch_mha {

namespace philox {

constexpr uint32_t kRoundMultiplier0 = 0xD2511F53u;
constexpr uint32_t kRoundMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kKeyIncrement0 = 0x9E3779B9u;
constexpr uint32_t kKeyIncrement1 = 0xBB67AE85u;

struct Block {
  uint32_t x0, x1, x2, x3;

  C10_HOST_DEVICE uint32_t operator[](int index) const {
    return index == 0 ? x0 : index == 1 ? x1 : index == 2 ? x2 : x3;
  }
};

C10_HOST_DEVICE inline uint32_t multiply_high_low(uint32_t a, uint32_t b, uint32_t* high) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *high = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Ten rounds of Philox4x32 on counter (offset, subsequence) with key = seed.
C10_HOST_DEVICE inline Block generate(uint64_t seed, uint64_t subsequence, uint64_t offset) {
  Block c{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
          static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)};
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t high0, high1;
    const uint32_t low0 = multiply_high_low(kRoundMultiplier0, c.x0, &high0);
    const uint32_t low1 = multiply_high_low(kRoundMultiplier1, c.x2, &high1);
    c = Block{high1 ^ c.x1 ^ k0, low1, high0 ^ c.x3 ^ k1, low0};
    k0 += kKeyIncrement0;
    k1 += kKeyIncrement1;
  }
  return c;
}

}  // namespace philox

// Draws are uniform 32-bit integers; an element is dropped when its draw is below the threshold,
// so the keep probability is (2^32 - threshold) / 2^32 = 1 - p up to 2^-32.
C10_HOST_DEVICE inline uint32_t dropout_threshold(double p) {
  const double scaled = p * 4294967296.0;
  return scaled >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(scaled);
}

C10_HOST_DEVICE inline uint64_t dropout_row_id(int64_t batch, int64_t head, int64_t row,
                                               int64_t num_heads, int64_t num_rows) {
  return (static_cast<uint64_t>(batch) * static_cast<uint64_t>(num_heads) +
          static_cast<uint64_t>(head)) *
             static_cast<uint64_t>(num_rows) +
         static_cast<uint64_t>(row);
}

// Keep decision for a single element: what a GPU thread owning one column uses.
C10_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t row_id, int64_t col,
                                         uint32_t threshold) {
  const philox::Block block = philox::generate(seed, row_id, static_cast<uint64_t>(col) / 4);
  return block[static_cast<int>(col % 4)] >= threshold;
}

// Walks one row of the dropout mask from `first_col` to the right, one Philox block per four
// columns: what the CPU kernels use.
class DropoutRowGenerator {
 public:
  C10_HOST_DEVICE DropoutRowGenerator(uint64_t seed, uint64_t row_id, int64_t first_col,
                                      uint32_t threshold)
      : seed_(seed),
        row_id_(row_id),
        col_(first_col),
        threshold_(threshold),
        block_(first_col % 4 == 0  // next_keep() generates it
                   ? philox::Block{0, 0, 0, 0}
                   : philox::generate(seed, row_id, static_cast<uint64_t>(first_col) / 4)) {}

  // True when the next column is kept.
  C10_HOST_DEVICE bool next_keep() {
    if (col_ % 4 == 0) {
      block_ = philox::generate(seed_, row_id_, static_cast<uint64_t>(col_) / 4);
    }
    return block_[static_cast<int>(col_++ % 4)] >= threshold_;
  }

 private:
  uint64_t seed_;
  uint64_t row_id_;
  int64_t col_;
  uint32_t threshold_;
  philox::Block block_;
};

}  // namespace torch_mha
