#pragma once
// A data set of registered infrared / visible pairs on disk, for the bilevel optimiser:
//     root/ir/<stem>.<ext>   root/vi/<stem>.<ext>   [root/label/<stem>.png]
// Files are matched by stem (the extension may differ between folders, e.g. .jpg and .png). The layout is
// validated up front, so a broken data set fails before training starts rather than hours into it.

#include "tdfusion/data/pair_batch.hpp"
#include "tdfusion/data/sampling.hpp"
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
  TORCH_ARG(int64_t, num_classes) = 0;    ///< label ids must be below this (needed when there are labels)
  TORCH_ARG(int64_t, ignore_label) = -1;  ///< label value passed through unchecked (e.g. 255); -1: none
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(bool, flip) = true;                   ///< random horizontal flips
  TORCH_ARG(bool, require_labels) = false;        ///< fail when root/label/ is absent
  TORCH_ARG(bool, check_headers) = true;          ///< read every file's header up front: format and matching sizes
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
inline std::map<std::string, std::string> scan_images(const std::filesystem::path& directory, const std::string& root) {
  namespace fs = std::filesystem;
  std::error_code error;
  TORCH_CHECK(fs::is_directory(directory, error), "tdfusion: PairedFolder '", root, "': folder '", directory.string(),
              "' is missing");
  std::map<std::string, std::string> images;
  fs::directory_iterator entries(directory, error);
  TORCH_CHECK(!error, "tdfusion: PairedFolder '", root, "': cannot list '", directory.string(), "': ", error.message());
  for (const fs::directory_entry& entry : entries) {
    if (!entry.is_regular_file() || !is_image_file(entry.path())) continue;
    const std::string stem = entry.path().stem().string();
    const auto [where, inserted] = images.emplace(stem, entry.path().string());
    TORCH_CHECK(inserted, "tdfusion: PairedFolder '", root, "': two files share the stem '", stem, "': '",
                where->second, "' and '", entry.path().string(), "'");
  }
  TORCH_CHECK(!images.empty(), "tdfusion: PairedFolder '", root, "': folder '", directory.string(),
              "' contains no images");
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

/// Height and width from the file's header, without decoding it.
inline std::pair<int64_t, int64_t> header_size(const std::string& path) {
  io::detail::FileHandle file = io::detail::open_image(path);
  int width = 0, height = 0, channels = 0;
  TORCH_CHECK(stbi_info_from_file(file.get(), &width, &height, &channels) != 0, "tdfusion: cannot read image '", path,
              "': not a readable image (", io::detail::stb_reason(), ")");
  return {height, width};
}

}  // namespace detail

/// Infrared / visible pairs from `root/ir` and `root/vi`, with optional class-id label maps in `root/label`
/// (single-channel PNG, pixel value = class id, as MSRS and FMB ship them). Pairs are sorted by stem.
///
/// `get(counter)` serves pair `counter % size()`: both images as luminance (`io::read_grey`), resized
/// bilinearly (align_corners=false) to the task size, plus fusion crops cut at full resolution with the same
/// offset in both. Labels are resized by nearest neighbour at pixel centres. Without labels the target is a
/// zero map, so fusion-only training and detection-free setups still get a well-formed batch. A horizontal
/// flip, when drawn, applies to images, crops and labels alike. The crop offset and the flip come from a
/// local generator seeded with (seed, counter): the stream is reproducible, can be resumed at any counter,
/// and never touches the global generators, so `get` may be called from several threads.
class PairedFolder {
 public:
  explicit PairedFolder(const std::string& root, PairedFolderOptions options = {})
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

    const auto ir = detail::scan_images(fs::path(root_) / "ir", root_);
    const auto vi = detail::scan_images(fs::path(root_) / "vi", root_);
    size_t ir_only = 0, vi_only = 0;
    const std::string ir_list = detail::unmatched(ir, vi, &ir_only), vi_list = detail::unmatched(vi, ir, &vi_only);
    TORCH_CHECK(ir_only == 0, "tdfusion: PairedFolder '", root_, "': missing partner in vi/ for ", ir_only,
                " infrared image(s): ", ir_list);
    TORCH_CHECK(vi_only == 0, "tdfusion: PairedFolder '", root_, "': missing partner in ir/ for ", vi_only,
                " visible image(s): ", vi_list);

    const fs::path label_dir = fs::path(root_) / "label";
    const bool has_labels = fs::is_directory(label_dir, error);
    TORCH_CHECK(has_labels || !options_.require_labels(), "tdfusion: PairedFolder '", root_,
                "': labels are required but there is no folder '", label_dir.string(), "'");
    std::map<std::string, std::string> labels;
    if (has_labels) {
      TORCH_CHECK(options_.num_classes() > 0, "tdfusion: PairedFolder '", root_,
                  "' has labels, so it needs num_classes > 0, got ", options_.num_classes());
      labels = detail::scan_images(label_dir, root_);
      size_t unlabelled = 0, orphans = 0;
      const std::string unlabelled_list = detail::unmatched(ir, labels, &unlabelled);
      const std::string orphan_list = detail::unmatched(labels, ir, &orphans);
      TORCH_CHECK(unlabelled == 0, "tdfusion: PairedFolder '", root_, "': missing label in label/ for ", unlabelled,
                  " pair(s): ", unlabelled_list);
      TORCH_CHECK(orphans == 0, "tdfusion: PairedFolder '", root_, "': missing partner in ir/ and vi/ for ", orphans,
                  " label(s): ", orphan_list);
    }

    pairs_.reserve(ir.size());
    for (const auto& [stem, ir_path] : ir) {
      pairs_.push_back({stem, ir_path, vi.at(stem), has_labels ? labels.at(stem) : std::string()});
    }
    if (options_.check_headers()) {
      for (const PairPaths& pair : pairs_) {
        const auto ir_size = detail::header_size(pair.ir);
        check_sizes(pair, ir_size, detail::header_size(pair.vi));
        if (!pair.label.empty()) check_label_size(pair, ir_size, detail::header_size(pair.label));
      }
    }
  }

  size_t size() const { return pairs_.size(); }

  const std::vector<PairPaths>& pairs() const { return pairs_; }

  /// Batch of one: ir / vi (1 x 1 x h x w), target (1 x h x w int64), ir_crop / vi_crop (1 x 1 x c x c,
  /// c = crop_size clamped to the image's height and width, so possibly not square).
  PairBatch<torch::Tensor> get(uint64_t counter) const {
    const PairPaths& pair = pairs_[static_cast<size_t>(counter % size())];
    torch::Tensor ir = io::read_grey(pair.ir, options_.ir_read()), vi = io::read_grey(pair.vi, options_.vi_read());
    const int64_t height = ir.size(1), width = ir.size(2);
    check_sizes(pair, {height, width}, {vi.size(1), vi.size(2)});
    torch::Tensor labels;
    if (!pair.label.empty()) {
      labels = io::read_label(pair.label, options_.num_classes(), options_.ignore_label());
      check_label_size(pair, {height, width}, {labels.size(0), labels.size(1)});
    } else {
      labels = torch::zeros({height, width}, torch::kLong);
    }

    detail::SampleRng rng(detail::mix_seed(detail::splitmix64(options_.seed() ^ 0xF01DE5ull), counter));
    return segmentation_sample(ir, vi, labels, geometry(), rng);
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

}  // namespace tdfusion::data
