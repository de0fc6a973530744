#pragma once
// Evaluation driver behind the command line: the fusion metrics of every image triplet in three folders
// (--ir DIR --vi DIR --fused DIR), matched by file stem (extensions may differ: 01.png, 01.jpg, 01.bmp).
// Images run in parallel on all cores. Nothing is skipped silently: a stem that is missing from one or two
// folders is listed in the result (or, with require_complete, is an error naming the missing file), and a file
// that cannot be read or whose size differs from its sources is an error naming that file.

#include "tdfusion/io/image.hpp"
#include "tdfusion/metrics/detail/parallel.hpp"
#include "tdfusion/metrics/fusion_metrics.hpp"

#include <torch/torch.h>

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tdfusion::metrics {

struct FolderEvaluationOptions {
  TORCH_ARG(Protocol, protocol) = Protocol::cddfuse;
  TORCH_ARG(int, threads) = 0;                 ///< worker threads over images; 0: all cores
  TORCH_ARG(bool, require_complete) = false;   ///< a stem missing from a folder is an error instead of a list entry
  TORCH_ARG(std::string, method) = "";         ///< the method's label in reports; "" = the fused folder's name
};

/// A stem that is not present in all three folders, so it was not evaluated.
struct IncompleteImage {
  std::string image;                      ///< the stem
  std::vector<std::string> missing_from;  ///< among "ir", "vi", "fused"
  std::vector<std::string> present;       ///< the files that do exist
};

/// The metrics of one evaluated triplet.
struct ImageMetrics {
  std::string image;  ///< the stem
  std::string ir_path, vi_path, fused_path;
  MetricRow metrics;
};

/// The result of one fused folder: per-image rows (sorted by stem), their mean, and what was not evaluated.
struct EvaluationTable {
  std::string method;
  Protocol protocol = Protocol::cddfuse;
  std::string ir_dir, vi_dir, fused_dir;
  std::vector<std::string> metrics;  ///< metric_names(protocol)
  std::vector<ImageMetrics> rows;
  MetricRow mean;  ///< plain means over rows; a NaN value (e.g. SCD of a constant image) propagates
  std::vector<IncompleteImage> incomplete;
  /// Optional downstream-task metrics of the fused images over all rows (see evaluate_task.hpp): the
  /// headline values, the per-class ones, and which network and labels produced them.
  MetricRow task, task_per_class;
  std::string task_description;
};

namespace detail {

namespace fs = std::filesystem;

inline bool is_image_file(const fs::path& path) {
  static const std::array<const char*, 13> extensions = {".png", ".jpg", ".jpeg", ".bmp", ".tga", ".gif", ".pgm",
                                                         ".ppm", ".pnm", ".pbm", ".psd", ".tif", ".tiff"};
  std::string extension = path.extension().string();
  std::transform(extension.begin(), extension.end(), extension.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return std::find(extensions.begin(), extensions.end(), extension) != extensions.end();
}

/// stem -> path of the image files directly inside `dir` (TIFF is listed too, so that it fails loudly).
inline std::map<std::string, std::string> list_images(const std::string& dir, const char* role) {
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    throw std::runtime_error(std::string("tdfusion: the ") + role + " folder '" + dir + "' " +
                             (fs::exists(dir, error) ? "is not a directory" : "does not exist"));
  }
  std::map<std::string, std::string> images;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    if (!entry.is_regular_file(error) || !is_image_file(entry.path())) continue;
    const std::string stem = entry.path().stem().string();
    const auto [it, inserted] = images.emplace(stem, entry.path().string());
    if (!inserted) {
      std::string first = it->second, second = entry.path().string();
      if (second < first) std::swap(first, second);  // a stable message whatever the listing order
      throw std::runtime_error("tdfusion: the " + std::string(role) + " folder has two images named '" + stem +
                               "': '" + first + "' and '" + second + "'; remove one");
    }
  }
  return images;
}

inline std::string hw_string(const Eigen::ArrayXXd& image) {
  return std::to_string(image.rows()) + " x " + std::to_string(image.cols()) + " (H x W)";
}

inline ImageMetrics evaluate_triplet(const std::string& stem, const std::string& ir_path, const std::string& vi_path,
                                     const std::string& fused_path, Protocol protocol) {
  const Eigen::ArrayXXd ir = to_grey8(io::read_image(ir_path));
  const Eigen::ArrayXXd vi = to_grey8(io::read_image(vi_path));
  const Eigen::ArrayXXd fused = to_grey8(io::read_image(fused_path));
  if (ir.rows() != vi.rows() || ir.cols() != vi.cols()) {
    throw std::runtime_error("tdfusion: visible image '" + vi_path + "' is " + hw_string(vi) +
                             " but infrared image '" + ir_path + "' is " + hw_string(ir));
  }
  if (fused.rows() != ir.rows() || fused.cols() != ir.cols()) {
    throw std::runtime_error("tdfusion: fused image '" + fused_path + "' is " + hw_string(fused) +
                             " but its sources '" + ir_path + "' and '" + vi_path + "' are " + hw_string(ir));
  }
  ImageMetrics result{stem, ir_path, vi_path, fused_path, {}};
  try {
    result.metrics = evaluate_fusion(ir, vi, fused, protocol);
  } catch (const std::exception& error) {
    throw std::runtime_error("tdfusion: cannot evaluate fused image '" + fused_path + "': " + error.what());
  }
  return result;
}

inline MetricRow mean_row(const std::vector<std::string>& names, const std::vector<ImageMetrics>& rows) {
  MetricRow mean;
  for (std::size_t m = 0; m < names.size(); ++m) {
    double sum = 0.0;
    for (const ImageMetrics& row : rows) sum += row.metrics.values[m].second;
    mean.values.emplace_back(names[m], rows.empty() ? std::nan("") : sum / static_cast<double>(rows.size()));
  }
  return mean;
}

}  // namespace detail

