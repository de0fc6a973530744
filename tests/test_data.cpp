// Synthetic scenes, the data set the trainer consumes, atomic files and checkpoints.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/data/synthetic_scenes.hpp"
#include "tdfusion/data/yolo_labels.hpp"
#include "tdfusion/io/atomic_file.hpp"
#include "tdfusion/io/checkpoint.hpp"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <type_traits>

namespace {

namespace fs = std::filesystem;
using namespace tdfusion::test;
using tdfusion::data::make_synthetic_scene;
using tdfusion::data::SyntheticScene;
using tdfusion::data::SyntheticScenes;
using tdfusion::data::SyntheticScenesOptions;

bool same(const torch::Tensor& a, const torch::Tensor& b) { return a.sizes() == b.sizes() && torch::equal(a, b); }

/// Local variance of an H x W image in a 5 x 5 window.
torch::Tensor local_variance(const torch::Tensor& image) {
  namespace F = torch::nn::functional;
  const auto pool = [](const torch::Tensor& x) {
    return F::avg_pool2d(x.view({1, 1, x.size(0), x.size(1)}), F::AvgPool2dFuncOptions(5).stride(1).padding(2))
        .view({x.size(0), x.size(1)});
  };
  return (pool(image.square()) - pool(image).square()).clamp_min(0.0);
}

/// The offsets (y, x) where `crop` (1 x 1 x c x c) equals a window of `image` (1 x 1 x H x W).
std::vector<std::pair<int64_t, int64_t>> crop_offsets(const torch::Tensor& image, const torch::Tensor& crop) {
  std::vector<std::pair<int64_t, int64_t>> found;
  const int64_t ch = crop.size(2), cw = crop.size(3);
  for (int64_t y = 0; y + ch <= image.size(2); ++y) {
    for (int64_t x = 0; x + cw <= image.size(3); ++x) {
      if (torch::equal(image.narrow(2, y, ch).narrow(3, x, cw), crop)) found.emplace_back(y, x);
    }
  }
  return found;
}

}  // namespace

TEST_CASE("synthetic scenes are a pure function of their arguments") {
  torch::manual_seed(7);
  const torch::Tensor expected_draw = torch::rand({4});
  torch::manual_seed(7);
  const SyntheticScene a = make_synthetic_scene(64, 80, 42);
  CHECK(same(torch::rand({4}), expected_draw));  // the global generator was not touched

  const SyntheticScene b = make_synthetic_scene(64, 80, 42);
  CHECK(same(a.ir, b.ir));
  CHECK(same(a.vi, b.vi));
  CHECK(same(a.mask, b.mask));
  CHECK(same(a.boxes, b.boxes));

  const SyntheticScene c = make_synthetic_scene(64, 80, 43);
  CHECK_FALSE(same(a.ir, c.ir));
  CHECK_FALSE(same(a.vi, c.vi));
  CHECK_FALSE(same(a.mask, c.mask));
}

TEST_CASE("synthetic scenes have the documented shapes, ranges and classes") {
  int64_t boxes_seen[2] = {0, 0};
  for (const auto& [height, width] : std::vector<std::pair<int64_t, int64_t>>{{128, 128}, {37, 53}, {96, 160}}) {
    for (uint64_t seed = 0; seed < 6; ++seed) {
      const SyntheticScene s = make_synthetic_scene(height, width, seed);
      REQUIRE(s.ir.sizes() == torch::IntArrayRef({1, height, width}));
      REQUIRE(s.vi.sizes() == torch::IntArrayRef({1, height, width}));
      REQUIRE(s.mask.sizes() == torch::IntArrayRef({height, width}));
      CHECK(s.ir.dtype() == torch::kFloat);
      CHECK(s.mask.dtype() == torch::kLong);
      CHECK(s.boxes.dtype() == torch::kFloat);
      CHECK(s.ir.min().item<float>() >= 0.0f);
      CHECK(s.ir.max().item<float>() <= 1.0f);
      CHECK(s.vi.min().item<float>() >= 0.0f);
      CHECK(s.vi.max().item<float>() <= 1.0f);
      CHECK(s.mask.min().item<int64_t>() >= 0);
      CHECK(s.mask.max().item<int64_t>() < tdfusion::data::kSceneClasses);
      REQUIRE(s.boxes.dim() == 2);
      REQUIRE(s.boxes.size(1) == 5);
      CHECK(s.boxes.size(0) <= 6);  // at most max_objects (3) per class
      if (s.boxes.size(0) == 0) continue;
      CHECK(s.boxes.min().item<float>() >= 0.0f);
      CHECK(s.boxes.max().item<float>() <= 1.0f);
      for (int64_t k = 0; k < s.boxes.size(0); ++k) ++boxes_seen[s.boxes[k][0].item<int64_t>()];
    }
  }
  CHECK(boxes_seen[0] >= 18);  // at least min_objects (1) per class in almost every scene
  CHECK(boxes_seen[1] >= 18);
  CHECK_THROWS_WITH_AS(make_synthetic_scene(4, 64, 0), doctest::Contains("8 x 8"), c10::Error);
}

