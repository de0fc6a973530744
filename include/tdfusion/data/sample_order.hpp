#pragma once
// The order in which a trainer visits a data set. The optimiser draws samples with an ever-increasing
// counter; shuffled_counter turns it into the counter handed to the data set's `get`, so that every epoch of
// `size` draws visits each item once, in an order of its own (the release shuffles its data loader).
//
// Epoch e = counter / size visits the permutation of 0 .. size-1 drawn from (seed, e): draw p of epoch e
// becomes e * size + permutation_e[p]. A data set that serves item `counter % size` with randomness drawn
// from the whole counter thus sees every (epoch, item) once, and the map is a pure function of
// (seed, counter): a resumed run continues the same order, and the processes of one run agree on it.

#include "tdfusion/data/sampling.hpp"

#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

namespace tdfusion::data {

/// The permutation of 0 .. size-1 that epoch `epoch` visits (Fisher-Yates on a stream of (seed, epoch)).
inline std::vector<uint64_t> epoch_permutation(uint64_t size, uint64_t seed, uint64_t epoch) {
  std::vector<uint64_t> order(static_cast<size_t>(size));
  std::iota(order.begin(), order.end(), uint64_t{0});
  detail::SampleRng rng(detail::mix_seed(detail::splitmix64(seed ^ 0x5A3F1Eull), epoch));
  for (int64_t i = static_cast<int64_t>(size) - 1; i > 0; --i) {
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(rng.integer(0, i))]);
  }
  return order;
}

/// The counter to pass to a data set of `size` items for draw number `counter` (see above). O(size) per
/// call, negligible next to a training step.
inline uint64_t shuffled_counter(uint64_t counter, uint64_t size, uint64_t seed) {
  if (size < 2) return counter;
  const uint64_t epoch = counter / size;
  return epoch * size + epoch_permutation(size, seed, epoch)[static_cast<size_t>(counter % size)];
}

}  // namespace tdfusion::data