/// Evaluates every stem present in all three folders. Throws (naming the file) for an unreadable image, a
/// source pair or fused image of mismatched size, two files with one stem in a folder, a missing folder, and
/// when no stem is complete at all.
inline EvaluationTable evaluate_folders(const std::string& ir_dir, const std::string& vi_dir,
                                        const std::string& fused_dir, const FolderEvaluationOptions& options = {}) {
  const std::array<std::map<std::string, std::string>, 3> folders = {
      detail::list_images(ir_dir, "ir"), detail::list_images(vi_dir, "vi"), detail::list_images(fused_dir, "fused")};
  const std::array<const char*, 3> roles = {"ir", "vi", "fused"};
  const std::array<const std::string*, 3> dirs = {&ir_dir, &vi_dir, &fused_dir};

  EvaluationTable table;
  table.protocol = options.protocol();
  table.metrics = metric_names(options.protocol());
  table.ir_dir = ir_dir;
  table.vi_dir = vi_dir;
  table.fused_dir = fused_dir;
  table.method = options.method();
  if (table.method.empty()) {
    const std::filesystem::path normal = std::filesystem::path(fused_dir).lexically_normal();
    table.method = normal.filename().string();
    if (table.method.empty()) table.method = normal.parent_path().filename().string();  // "dir/" ends with ""
  }

  std::map<std::string, std::array<const std::string*, 3>> stems;  // sorted union of stems
  for (std::size_t f = 0; f < 3; ++f) {
    for (const auto& [stem, path] : folders[f]) stems[stem][f] = &path;
  }
  std::vector<std::array<std::string, 4>> complete;  // stem, ir, vi, fused
  for (const auto& [stem, paths] : stems) {
    if (paths[0] && paths[1] && paths[2]) {
      complete.push_back({stem, *paths[0], *paths[1], *paths[2]});
      continue;
    }
    IncompleteImage entry{stem, {}, {}};
    for (std::size_t f = 0; f < 3; ++f) {
      if (paths[f]) {
        entry.present.push_back(*paths[f]);
      } else {
        entry.missing_from.push_back(roles[f]);
      }
    }
    if (options.require_complete()) {
      const std::size_t f = paths[0] == nullptr ? 0 : paths[1] == nullptr ? 1 : 2;  // the first missing one
      std::string message = "tdfusion: no " + std::string(roles[f]) + " image named '" + stem + ".*' in '" +
                            *dirs[f] + "' (present: ";
      for (std::size_t i = 0; i < entry.present.size(); ++i) message += (i ? ", '" : "'") + entry.present[i] + "'";
      throw std::runtime_error(message + ")");
    }
    table.incomplete.push_back(std::move(entry));
  }
  if (complete.empty()) {
    throw std::runtime_error("tdfusion: no image name is present in all of '" + ir_dir + "' (" +
                             std::to_string(folders[0].size()) + " images), '" + vi_dir + "' (" +
                             std::to_string(folders[1].size()) + ") and '" + fused_dir + "' (" +
                             std::to_string(folders[2].size()) + ")");
  }

  table.rows.resize(complete.size());
  detail::parallel_for(complete.size(), options.threads(), [&](std::size_t i) {
    const auto& [stem, ir, vi, fused] = complete[i];
    table.rows[i] = detail::evaluate_triplet(stem, ir, vi, fused, options.protocol());
  });
  table.mean = detail::mean_row(table.metrics, table.rows);
  return table;
}

/// Evaluates several methods' fused folders against the same sources: {label, fused folder} pairs, in order.
inline std::vector<EvaluationTable> evaluate_methods(const std::string& ir_dir, const std::string& vi_dir,
                                                     const std::vector<std::pair<std::string, std::string>>& methods,
                                                     FolderEvaluationOptions options = {}) {
  std::vector<EvaluationTable> tables;
  for (const auto& [label, fused_dir] : methods) {
    options.method(label);
    tables.push_back(evaluate_folders(ir_dir, vi_dir, fused_dir, options));
  }
  return tables;
}

}  // namespace tdfusion::metrics
