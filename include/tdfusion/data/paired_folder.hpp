#pragma once
// A data set of registered infrared / visible pairs on disk, for the bilevel optimiser:
//     root/ir/<stem>.<ext>   root/vi/<stem>.<ext>   [root/label/<stem>.png]
// Files are matched by stem (the extension may differ between folders, e.g. .jpg and .png). The layout is
// validated up front, so a broken data set fails before training starts rather than hours into it.

#include "tdfusion/data/pair_batch.hpp"
#include "tdfusion/data/sampling.hpp"
#include "tdfusion/data/yolo_labels.hpp"
#include "tdfusion/io/image.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace tdfusion::data {

/// One sample's files; `label` is empty when the data set has no labels.
struct PairPaths {
  std::string stem, ir, vi, label;
};

struct PairedFolderOptions {
  TORCH_ARG(int64_t, task_height) = 0;  ///< task network input size; 0 x 0 keeps each image's own size
  TORCH_ARG(int64_t, task_width) = 0;
  TORCH_ARG(int64_t, crop_size) = 256;    ///< fusion crop side at full resolution, clamped to the image size
  TORCH_ARG(std::string, label_dir) = "";  ///< the labels' folder; empty: root/label
  TORCH_ARG(int64_t, num_classes) = 0;    ///< label ids must be below this (needed when there are labels)
  TORCH_ARG(int64_t, ignore_label) = -1;  ///< label value passed through unchecked (e.g. 255); -1: none
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(bool, flip) = true;                   ///< random horizontal flips
  TORCH_ARG(bool, require_labels) = false;        ///< fail when root/label/ is absent
  TORCH_ARG(bool, ignore_labels) = false;         ///< serve no labels even where there are (fusion-only data)
  /// Check every file up front: image headers (format, matching sizes) and every label file in full (syntax,
  /// class ids), so that a bad file fails before training starts, not at its first draw.
  TORCH_ARG(bool, check_files) = true;
  TORCH_ARG(io::ImageReadOptions, ir_read) = {};  ///< e.g. a window for 16-bit thermal files
  TORCH_ARG(io::ImageReadOptions, vi_read) = {};
};

namespace detail {

/// Extensions stb decodes (Radiance HDR excluded). Other files (notes, hidden files) are skipped.
inline bool is_image_file(const std::filesystem::path& path) {
  static const std::set<std::string> extensions = {".png", ".jpg", ".jpeg", ".bmp", ".tga",
                                                   ".gif", ".psd", ".pgm",  ".ppm", ".pnm"};
  const std::string name = path.filename().string();
  return !name.empty() && name[0] != '.' && extensions.count(io::detail::lower_extension(name)) != 0;
}

/// stem -> path of the images in `directory`; rejects an empty folder and two files with one stem.
inline bool is_text_file(const std::filesystem::path& path) {
  const std::string name = path.filename().string();
  return !name.empty() && name[0] != '.' && io::detail::lower_extension(name) == ".txt";
}

/// stem -> path of the images (or, with `text_files`, the .txt files) in `directory`; rejects an empty
/// folder and two files with one stem.
inline std::map<std::string, std::string> scan_files(const std::filesystem::path& directory,
                                                     const std::string& context, bool text_files = false) {
  namespace fs = std::filesystem;
  std::error_code error;
  TORCH_CHECK(fs::is_directory(directory, error), "tdfusion: ", context, ": folder '", directory.string(),
              "' is missing");
  std::map<std::string, std::string> images;
  fs::directory_iterator entries(directory, error);
  TORCH_CHECK(!error, "tdfusion: ", context, ": cannot list '", directory.string(), "': ", error.message());
  for (const fs::directory_entry& entry : entries) {
    if (!entry.is_regular_file() || !(text_files ? is_text_file(entry.path()) : is_image_file(entry.path()))) continue;
    const std::string stem = entry.path().stem().string();
    const auto [where, inserted] = images.emplace(stem, entry.path().string());
    TORCH_CHECK(inserted, "tdfusion: ", context, ": two files share the stem '", stem, "': '",
                where->second, "' and '", entry.path().string(), "'");
  }
  TORCH_CHECK(!images.empty(), "tdfusion: ", context, ": folder '", directory.string(),
              "' contains no ", text_files ? "label files (.txt)" : "images");
  return images;
}

/// Stems of `from` with no entry in `to`, as a readable list ("'a' (path), 'b' (path) and 3 more").
inline std::string unmatched(const std::map<std::string, std::string>& from,
                             const std::map<std::string, std::string>& to, size_t* count) {
  std::ostringstream list;
  *count = 0;
  for (const auto& [stem, path] : from) {
    if (to.count(stem) != 0) continue;
    if (*count < 5) list << (*count > 0 ? ", " : "") << "'" << stem << "' (" << path << ")";
    ++*count;
  }
  if (*count > 5) list << " and " << (*count - 5) << " more";
  return list.str();
}

/// Height and width from the file's header, without decoding it (checked against the options' pixel limit).
inline std::pair<int64_t, int64_t> header_size(const std::string& path, const io::ImageReadOptions& options = {}) {
  const io::ImageInfo info = io::read_image_info(path, options);
  return {info.height, info.width};
}

}  // namespace detail