TEST_CASE("each modality of a synthetic scene shows only one object class") {
  // Warm objects: a strong step in infrared, almost none in the visible image. Textured objects: local
  // variance in the visible image, none beyond sensor noise in infrared.
  double ir_minus_vi = 0.0, ir_contrast = 0.0, vi_contrast = 0.0, vi_texture = 0.0, ir_texture = 0.0;
  int warm_scenes = 0, textured_scenes = 0;
  for (uint64_t seed = 100; seed < 130; ++seed) {
    const SyntheticScene s = make_synthetic_scene(128, 128, seed);
    const torch::Tensor ir = s.ir[0], vi = s.vi[0];
    const torch::Tensor warm = s.mask == tdfusion::data::kSceneWarmObject;
    const torch::Tensor textured = s.mask == tdfusion::data::kSceneTexturedObject;
    const torch::Tensor background = s.mask == tdfusion::data::kSceneBackground;
    if (warm.any().item<bool>()) {
      ++warm_scenes;
      ir_minus_vi += (ir.masked_select(warm).mean() - vi.masked_select(warm).mean()).item<double>();
      ir_contrast += (ir.masked_select(warm).mean() - ir.masked_select(background).mean()).item<double>();
      // Visible contrast against the object's immediate surroundings (a ring 3 pixels wide).
      namespace F = torch::nn::functional;
      const torch::Tensor grown =
          F::max_pool2d(warm.to(torch::kFloat).view({1, 1, 128, 128}), F::MaxPool2dFuncOptions(7).stride(1).padding(3))
              .view({128, 128}) > 0.5;
      const torch::Tensor ring = grown.logical_and(background);
      vi_contrast += std::abs((vi.masked_select(warm).mean() - vi.masked_select(ring).mean()).item<double>());
    }
    if (textured.any().item<bool>()) {
      ++textured_scenes;
      vi_texture += local_variance(vi).masked_select(textured).mean().item<double>();
      ir_texture += local_variance(ir).masked_select(textured).mean().item<double>();
    }
  }
  REQUIRE(warm_scenes >= 25);
  REQUIRE(textured_scenes >= 25);
  ir_minus_vi /= warm_scenes;
  ir_contrast /= warm_scenes;
  vi_contrast /= warm_scenes;
  vi_texture /= textured_scenes;
  ir_texture /= textured_scenes;
  MESSAGE("warm: IR - VI ", ir_minus_vi, ", IR contrast ", ir_contrast, ", VI contrast ", vi_contrast,
          "; textured: local variance VI ", vi_texture, ", IR ", ir_texture);
  CHECK(ir_minus_vi > 0.3);
  CHECK(ir_contrast > 0.3);
  CHECK(vi_contrast < 0.05);
  CHECK(vi_contrast * 5.0 < ir_contrast);
  CHECK(vi_texture > 10.0 * ir_texture);
}

