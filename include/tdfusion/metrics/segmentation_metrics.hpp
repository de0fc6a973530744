#pragma once
// Semantic segmentation metrics from an accumulated confusion matrix (no torch dependency; task_metrics.hpp
// adds tensor overloads).
//
// Conventions (those of mmsegmentation and most MSRS / FMB tables):
//   - pixels whose ground truth equals `ignore_index` are left out entirely (their prediction counts nowhere);
//   - IoU_c = TP_c / (TP_c + FP_c + FN_c), accumulated over the whole data set, not averaged per image;
//   - a class absent from both prediction and ground truth over everything accumulated (TP + FP + FN = 0) has
//     an undefined IoU (NaN) and is excluded from the mean; a class present in either counts (IoU 0 if missed);
//   - every class id, including a background / "unlabelled" class 0, is a class: MSRS's 9-class mIoU counts
//     class 0; pass ignore_index = 0 to leave it out instead.

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace tdfusion::metrics {

class ConfusionMatrix {
 public:
  /// `ignore_index`: the ground-truth value to skip (255 by default; any value outside [0, num_classes) or a
  /// class id). Predictions are never ignored; they must be class ids.
  explicit ConfusionMatrix(int64_t num_classes, int64_t ignore_index = 255)
      : num_classes_(num_classes), ignore_index_(ignore_index) {
    if (num_classes <= 0) {
      throw std::invalid_argument("tdfusion: ConfusionMatrix needs num_classes > 0, got " +
                                  std::to_string(num_classes));
    }
    counts_.assign(static_cast<std::size_t>(num_classes * num_classes), 0);
  }

  /// Adds `count` pixels: prediction[i] and target[i] are class ids (any integer type).
  template <class P, class T>
  void update(const P* prediction, const T* target, std::size_t count) {
    for (std::size_t i = 0; i < count; ++i) {
      const int64_t truth = static_cast<int64_t>(target[i]), predicted = static_cast<int64_t>(prediction[i]);
      if (predicted < 0 || predicted >= num_classes_) {
        throw std::out_of_range("tdfusion: predicted class " + std::to_string(predicted) + " at element " +
                                std::to_string(i) + " is outside [0, " + std::to_string(num_classes_) + ")");
      }
      if (truth == ignore_index_) continue;
      if (truth < 0 || truth >= num_classes_) {
        throw std::out_of_range("tdfusion: ground-truth class " + std::to_string(truth) + " at element " +
                                std::to_string(i) + " is outside [0, " + std::to_string(num_classes_) +
                                ") and is not the ignore index " + std::to_string(ignore_index_));
      }
      ++counts_[static_cast<std::size_t>(truth * num_classes_ + predicted)];
    }
  }

  template <class P, class T>
  void update(const std::vector<P>& prediction, const std::vector<T>& target) {
    if (prediction.size() != target.size()) {
      throw std::invalid_argument("tdfusion: ConfusionMatrix::update got " + std::to_string(prediction.size()) +
                                  " predictions for " + std::to_string(target.size()) + " ground-truth pixels");
    }
    update(prediction.data(), target.data(), prediction.size());
  }

  /// Adds another matrix's counts (e.g. from another thread).
  void merge(const ConfusionMatrix& other) {
    if (other.num_classes_ != num_classes_) {
      throw std::invalid_argument("tdfusion: cannot merge confusion matrices of " + std::to_string(num_classes_) +
                                  " and " + std::to_string(other.num_classes_) + " classes");
    }
    for (std::size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
  }

  void reset() { counts_.assign(counts_.size(), 0); }

  int64_t num_classes() const { return num_classes_; }
  int64_t ignore_index() const { return ignore_index_; }
  /// Pixels of ground-truth class `truth` predicted as `predicted`.
  int64_t count(int64_t truth, int64_t predicted) const {
    return counts_.at(static_cast<std::size_t>(truth * num_classes_ + predicted));
  }
  /// Row-major num_classes x num_classes counts: [truth][predicted].
  const std::vector<int64_t>& counts() const { return counts_; }
  /// Pixels counted (ignored ones excluded).
  int64_t total() const {
    int64_t sum = 0;
    for (int64_t c : counts_) sum += c;
    return sum;
  }

  /// Per-class IoU; NaN for a class absent from both prediction and ground truth.
  std::vector<double> iou() const {
    std::vector<double> result(static_cast<std::size_t>(num_classes_));
    for (int64_t c = 0; c < num_classes_; ++c) {
      int64_t predicted = 0, truth = 0;
      for (int64_t k = 0; k < num_classes_; ++k) {
        predicted += count(k, c);
        truth += count(c, k);
      }
      const int64_t tp = count(c, c), union_size = predicted + truth - tp;
      result[static_cast<std::size_t>(c)] =
          union_size == 0 ? std::nan("") : static_cast<double>(tp) / static_cast<double>(union_size);
    }
    return result;
  }

  /// Mean IoU over the classes whose IoU is defined; NaN when nothing was counted.
  double mean_iou() const { return nan_mean(iou()); }

  /// Correctly classified pixels / counted pixels; NaN when nothing was counted.
  double pixel_accuracy() const {
    int64_t correct = 0;
    for (int64_t c = 0; c < num_classes_; ++c) correct += count(c, c);
    const int64_t all = total();
    return all == 0 ? std::nan("") : static_cast<double>(correct) / static_cast<double>(all);
  }

  /// Per-class accuracy (recall: TP / ground-truth pixels); NaN for a class without ground-truth pixels.
  std::vector<double> class_accuracy() const {
    std::vector<double> result(static_cast<std::size_t>(num_classes_));
    for (int64_t c = 0; c < num_classes_; ++c) {
      int64_t truth = 0;
      for (int64_t k = 0; k < num_classes_; ++k) truth += count(c, k);
      result[static_cast<std::size_t>(c)] =
          truth == 0 ? std::nan("") : static_cast<double>(count(c, c)) / static_cast<double>(truth);
    }
    return result;
  }

  /// Mean of class_accuracy over the classes with ground truth.
  double mean_class_accuracy() const { return nan_mean(class_accuracy()); }

 private:
  static double nan_mean(const std::vector<double>& values) {
    double sum = 0.0;
    int n = 0;
    for (double v : values) {
      if (!std::isnan(v)) {
        sum += v;
        ++n;
      }
    }
    return n == 0 ? std::nan("") : sum / n;
  }

  int64_t num_classes_;
  int64_t ignore_index_;
  std::vector<int64_t> counts_;
};

}  // namespace tdfusion::metrics