/// Pairs the images of two folders by file stem (extensions may differ), sorted by stem. An empty folder, two
/// files with one stem, or an image without a partner is an error naming the files; `context` starts the
/// message (e.g. the data set's name).
inline std::vector<PairPaths> match_pairs(const std::string& ir_dir, const std::string& vi_dir,
                                          const std::string& context) {
  const auto ir = detail::scan_files(ir_dir, context);
  const auto vi = detail::scan_files(vi_dir, context);
  size_t ir_only = 0, vi_only = 0;
  const std::string ir_list = detail::unmatched(ir, vi, &ir_only), vi_list = detail::unmatched(vi, ir, &vi_only);
  TORCH_CHECK(ir_only == 0, "tdfusion: ", context, ": missing partner in ", vi_dir, " for ", ir_only,
              " infrared image(s): ", ir_list);
  TORCH_CHECK(vi_only == 0, "tdfusion: ", context, ": missing partner in ", ir_dir, " for ", vi_only,
              " visible image(s): ", vi_list);
  std::vector<PairPaths> pairs;
  for (const auto& [stem, ir_path] : ir) pairs.push_back({stem, ir_path, vi.at(stem), std::string()});
  return pairs;
}

/// A fixed split of `count` items (e.g. pairs sorted by stem): item i is held out when i % every == every - 1,
/// so every `every`-th item is held out, spread evenly over the sorted order.
struct HoldoutSplit {
  std::vector<size_t> train, held_out;
};

inline HoldoutSplit every_nth_holdout(size_t count, size_t every) {
  TORCH_CHECK(every >= 2, "tdfusion: a hold-out split needs every >= 2 (every n-th pair held out), got ", every);
  TORCH_CHECK(count >= every, "tdfusion: holding out every ", every, "-th pair of ", count,
              " leaves no pair held out");
  HoldoutSplit split;
  for (size_t i = 0; i < count; ++i) (i % every == every - 1 ? split.held_out : split.train).push_back(i);
  return split;
}