TEST_CASE("synthetic scene boxes are the tight boxes of their objects") {
  for (uint64_t seed = 0; seed < 12; ++seed) {
    const int64_t height = 96, width = 128;
    const SyntheticScene s = make_synthetic_scene(height, width, seed);
    torch::Tensor covered = torch::zeros({height, width}, torch::kLong);
    for (int64_t k = 0; k < s.boxes.size(0); ++k) {
      const auto box = s.boxes[k];
      const int64_t label = box[0].item<int64_t>() + 1;
      const int64_t x0 = std::lround((box[1].item<double>() - box[3].item<double>() / 2) * width);
      const int64_t x1 = std::lround((box[1].item<double>() + box[3].item<double>() / 2) * width);
      const int64_t y0 = std::lround((box[2].item<double>() - box[4].item<double>() / 2) * height);
      const int64_t y1 = std::lround((box[2].item<double>() + box[4].item<double>() / 2) * height);
      REQUIRE(x0 >= 0);
      REQUIRE(y0 >= 0);
      REQUIRE(x1 <= width);
      REQUIRE(y1 <= height);
      REQUIRE(x1 - x0 >= 1);
      REQUIRE(y1 - y0 >= 1);
      const torch::Tensor inside = s.mask.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0);
      // Only this object's class (or background) inside the box, and object pixels on all four edges.
      CHECK(((inside == label) | (inside == 0)).all().item<bool>());
      const torch::Tensor object = inside == label;
      CHECK(object[0].any().item<bool>());
      CHECK(object[-1].any().item<bool>());
      CHECK(object.select(1, 0).any().item<bool>());
      CHECK(object.select(1, -1).any().item<bool>());
      covered.narrow(0, y0, y1 - y0).narrow(1, x0, x1 - x0).add_(object.to(torch::kLong));
    }
    // Every object pixel is in exactly one box of its class.
    CHECK(same(covered, (s.mask > 0).to(torch::kLong)));
  }
}

TEST_CASE("SyntheticScenes serves reproducible batches with aligned crops") {
  const auto options = SyntheticScenesOptions().count(5).scene_height(64).scene_width(80).task_height(64)
                           .task_width(80).crop_size(48).seed(11).flip(false);
  const SyntheticScenes scenes(options);
  CHECK(scenes.size() == 5);
  std::set<std::pair<int64_t, int64_t>> offsets;
  for (uint64_t counter = 0; counter < 12; ++counter) {
    const auto batch = scenes.get(counter);
    batch.check();
    const SyntheticScene s = scenes.scene(counter % 5);
    REQUIRE(batch.ir.sizes() == torch::IntArrayRef({1, 1, 64, 80}));
    REQUIRE(batch.target.sizes() == torch::IntArrayRef({1, 64, 80}));
    REQUIRE(batch.ir_crop.sizes() == torch::IntArrayRef({1, 1, 48, 48}));
    CHECK(batch.target.dtype() == torch::kLong);
    // Task size == scene size, no flip: the task images are the scene itself.
    CHECK(same(batch.ir, s.ir.unsqueeze(0)));
    CHECK(same(batch.vi, s.vi.unsqueeze(0)));
    CHECK(same(batch.target, s.mask.unsqueeze(0)));
    // The crops are windows of the scene at one and the same offset (the noise makes the match unique).
    const auto ir_at = crop_offsets(batch.ir, batch.ir_crop);
    const auto vi_at = crop_offsets(batch.vi, batch.vi_crop);
    REQUIRE(ir_at.size() == 1);
    CHECK(ir_at == vi_at);
    offsets.insert(ir_at.front());
    // Reproducible from the counter alone, also in another instance.
    const auto again = SyntheticScenes(options).get(counter);
    CHECK(same(again.ir_crop, batch.ir_crop));
    CHECK(same(again.vi_crop, batch.vi_crop));
    CHECK(same(again.target, batch.target));
  }
  CHECK(offsets.size() >= 8);  // the crop offset is drawn per counter, not per scene
  CHECK_FALSE(same(scenes.scene(0).ir, scenes.scene(1).ir));
  CHECK_FALSE(same(scenes.scene(0).ir, SyntheticScenes(SyntheticScenesOptions(options).seed(12)).scene(0).ir));

  const auto swapped = scenes.get(3).with_modality_swap();
  swapped.check();
  CHECK(swapped.ir.size(0) == 2);
}

