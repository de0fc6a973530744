#pragma once
// Several data sets of one type served as one, e.g. the pair folders of several data sets.

#include <torch/torch.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace tdfusion::data {

/// Item i of the whole is item i - offset of the part it falls in. `get(counter)` serves item counter % size()
/// and hands its part the counter epoch * part size + local index (epoch = counter / size()), so a part that
/// draws its randomness from the counter sees every (epoch, item) once, as when it is used alone.
template <class Dataset>
class ConcatDataset {
 public:
  explicit ConcatDataset(std::vector<Dataset> parts) : parts_(std::move(parts)) {
    TORCH_CHECK(!parts_.empty(), "tdfusion: ConcatDataset needs at least one data set");
    for (const Dataset& part : parts_) {
      offsets_.push_back(size_);
      size_ += static_cast<uint64_t>(part.size());
    }
  }

  size_t size() const { return static_cast<size_t>(size_); }

  auto get(uint64_t counter) const {
    const uint64_t epoch = counter / size_, item = counter % size_;
    size_t part = parts_.size() - 1;
    while (offsets_[part] > item) --part;
    const uint64_t local = item - offsets_[part];
    return parts_[part].get(epoch * static_cast<uint64_t>(parts_[part].size()) + local);
  }

  const std::vector<Dataset>& parts() const { return parts_; }

 private:
  std::vector<Dataset> parts_;
  std::vector<uint64_t> offsets_;
  uint64_t size_ = 0;
};

}  // namespace tdfusion::data