/// Infrared / visible pairs from `root/ir` and `root/vi`, matched by file stem and sorted by stem, with
/// optional labels in `root/label` (or options.label_dir()):
/// - Target = torch::Tensor (`PairedFolder`): class-id maps, single-channel PNG with pixel value = class id
///   (as MSRS and FMB ship them), the image's size;
/// - Target = task::DetectionTarget (`DetectionFolder`): YOLO .txt files (class cx cy w h, normalised).
///
/// `get(counter)` serves pair `counter % size()`: both images as luminance (`io::read_grey`), resized
/// bilinearly (align_corners=false) to the task size, plus fusion crops cut at full resolution with the same
/// offset in both. Label maps are resized by nearest neighbour at pixel centres; normalised boxes need no
/// resize. Without labels the target is a zero map (or no boxes), so fusion-only setups still get a
/// well-formed batch. A horizontal flip, when drawn, applies to images, crops and labels alike. The crop
/// offset and the flip come from a local generator seeded with (seed, counter): the stream is reproducible,
/// can be resumed at any counter, and never touches the global generators, so `get` may be called from
/// several threads.
/// @tparam Target  torch::Tensor (label maps) or task::DetectionTarget (boxes): the task policy's Target
template <class Target>
class PairedFolderFor {
 public:
  /// Scans and checks the folder (see PairedFolderOptions::check_files); every error names the file.
  /// @param root     a folder with ir/ and vi/ (and label/ unless options.label_dir() says otherwise)
  /// @param options  task size, crop size, labels, seed, flips, how the images are read
  explicit PairedFolderFor(const std::string& root, PairedFolderOptions options = {})
      : root_(root), options_(std::move(options)) {
    namespace fs = std::filesystem;
    TORCH_CHECK((options_.task_height() == 0) == (options_.task_width() == 0) && options_.task_height() >= 0 &&
                    options_.task_width() >= 0,
                "tdfusion: PairedFolder needs a positive task size, or 0 x 0 to keep the image size; got ",
                options_.task_height(), " x ", options_.task_width());
    TORCH_CHECK(options_.crop_size() > 0, "tdfusion: PairedFolder needs crop_size > 0, got ", options_.crop_size());
    io::detail::check_read_options(options_.ir_read());
    io::detail::check_read_options(options_.vi_read());
    std::error_code error;
    TORCH_CHECK(fs::is_directory(root_, error), "tdfusion: PairedFolder: '", root_, "' is not a directory");

    const std::string context = "PairedFolder '" + root_ + "'";
    pairs_ = match_pairs((fs::path(root_) / "ir").string(), (fs::path(root_) / "vi").string(), context);

    const fs::path label_dir = options_.label_dir().empty() ? fs::path(root_) / "label" : fs::path(options_.label_dir());
    const bool has_labels = !options_.ignore_labels() && fs::is_directory(label_dir, error);
    TORCH_CHECK(has_labels || !options_.require_labels(), "tdfusion: ", context,
                ": labels are required but there is no folder '", label_dir.string(), "'");
    if (has_labels) {
      TORCH_CHECK(options_.num_classes() > 0, "tdfusion: ", context, " has labels, so it needs num_classes > 0, got ",
                  options_.num_classes());
      const auto labels = detail::scan_files(label_dir, context, /*text_files=*/kIsDetection<Target>);
      std::map<std::string, std::string> stems;
      for (const PairPaths& pair : pairs_) stems.emplace(pair.stem, pair.ir);
      size_t unlabelled = 0, orphans = 0;
      const std::string unlabelled_list = detail::unmatched(stems, labels, &unlabelled);
      const std::string orphan_list = detail::unmatched(labels, stems, &orphans);
      TORCH_CHECK(unlabelled == 0, "tdfusion: ", context, ": missing label in ", label_dir.string(), " for ",
                  unlabelled, " pair(s): ", unlabelled_list);
      TORCH_CHECK(orphans == 0, "tdfusion: ", context, ": missing partner in ir/ and vi/ for ", orphans,
                  " label(s): ", orphan_list);
      for (PairPaths& pair : pairs_) pair.label = labels.at(pair.stem);
    }
    if (options_.check_files()) {
      for (const PairPaths& pair : pairs_) {
        const auto ir_size = detail::header_size(pair.ir, options_.ir_read());
        check_sizes(pair, ir_size, detail::header_size(pair.vi, options_.vi_read()));
        if (pair.label.empty()) continue;
        if constexpr (kIsDetection<Target>) {
          read_yolo_labels(pair.label, options_.num_classes());
        } else {
          const torch::Tensor labels = io::read_label(pair.label, options_.num_classes(), options_.ignore_label());
          check_label_size(pair, ir_size, {labels.size(0), labels.size(1)});
        }
      }
    }
  }

