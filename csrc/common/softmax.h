// Online-softmax bookkeeping shared by the CPU and CUDA kernels (compiled by g++ and nvcc).
//
// A query row is processed one block of keys at a time. The row keeps a running maximum m and a
// running sum l of exp(s - m); when a later block raises the maximum, everything accumulated so
// far is rescaled by exp(m_old - m_new). A row whose keys are all masked (every score -inf) never
// gets a finite maximum: it must produce a zero output row, zero probabilities and zero
// gradients, never exp(-inf - -inf) = NaN.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace torch_mha {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t negative_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// max() that propagates NaN from either side, like torch.max, so NaN inputs reach the output as
// they would through the reference softmax.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t nan_propagating_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// The value subtracted before exponentiating. For a row with no finite score yet, subtracting 0
// keeps exp(-inf) = 0 instead of producing NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t softmax_exp_offset(acc_t running_max) {
  return running_max == negative_infinity<acc_t>() ? acc_t(0) : running_max;
}

// Folds a new block maximum into the running maximum and returns the factor by which the running
// sum and the output accumulator must be multiplied.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t online_softmax_update_max(acc_t& running_max, acc_t block_max) {
  const acc_t new_max = nan_propagating_max(running_max, block_max);
  // Nothing has been accumulated while the running maximum is -inf: the factor is irrelevant
  // there, but it must not be exp(-inf - -inf).
  const acc_t factor = running_max == negative_infinity<acc_t>()
                           ? acc_t(0)
                           : static_cast<acc_t>(std::exp(running_max - new_max));
  running_max = new_max;
  return factor;
}

// Adds a sink logit, a score that joins the row's softmax denominator and nothing else (no value
// row), to the running statistics. Returns the factor for the output accumulator. A row with no
// visible key ends up with the sink alone: sum 1 at offset `sink`, a zero output.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t online_softmax_add_sink(acc_t& running_max, acc_t& running_sum,
                                                     acc_t sink) {
  const acc_t factor = online_softmax_update_max(running_max, sink);
  running_sum =
      running_sum * factor + static_cast<acc_t>(std::exp(sink - softmax_exp_offset(running_max)));
  return factor;
}

// Final normalisation of a row. The row's statistics are kept as two numbers, the offset that
// was subtracted before exponentiating (the row max) and log(sum): a probability is then
// exp((s - offset) - log_sum). Folding them into one log-sum-exp would round log_sum away when
// the scores are huge finite negatives (masks of -1e9 or finfo.min: every score of the row
// rounds to the same value, and the row must come out uniform, as in torch).
// A fully masked row gets inverse_sum = 0 (zero output) and offset = +inf, so every recomputed
// probability is exp(-inf) = 0 and the row's gradients vanish exactly.
template <typename acc_t>
struct SoftmaxRowStats {
  acc_t inverse_sum;
  acc_t offset;
  acc_t log_sum;
};

template <typename acc_t>
C10_HOST_DEVICE inline SoftmaxRowStats<acc_t> online_softmax_finish(acc_t running_max,
                                                                    acc_t running_sum) {
  if (running_max == negative_infinity<acc_t>() || running_sum == acc_t(0)) {
    return {acc_t(0), std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  }
  return {acc_t(1) / running_sum, running_max, static_cast<acc_t>(std::log(running_sum))};
}

}  // namespace torch_mha
