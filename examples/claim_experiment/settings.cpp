// The two data settings: synthetic scenes (dense masks, where the task learns fast) and the 60 real MSRS pairs
// with masks filled from their detection boxes.
#include "claim_experiment.hpp"

#include <filesystem>

namespace claim {

namespace {

namespace fs = std::filesystem;

/// Every item of an unflipped data set, in order, at the task size.
template <class Dataset>
LabelledImages all_images(const Dataset& dataset) {
  std::vector<torch::Tensor> ir, vi, mask;
  for (uint64_t i = 0; i < dataset.size(); ++i) {
    const Batch b = dataset.get(i);
    ir.push_back(b.ir);
    vi.push_back(b.vi);
    mask.push_back(b.target);
  }
  return {torch::cat(ir, 0), torch::cat(vi, 0), torch::cat(mask, 0)};
}

std::vector<size_t> first(const std::vector<size_t>& indices, size_t count) {
  return {indices.begin(), indices.begin() + static_cast<std::ptrdiff_t>(std::min(count, indices.size()))};
}

}  // namespace

Setting synthetic_setting(uint64_t seed, bool quick) {
  // 64 x 64 scenes with 48 x 48 fusion crops, a quarter of the library's default size: the whole run (5 seeds,
  // 4 to 6 arms each, and MSRS) must fit in about an hour of this shared 2-core machine.
  const auto options = [&](int64_t count, uint64_t scenes_seed, bool flip) {
    return td::data::SyntheticScenesOptions().count(count).seed(scenes_seed).scene_height(64).scene_width(64)
        .task_height(64).task_width(64).crop_size(48).flip(flip);
  };
  // Training and test scenes come from different scene seeds (2s and 2s + 1), so they are disjoint, and every
  // seed of the experiment has scenes of its own.
  const td::data::SyntheticScenes train(options(quick ? 8 : 64, 2 * seed, true));
  Setting s;
  s.name = "synthetic";
  s.class_names = {"background", "warm", "textured"};
  s.classes = td::data::kSceneClasses;
  s.train_size = train.size();
  s.sample = [train](uint64_t counter) { return train.get(counter); };
  s.train = all_images(td::data::SyntheticScenes(options(quick ? 8 : 64, 2 * seed, false)));
  s.test = all_images(td::data::SyntheticScenes(options(quick ? 8 : 128, 2 * seed + 1, false)));
  return s;
}

Setting msrs_setting(const std::string& root, const std::string& mask_dir, uint64_t seed, bool quick, std::string* why) {
  const fs::path boxes_dir = fs::path(root) / "det_labels" / "fusion";
  if (!fs::is_directory(fs::path(root) / "ir") || !fs::is_directory(boxes_dir)) {
    *why = "no MSRS pairs with det_labels/fusion at '" + root + "' (see ../shared/data/SOURCES.md)";
    return {};
  }
  // Masks: the boxes filled (person 1, bicycle 2, car 3, background 0), written as label PNGs next to the
  // results so that the folder data set reads them like any other labels.
  fs::create_directories(mask_dir);
  const std::vector<td::data::PairPaths> pairs = td::data::match_pairs(
      (fs::path(root) / "ir").string(), (fs::path(root) / "vi").string(), "MSRS '" + root + "'");
  for (const td::data::PairPaths& pair : pairs) {
    const torch::Tensor ir = td::io::read_grey(pair.ir);
    const torch::Tensor boxes = td::data::read_yolo_labels((boxes_dir / (pair.stem + ".txt")).string(), 3);
    const torch::Tensor mask = td::data::box_mask(boxes, ir.size(1), ir.size(2));
    td::io::write_image((fs::path(mask_dir) / (pair.stem + ".png")).string(), mask.to(torch::kFloat) / 255.0);
  }
  const auto options = [&](bool flip) {
    // Task size 60 x 80 (an eighth of the 480 x 640 pairs per side) and 64 x 64 crops, for the same budget.
    return td::data::PairedFolderOptions().task_height(60).task_width(80).crop_size(64).label_dir(mask_dir).num_classes(4).require_labels(true).seed(seed).flip(flip);
  };
  // The split of the detection experiment: sorted by name, every 4th pair held out (15 of 60).
  const td::data::PairedFolder all(root, options(true)), unflipped(root, options(false));
  const td::data::HoldoutSplit split = td::data::every_nth_holdout(all.size(), 4);
  const std::vector<size_t> train = quick ? first(split.train, 8) : split.train;
  const std::vector<size_t> test = quick ? first(split.held_out, 4) : split.held_out;
  const td::data::PairedFolder train_folder = all.subset(train);
  Setting s;
  s.name = "msrs";
  s.class_names = {"background", "person", "bicycle", "car"};
  s.classes = 4;
  s.train_size = train_folder.size();
  s.sample = [train_folder](uint64_t counter) { return train_folder.get(counter); };
  s.train = all_images(unflipped.subset(train));
  s.test = all_images(unflipped.subset(test));
  return s;
}

}  // namespace claim