  size_t size() const { return pairs_.size(); }

  const std::vector<PairPaths>& pairs() const { return pairs_; }

  /// The same data set restricted to the pairs at `indices` (into pairs(), in the order given).
  PairedFolderFor subset(const std::vector<size_t>& indices) const {
    TORCH_CHECK(!indices.empty(), "tdfusion: PairedFolder '", root_, "': a subset needs at least one pair");
    PairedFolderFor part = *this;
    part.pairs_.clear();
    for (const size_t i : indices) {
      TORCH_CHECK(i < pairs_.size(), "tdfusion: PairedFolder '", root_, "' has ", pairs_.size(),
                  " pairs; subset index ", i, " is out of range");
      part.pairs_.push_back(pairs_[i]);
    }
    return part;
  }

  /// Batch of one: ir / vi (1 x 1 x h x w), the target (1 x h x w int64 map, or the image's boxes), and
  /// ir_crop / vi_crop (1 x 1 x c x c, c = crop_size clamped to the image's height and width).
  PairBatch<Target> get(uint64_t counter) const {
    const PairPaths& pair = pairs_[static_cast<size_t>(counter % size())];
    const torch::Tensor ir = io::read_grey(pair.ir, options_.ir_read()), vi = io::read_grey(pair.vi, options_.vi_read());
    const int64_t height = ir.size(1), width = ir.size(2);
    check_sizes(pair, {height, width}, {vi.size(1), vi.size(2)});
    detail::SampleRng rng(detail::mix_seed(detail::splitmix64(options_.seed() ^ 0xF01DE5ull), counter));
    if constexpr (kIsDetection<Target>) {
      const torch::Tensor boxes =
          pair.label.empty() ? torch::zeros({0, 5}) : read_yolo_labels(pair.label, options_.num_classes());
      return detection_sample(ir, vi, boxes, geometry(), rng);
    } else {
      torch::Tensor labels = torch::zeros({height, width}, torch::kLong);
      if (!pair.label.empty()) {
        labels = io::read_label(pair.label, options_.num_classes(), options_.ignore_label());
        check_label_size(pair, {height, width}, {labels.size(0), labels.size(1)});
      }
      return segmentation_sample(ir, vi, labels, geometry(), rng);
    }
  }

  /// How get() samples: task size, crop size and flips of the options.
  SampleGeometry geometry() const {
    return SampleGeometry{options_.task_height(), options_.task_width(), options_.crop_size(), options_.flip()};
  }

  const std::string& root() const { return root_; }
  const PairedFolderOptions& options() const { return options_; }

 private:
  static void check_sizes(const PairPaths& pair, std::pair<int64_t, int64_t> ir, std::pair<int64_t, int64_t> vi) {
    TORCH_CHECK(ir == vi, "tdfusion: pair '", pair.stem, "' is not registered: infrared '", pair.ir, "' is ", ir.first,
                " x ", ir.second, " (H x W) but visible '", pair.vi, "' is ", vi.first, " x ", vi.second);
  }

  static void check_label_size(const PairPaths& pair, std::pair<int64_t, int64_t> image,
                               std::pair<int64_t, int64_t> label) {
    TORCH_CHECK(image == label, "tdfusion: label map '", pair.label, "' is ", label.first, " x ", label.second,
                " (H x W) but its images ('", pair.ir, "') are ", image.first, " x ", image.second);
  }

  std::string root_;
  PairedFolderOptions options_;
  std::vector<PairPaths> pairs_;
};

using PairedFolder = PairedFolderFor<torch::Tensor>;
using DetectionFolder = PairedFolderFor<task::DetectionTarget>;

}  // namespace tdfusion::data