TEST_CASE("SyntheticScenes flips everything together and resizes to the task size") {
  namespace F = torch::nn::functional;
  const auto options = SyntheticScenesOptions().count(4).scene_height(72).scene_width(96).task_height(48)
                           .task_width(60).crop_size(200).seed(3);
  const SyntheticScenes scenes(options);
  int flipped = 0;
  for (uint64_t counter = 0; counter < 16; ++counter) {
    const auto batch = scenes.get(counter);
    batch.check();
    const SyntheticScene s = scenes.scene(counter % 4);
    // The crop is clamped to the scene: the whole (possibly flipped) scene.
    REQUIRE(batch.ir_crop.sizes() == torch::IntArrayRef({1, 1, 72, 96}));
    const bool is_flipped = !same(batch.ir_crop[0], s.ir);
    if (is_flipped) {
      ++flipped;
      CHECK(same(batch.ir_crop[0], s.ir.flip({-1})));
    }
    const torch::Tensor ir = is_flipped ? s.ir.flip({-1}) : s.ir;
    const torch::Tensor vi = is_flipped ? s.vi.flip({-1}) : s.vi;
    const torch::Tensor mask = is_flipped ? s.mask.flip({-1}) : s.mask;
    CHECK(same(batch.vi_crop[0], vi));
    // Task images: bilinear (align_corners=false); labels: nearest at pixel centres ("nearest-exact").
    const auto bilinear =
        F::InterpolateFuncOptions().size(std::vector<int64_t>{48, 60}).mode(torch::kBilinear).align_corners(false);
    CHECK(torch::allclose(batch.ir, F::interpolate(ir.unsqueeze(0), bilinear)));
    CHECK(torch::allclose(batch.vi, F::interpolate(vi.unsqueeze(0), bilinear)));
    // (The ATen op directly: LibTorch 1.13's interpolate() warns about align_corners for kNearestExact.)
    const std::vector<int64_t> task_size{48, 60};
    const torch::Tensor expected_target =
        torch::_upsample_nearest_exact2d(mask.view({1, 1, 72, 96}).to(torch::kFloat), torch::IntArrayRef(task_size))
            .view({1, 48, 60})
            .to(torch::kLong);
    CHECK(same(batch.target, expected_target));
  }
  CHECK(flipped >= 3);
  CHECK(flipped <= 13);
  CHECK_THROWS_WITH_AS(scenes.scene(4), doctest::Contains("out of range"), c10::Error);
  CHECK_THROWS_AS(SyntheticScenes(SyntheticScenesOptions().count(0)), c10::Error);
}

TEST_CASE("atomic writes leave either the old or the new file") {
  Scratch dir("atomic");
  const std::string path = (dir.dir / "file.txt").string();

  tdfusion::io::write_text_atomically(path, "first");
  CHECK(file_bytes(path) == "first");
  tdfusion::io::write_file_atomically(path, [](tdfusion::io::FileSink& sink) { sink.write("second"); });
  CHECK(file_bytes(path) == "second");

  // A writer that fails half way: the old content survives and no temporary file is left behind.
  const std::string message = error_message([&] {
    tdfusion::io::write_file_atomically(path, [](tdfusion::io::FileSink& sink) {
      sink.write("half");
      throw std::runtime_error("disk on fire");
    });
  });
  CHECK(message.find(path) != std::string::npos);
  CHECK(message.find("disk on fire") != std::string::npos);
  CHECK(file_bytes(path) == "second");
  CHECK(dir.entries() == std::set<std::string>{"file.txt"});

  // No previous file: still nothing at the path after a failure.
  const std::string fresh = (dir.dir / "fresh.txt").string();
  CHECK_THROWS_AS(tdfusion::io::write_file_atomically(fresh,
                                                      [](tdfusion::io::FileSink& sink) {
                                                        sink.write("x");
                                                        TORCH_CHECK(false, "writer failed");
                                                      }),
                  c10::Error);
  CHECK_FALSE(fs::exists(fresh));
  CHECK(dir.entries() == std::set<std::string>{"file.txt"});

  // A writer that writes nothing makes an empty file.
  tdfusion::io::write_file_atomically(fresh, [](tdfusion::io::FileSink&) {});
  CHECK(fs::file_size(fresh) == 0);

  const std::string missing_dir = (dir.dir / "no-such-dir" / "file.txt").string();
  const std::string missing = error_message([&] { tdfusion::io::write_text_atomically(missing_dir, "x"); });
  CHECK(missing.find(missing_dir) != std::string::npos);
  CHECK(missing.find("No such file or directory") != std::string::npos);
}

