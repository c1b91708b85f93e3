// Dropout decisions shared by the CPU and CUDA kernels (compiled by g++ and nvcc).
//
// Whether attention probability (batch b, head h, query row i, key column j) is kept is a pure
// function of (seed, b, h, i, j). The forward pass, the backward pass (which regenerates the mask
// instead of storing it) and every backend therefore agree bit for bit for the same seed.
//
// Counter layout for Philox4x32-10: key = seed, subsequence = the global query row
// ((b * H + h) * L + i), offset = j / 4. One Philox block yields the four draws for columns
// 4*(j/4) .. 4*(j/4)+3, so a row is consumed strictly left to right.
#pragma once

#include <ATen/core/PhiloxRNGEngine.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace torch_mha {

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

// Walks one row of the dropout mask from `first_col` to the right.
class DropoutRowGenerator {
 public:
  C10_HOST_DEVICE DropoutRowGenerator(uint64_t seed, uint64_t row_id, int64_t first_col,
                                      uint32_t threshold)
      : engine_(seed, row_id, static_cast<uint64_t>(first_col) / 4), threshold_(threshold) {
    for (int64_t skip = 0; skip < first_col % 4; ++skip) {
      engine_();
    }
  }

  // True when the next column is kept.
  C10_HOST_DEVICE bool next_keep() { return engine_() >= threshold_; }

 private:
  at::Philox4_32 engine_;
  uint32_t threshold_;
};

// Keep decision for a single element; what a GPU thread owning one column uses.
C10_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint64_t row_id, int64_t col,
                                         uint32_t threshold) {
  DropoutRowGenerator gen(seed, row_id, col, threshold);
  return gen.next_keep();
}

}  // namespace torch_mha