TEST_CASE("checkpoints round-trip modules, buffers, Adam state and counters") {
  Scratch dir("checkpoint");
  const std::string path = (dir.dir / "run.ckpt").string();

  auto make_models = [](uint64_t seed) {
    torch::manual_seed(seed);
    return std::make_pair(torch::nn::Linear(4, 3), torch::nn::BatchNorm1d(3));
  };
  auto train_step = [](torch::nn::Linear& linear, torch::nn::BatchNorm1d& norm, torch::optim::Adam& adam) {
    const torch::Tensor x = torch::linspace(-1.0, 1.0, 24).view({6, 4});
    adam.zero_grad();
    norm->forward(linear->forward(x)).square().sum().backward();
    adam.step();
  };

  auto [linear, norm] = make_models(1);
  torch::optim::Adam adam({linear->parameters()[0], linear->parameters()[1], norm->parameters()[0],
                           norm->parameters()[1]},
                          torch::optim::AdamOptions(0.01));
  train_step(linear, norm, adam);
  train_step(linear, norm, adam);
  static_cast<torch::optim::AdamOptions&>(adam.param_groups()[0].options()).lr(0.001);  // e.g. after StepLR

  tdfusion::io::CheckpointState saved;
  saved.modules = {{"fusion", linear.ptr()}, {"task", norm.ptr()}};
  saved.optimizers = {{"adam", &adam}};
  saved.counters = {{"epoch", 3}, {"sample", 123456789012LL}};
  tdfusion::io::save_checkpoint(path, saved);
  CHECK(dir.entries() == std::set<std::string>{"run.ckpt"});

  auto [linear2, norm2] = make_models(2);
  torch::optim::Adam adam2({linear2->parameters()[0], linear2->parameters()[1], norm2->parameters()[0],
                            norm2->parameters()[1]},
                           torch::optim::AdamOptions(0.5));
  const torch::Tensor weight_before = linear2->weight;  // loading fills the same tensors
  tdfusion::io::CheckpointState loaded;
  loaded.modules = {{"fusion", linear2.ptr()}, {"task", norm2.ptr()}};
  loaded.optimizers = {{"adam", &adam2}};
  loaded.counters = {{"epoch", 0}};
  tdfusion::io::load_checkpoint(path, loaded);

  CHECK(weight_before.is_same(linear2->weight));
  CHECK(same(linear->weight, linear2->weight));
  CHECK(same(linear->bias, linear2->bias));
  CHECK(same(norm->running_mean, norm2->running_mean));
  CHECK(same(norm->running_var, norm2->running_var));
  CHECK(same(norm->num_batches_tracked, norm2->num_batches_tracked));
  CHECK(norm2->num_batches_tracked.item<int64_t>() == 2);
  CHECK(loaded.counters == std::map<std::string, int64_t>{{"epoch", 3}, {"sample", 123456789012LL}});
  CHECK(adam2.param_groups()[0].options().get_lr() == doctest::Approx(0.001));
  for (size_t i = 0; i < 4; ++i) {
    // An optimiser's state is keyed by the parameter's TensorImpl address: as text in LibTorch 1.x, as the
    // pointer itself in 2.x.
    const auto key = [](torch::optim::Adam& optimizer, size_t index) {
      void* impl = optimizer.param_groups()[0].params()[index].unsafeGetTensorImpl();
      using Key = typename std::decay_t<decltype(optimizer.state())>::key_type;
      if constexpr (std::is_same_v<Key, std::string>) {
        std::ostringstream text;
        text << impl;
        return text.str();
      } else {
        return impl;
      }
    };
    const auto& a = static_cast<torch::optim::AdamParamState&>(*adam.state().at(key(adam, i)));
    const auto& b = static_cast<torch::optim::AdamParamState&>(*adam2.state().at(key(adam2, i)));
    CHECK(a.step() == b.step());
    CHECK(same(a.exp_avg(), b.exp_avg()));
    CHECK(same(a.exp_avg_sq(), b.exp_avg_sq()));
  }

  // Training continues identically.
  train_step(linear, norm, adam);
  train_step(linear2, norm2, adam2);
  CHECK(same(linear->weight, linear2->weight));
  CHECK(same(norm->weight, norm2->weight));
  CHECK(same(norm->running_mean, norm2->running_mean));
}

TEST_CASE("checkpoint loading names the file and the bad entry") {
  Scratch dir("checkpoint-errors");
  const std::string path = (dir.dir / "run.ckpt").string();
  torch::nn::Linear linear(4, 3);
  tdfusion::io::CheckpointState saved;
  saved.modules = {{"fusion", linear.ptr()}};
  saved.counters = {{"epoch", 5}};
  tdfusion::io::save_checkpoint(path, saved);

  auto load_message = [](const std::string& file, tdfusion::io::CheckpointState state) {
    return error_message([&] { tdfusion::io::load_checkpoint(file, state); });
  };
  auto contains = [](const std::string& text, const std::string& part) {
    INFO(text);
    CHECK(text.find(part) != std::string::npos);
  };

  const std::string missing = (dir.dir / "missing.ckpt").string();
  contains(load_message(missing, {}), missing);
  contains(load_message(missing, {}), "does not exist");

  const std::string garbage = (dir.dir / "garbage.ckpt").string();
  write_file(garbage, "this is not a zip archive");
  contains(load_message(garbage, {}), garbage);
  contains(load_message(garbage, {}), "not a readable checkpoint");

  // A valid torch archive that is not a checkpoint.
  const std::string plain = (dir.dir / "plain.pt").string();
  torch::save(linear, plain);
  contains(load_message(plain, {}), "not a tdfusion checkpoint");

  torch::nn::Linear other(4, 3);
  tdfusion::io::CheckpointState wrong_name;
  wrong_name.modules = {{"task", other.ptr()}};
  contains(load_message(path, wrong_name), "has no module 'task'");

  torch::nn::Linear wider(4, 5);
  tdfusion::io::CheckpointState wrong_shape;
  wrong_shape.modules = {{"fusion", wider.ptr()}};
  const std::string shape_message = load_message(path, wrong_shape);
  contains(shape_message, path);
  contains(shape_message, "fusion.weight");
  contains(shape_message, "[3, 4]");

  torch::nn::Sequential deeper(torch::nn::Linear(4, 3), torch::nn::ReLU());
  tdfusion::io::CheckpointState wrong_tree;
  wrong_tree.modules = {{"fusion", deeper.ptr()}};
  contains(load_message(path, wrong_tree), "fusion.0");

  tdfusion::io::CheckpointState no_counter;
  no_counter.counters = {{"step", 0}};
  contains(load_message(path, no_counter), "has no counter 'step'");

  torch::optim::Adam adam(other->parameters(), torch::optim::AdamOptions(0.1));
  tdfusion::io::CheckpointState no_optimizer;
  no_optimizer.optimizers = {{"adam", &adam}};
  contains(load_message(path, no_optimizer), "has no optimizer 'adam'");

  // A failed load changes nothing: the module listed before the missing counter keeps its values.
  const torch::Tensor before = other->weight.clone();
  tdfusion::io::CheckpointState partial;
  partial.modules = {{"fusion", other.ptr()}};
  partial.counters = {{"step", 0}};
  CHECK_THROWS_AS(tdfusion::io::load_checkpoint(path, partial), c10::Error);
  CHECK(same(other->weight, before));

  tdfusion::io::CheckpointState bad_name;
  bad_name.counters = {{"a.b", 1}};
  CHECK_THROWS_WITH_AS(tdfusion::io::save_checkpoint(path, bad_name), doctest::Contains("invalid counter name"),
                       c10::Error);
}

TEST_CASE("box_mask fills boxes by pixel centres, smaller boxes on top of larger ones") {
  using tdfusion::data::box_mask;
  // 4 x 6 pixels. Class 2 spans x 1.2 .. 3.7 and y 0 .. 2 (centres 1.5, 2.5, 3.5 and 0.5, 1.5); class 0 the
  // whole image, listed after it but larger, so painted first; class 1 runs off the left edge (x -1.5 .. 1.5).
  const torch::Tensor boxes = torch::tensor({{2.0, 2.45 / 6, 0.25, 2.5 / 6, 0.5},
                                             {0.0, 0.5, 0.5, 1.0, 1.0},
                                             {1.0, 0.0, 0.875, 0.5, 0.25}});
  const torch::Tensor expected = torch::tensor({{1, 3, 3, 3, 1, 1},  //
                                                {1, 3, 3, 3, 1, 1},
                                                {1, 1, 1, 1, 1, 1},
                                                {2, 1, 1, 1, 1, 1}}, torch::kLong);
  CHECK(same(box_mask(boxes, 4, 6), expected));
  // Equal areas: the later box wins. No boxes: all background.
  CHECK(same(box_mask(torch::tensor({{0.0, 0.5, 0.5, 1.0, 1.0}, {2.0, 0.5, 0.5, 1.0, 1.0}}), 2, 3),
             torch::full({2, 3}, 3, torch::kLong)));
  CHECK(same(box_mask(torch::zeros({0, 5}), 2, 3), torch::zeros({2, 3}, torch::kLong)));
  CHECK_THROWS_WITH_AS(box_mask(torch::zeros({2, 4}), 2, 3), doctest::Contains("box_mask needs K x 5 boxes"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(box_mask(torch::zeros({0, 5}), 0, 3), doctest::Contains("box_mask needs a positive size"),
                       c10::Error);
}
