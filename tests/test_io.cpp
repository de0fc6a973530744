// Image files, colour restoration, the paired-folder data set, and model files (state_dicts, checkpoints).
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/data/paired_folder.hpp"
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/io/checkpoint.hpp"
#include "tdfusion/io/colour.hpp"
#include "tdfusion/io/image.hpp"
#include "tdfusion/io/torch_state_dict.hpp"

#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace io = tdfusion::io;
namespace data = tdfusion::data;
using tdfusion::data::PairedFolder;
using tdfusion::data::PairedFolderOptions;
using namespace tdfusion::test;

/// C x H x W integer levels in [0, top], spread over the range, as float levels / top.
torch::Tensor level_image(int64_t channels, int64_t height, int64_t width, int64_t top, int64_t salt = 0) {
  const torch::Tensor levels =
      (torch::arange(channels * height * width, torch::kLong) * 7919 + salt).remainder(top + 1);
  return levels.to(torch::kFloat).div(static_cast<double>(top)).reshape({channels, height, width});
}

/// A smooth colour image (JPEG-friendly).
torch::Tensor smooth_image(int64_t channels, int64_t height, int64_t width) {
  const torch::Tensor y = torch::linspace(0.1, 0.9, height).view({1, height, 1});
  const torch::Tensor x = torch::linspace(0.2, 0.8, width).view({1, 1, width});
  const torch::Tensor c = torch::linspace(0.0, 0.2, channels).view({channels, 1, 1});
  return (0.5 * y + 0.4 * x + c).clamp(0.0, 1.0).to(torch::kFloat);
}

double max_abs(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

/// Writes raw values (C x H x W integers) to a 16-bit PNG.
void write_raw16(const std::string& path, const torch::Tensor& raw) {
  io::write_image(path, raw.to(torch::kDouble) / 65535.0, 16);
}

}  // namespace

TEST_CASE("image files round-trip: PNG 8/16-bit and BMP exactly, JPEG within a tolerance") {
  Scratch dir("roundtrip");
  const torch::Tensor grey = level_image(1, 13, 17, 255), rgb = level_image(3, 13, 17, 255, 5);

  io::write_image((dir / "grey.png"), grey);
  const torch::Tensor grey_back = io::read_image((dir / "grey.png"));
  CHECK(grey_back.sizes() == grey.sizes());
  CHECK(grey_back.dtype() == torch::kFloat);
  CHECK(torch::equal(grey_back, grey));

  io::write_image((dir / "rgb.PNG"), rgb);  // the extension's case does not matter
  CHECK(torch::equal(io::read_image((dir / "rgb.PNG")), rgb));

  // H x W is written as grey.
  io::write_image((dir / "plane.png"), grey[0]);
  CHECK(torch::equal(io::read_image((dir / "plane.png")), grey));

  const torch::Tensor grey16 = level_image(1, 9, 11, 65535, 3), rgb16 = level_image(3, 9, 11, 65535, 1);
  io::write_image((dir / "grey16.png"), grey16, 16);
  io::write_image((dir / "rgb16.png"), rgb16, 16);
  CHECK(torch::equal(io::read_image((dir / "grey16.png")), grey16));
  CHECK(torch::equal(io::read_image((dir / "rgb16.png")), rgb16));

  io::write_image((dir / "rgb.bmp"), rgb);
  CHECK(torch::equal(io::read_image((dir / "rgb.bmp")), rgb));
  io::write_image((dir / "grey.bmp"), grey);  // BMP stores grey as 24-bit: three equal channels
  CHECK(io::read_image((dir / "grey.bmp")).size(0) == 3);
  CHECK(torch::equal(io::read_grey((dir / "grey.bmp")), grey));

  // Out-of-range values are clamped, then rounded to the nearest level.
  io::write_image((dir / "clamped.png"), torch::tensor({-0.5, 0.2, 1.5, 0.5 / 255.0 + 1e-6}).view({1, 1, 4}));
  CHECK(torch::equal(io::read_image((dir / "clamped.png")),
                     torch::tensor({0.0f, 51.0f / 255.0f, 1.0f, 1.0f / 255.0f}).view({1, 1, 4})));

  const torch::Tensor smooth = smooth_image(3, 40, 48);
  io::write_image((dir / "smooth.jpg"), smooth);
  io::write_image((dir / "smooth.jpeg"), smooth[0].unsqueeze(0));
  const torch::Tensor jpeg = io::read_image((dir / "smooth.jpg"));
  CHECK(jpeg.sizes() == smooth.sizes());
  CHECK(max_abs(jpeg, smooth) < 0.05);
  CHECK((jpeg - smooth).abs().mean().item<double>() < 0.01);
  CHECK(max_abs(io::read_grey((dir / "smooth.jpeg")), smooth[0].unsqueeze(0)) < 0.05);
}

TEST_CASE("16-bit normalisation modes map known raw values") {
  Scratch dir("normalise");
  const std::string path = (dir / "thermal.png");
  write_raw16(path, torch::tensor({1000, 2000, 3000, 5000}).view({1, 1, 4}));
  auto read = [&](const io::ImageReadOptions& options) { return io::read_image(path, options).view({4}); };
  using io::Normalisation;

  CHECK(max_abs(read({}), torch::tensor({1000, 2000, 3000, 5000}).to(torch::kFloat) / 65535.0) < 1e-7);
  CHECK(max_abs(read(io::ImageReadOptions().normalisation(Normalisation::min_max)),
                torch::tensor({0.0, 0.25, 0.5, 1.0})) < 1e-7);
  CHECK(max_abs(read(io::ImageReadOptions().normalisation(Normalisation::window).window_low(1500).window_high(3500)),
                torch::tensor({0.0, 0.25, 0.75, 1.0})) < 1e-7);
  CHECK_THROWS_WITH_AS(read(io::ImageReadOptions().normalisation(Normalisation::window).window_low(10).window_high(10)),
                       doctest::Contains("window_low < window_high"), c10::Error);

  // A constant 16-bit image under min_max is all zeros, not NaN.
  write_raw16((dir / "flat.png"), torch::full({1, 2, 2}, 777));
  CHECK(torch::equal(io::read_image((dir / "flat.png"), io::ImageReadOptions().normalisation(Normalisation::min_max)),
                     torch::zeros({1, 2, 2})));

  // 8-bit files keep v / 255 unless asked otherwise.
  io::write_image((dir / "eight.png"), torch::tensor({51.0, 102.0, 204.0}).view({1, 1, 3}) / 255.0);
  const auto min_max = io::ImageReadOptions().normalisation(Normalisation::min_max);
  CHECK(max_abs(io::read_image((dir / "eight.png"), min_max).view({3}), torch::tensor({0.2, 0.4, 0.8})) < 1e-7);
  CHECK(max_abs(io::read_image((dir / "eight.png"), io::ImageReadOptions(min_max).normalise_8_bit(true)).view({3}),
                torch::tensor({0.0, 1.0 / 3.0, 1.0})) < 1e-7);
}

TEST_CASE("read_grey: BT.601 luma for colour files, exact values for grey content") {
  Scratch dir("grey");
  const torch::Tensor rgb =
      torch::tensor({255.0, 0.0, 0.0, 51.0, 0.0, 255.0, 0.0, 102.0, 0.0, 0.0, 255.0, 153.0}).view({3, 1, 4}) / 255.0;
  io::write_image((dir / "rgb.png"), rgb);
  const torch::Tensor expected = torch::tensor({0.299, 0.587, 0.114, (0.299 * 51 + 0.587 * 102 + 0.114 * 153) / 255.0});
  const torch::Tensor grey = io::read_grey((dir / "rgb.png"));
  CHECK(grey.sizes() == torch::IntArrayRef({1, 1, 4}));
  CHECK(max_abs(grey.view({4}), expected) < 1e-6);

  // RGB files holding grey content (TNO) come back bit-exact.
  const torch::Tensor plane = level_image(1, 5, 6, 255);
  io::write_image((dir / "grey-as-rgb.png"), plane.expand({3, 5, 6}));
  CHECK(io::read_image((dir / "grey-as-rgb.png")).size(0) == 3);
  CHECK(torch::equal(io::read_grey((dir / "grey-as-rgb.png")), plane));
}

TEST_CASE("YCbCr conversion uses OpenCV's BT.601 constants and round-trips") {
  const torch::Tensor red = torch::tensor({1.0, 0.0, 0.0}).view({3, 1, 1});
  const double mid = 128.0 / 255.0;
  const torch::Tensor ycc = io::rgb_to_ycbcr(red).view({3});
  CHECK(max_abs(ycc, torch::tensor({0.299, 0.564 * (0.0 - 0.299) + mid, 0.713 * (1.0 - 0.299) + mid})) < 1e-6);

  // Grey has neutral chroma.
  const torch::Tensor grey = io::rgb_to_ycbcr(torch::full({3, 2, 2}, 0.3));
  CHECK(max_abs(grey[0], torch::full({2, 2}, 0.3)) < 1e-6);
  CHECK(max_abs(grey.narrow(0, 1, 2), torch::full({2, 2, 2}, mid)) < 1e-6);

  torch::manual_seed(1);
  const torch::Tensor batch = torch::rand({2, 3, 8, 9});
  const torch::Tensor converted = io::rgb_to_ycbcr(batch);
  CHECK(converted.sizes() == batch.sizes());
  CHECK(max_abs(io::ycbcr_to_rgb(converted), batch) < 1e-3);  // OpenCV's rounded inverse constants
  CHECK_THROWS_WITH_AS(io::rgb_to_ycbcr(torch::rand({1, 4, 4})), doctest::Contains("3 x H x W"), c10::Error);
}

TEST_CASE("fuse_chroma matches hand-computed values on both scales") {
  // 0..255 scale, m = 128, eps = 1e-4: deviations +22 and -28.
  const torch::Tensor c1 = torch::tensor({150.0, 128.0, 128.0, 200.0}, torch::kDouble),
                      c2 = torch::tensor({100.0, 90.0, 128.0, 56.0}, torch::kDouble);
  const torch::Tensor fused = io::fuse_chroma(c1, c2, 128.0, 1e-4);
  const double expected0 = 128.0 + (22.0 * 22.0 - 28.0 * 28.0) / (50.0 + 1e-4);
  CHECK(fused[0].item<double>() == doctest::Approx(expected0).epsilon(1e-12));
  CHECK(fused[1].item<double>() == doctest::Approx(128.0 - 38.0 * 38.0 / (38.0 + 1e-4)).epsilon(1e-12));
  CHECK(fused[2].item<double>() == doctest::Approx(128.0).epsilon(1e-12));  // both neutral stay neutral
  CHECK(fused[3].item<double>() == doctest::Approx(128.0).epsilon(1e-12));  // opposite, equal: cancel
  // The spec's literal form differs by m eps / (|C1-m| + |C2-m| + eps) where the sources have chroma.
  const double literal0 = (150.0 * 22.0 + 100.0 * 28.0) / (50.0 + 1e-4);
  CHECK(std::abs(fused[0].item<double>() - literal0) < 128.0 * 1e-4 / 50.0 * 1.001);

  // On [0,1] data with the defaults, the same result scaled by 1/255.
  const torch::Tensor unit = io::fuse_chroma(c1 / 255.0, c2 / 255.0);
  CHECK(max_abs(unit * 255.0, fused) < 1e-9);
}

TEST_CASE("restore_colour: copied, fused or no chroma depending on the sources") {
  torch::manual_seed(2);
  const int64_t h = 6, w = 7;
  const torch::Tensor fused_y = 0.35 + 0.3 * torch::rand({1, h, w});
  const torch::Tensor vi = 0.35 + 0.3 * torch::rand({3, h, w});
  const torch::Tensor ir_grey = torch::rand({1, h, w});
  const torch::Tensor ir_as_rgb = ir_grey.expand({3, h, w}).contiguous();

  // Grey infrared, colour visible: the output keeps the visible chroma and the fused luminance.
  for (const torch::Tensor& ir : {ir_grey, ir_as_rgb}) {
    const torch::Tensor out = io::restore_colour(fused_y, ir, vi);
    REQUIRE(out.sizes() == torch::IntArrayRef({3, h, w}));
    const torch::Tensor out_ycc = io::rgb_to_ycbcr(out), vi_ycc = io::rgb_to_ycbcr(vi);
    CHECK(max_abs(out_ycc.narrow(0, 1, 2), vi_ycc.narrow(0, 1, 2)) < 1e-3);
    CHECK(max_abs(out_ycc[0], fused_y[0]) < 1e-3);
  }
  // The other way round: the infrared chroma is copied.
  const torch::Tensor swapped = io::restore_colour(fused_y, vi, ir_grey);
  CHECK(torch::allclose(swapped, io::restore_colour(fused_y, ir_grey, vi)));

  // Grey in, grey out (H x W luminance accepted too).
  const torch::Tensor grey_out = io::restore_colour(fused_y[0], ir_grey, ir_as_rgb);
  CHECK(grey_out.sizes() == torch::IntArrayRef({1, h, w}));
  CHECK(torch::equal(grey_out, fused_y));

  // Both in colour: fused chroma.
  const torch::Tensor ir_colour = 0.35 + 0.3 * torch::rand({3, h, w});
  const torch::Tensor both = io::restore_colour(fused_y, ir_colour, vi);
  const torch::Tensor expected_chroma =
      io::fuse_chroma(io::rgb_to_ycbcr(ir_colour).narrow(0, 1, 2), io::rgb_to_ycbcr(vi).narrow(0, 1, 2));
  CHECK(max_abs(io::rgb_to_ycbcr(both).narrow(0, 1, 2), expected_chroma) < 1e-3);

  // Out-of-gamut combinations are clamped.
  const torch::Tensor saturated = io::restore_colour(torch::ones({1, h, w}), ir_grey, vi);
  CHECK(saturated.min().item<double>() >= 0.0);
  CHECK(saturated.max().item<double>() <= 1.0);

  CHECK_THROWS_WITH_AS(io::restore_colour(fused_y, ir_grey, torch::rand({3, h + 1, w})), doctest::Contains("visible"),
                       c10::Error);
}

TEST_CASE("min_max_normalise stretches each image to [0,1]") {
  CHECK(max_abs(io::min_max_normalise(torch::tensor({2.0, 4.0, 6.0})), torch::tensor({0.0, 0.5, 1.0})) < 1e-12);
  const torch::Tensor batch = torch::stack({torch::tensor({1.0, 3.0}), torch::tensor({-2.0, 2.0})}).view({2, 1, 1, 2});
  CHECK(max_abs(io::min_max_normalise(batch), torch::tensor({0.0, 1.0, 0.0, 1.0}).view({2, 1, 1, 2})) < 1e-12);
  CHECK(torch::equal(io::min_max_normalise(torch::full({1, 3, 3}, 0.7)), torch::zeros({1, 3, 3})));
}

TEST_CASE("read_label reads class ids and names the file, value and pixel of a bad id") {
  Scratch dir("label");
  torch::Tensor ids = torch::arange(20, torch::kLong).remainder(9).view({4, 5});
  io::write_image((dir / "ok.png"), ids.to(torch::kDouble).unsqueeze(0) / 255.0);
  const torch::Tensor labels = io::read_label((dir / "ok.png"), 9);
  CHECK(labels.dtype() == torch::kLong);
  CHECK(torch::equal(labels, ids));

  const torch::Tensor wide = torch::arange(0, 600, 30, torch::kLong).view({4, 5});
  write_raw16((dir / "sixteen.png"), wide.unsqueeze(0));
  CHECK(torch::equal(io::read_label((dir / "sixteen.png"), 600), wide));

  torch::Tensor bad = ids.clone();
  bad[2][3] = 9;
  io::write_image((dir / "bad.png"), bad.to(torch::kDouble).unsqueeze(0) / 255.0);
  const std::string message = error_message([&] { io::read_label((dir / "bad.png"), 9); });
  CHECK(contains(message, (dir / "bad.png")));
  CHECK(contains(message, "class id 9"));
  CHECK(contains(message, "row 2, col 3"));

  torch::Tensor ignored = ids.clone();
  ignored[1][1] = 255;
  io::write_image((dir / "ignored.png"), ignored.to(torch::kDouble).unsqueeze(0) / 255.0);
  CHECK(torch::equal(io::read_label((dir / "ignored.png"), 9, 255), ignored));
  CHECK(contains(error_message([&] { io::read_label((dir / "ignored.png"), 9); }), "class id 255"));

  // Three equal channels are accepted; colour-coded labels are not.
  io::write_image((dir / "rgb-equal.png"), ids.to(torch::kDouble).unsqueeze(0).expand({3, 4, 5}) / 255.0);
  CHECK(torch::equal(io::read_label((dir / "rgb-equal.png"), 9), ids));
  torch::Tensor colour = ids.to(torch::kDouble).unsqueeze(0).repeat({3, 1, 1}) / 255.0;
  colour[1][0][4] = 0.5;
  io::write_image((dir / "colour.png"), colour);
  const std::string colour_message = error_message([&] { io::read_label((dir / "colour.png"), 9); });
  CHECK(contains(colour_message, (dir / "colour.png")));
  CHECK(contains(colour_message, "row 0, col 4"));

  io::write_image((dir / "lossy.jpg"), ids.to(torch::kDouble).unsqueeze(0) / 255.0);
  CHECK_THROWS_WITH_AS(io::read_label((dir / "lossy.jpg"), 9), doctest::Contains("JPEG"), c10::Error);
}

TEST_CASE("image reading and writing errors name the file and the problem") {
  Scratch dir("errors");
  const std::string missing = (dir / "missing.png");
  const std::string missing_message = error_message([&] { io::read_image(missing); });
  CHECK(contains(missing_message, missing));
  CHECK(contains(missing_message, "No such file or directory"));

  const std::string text = (dir / "notes.png");
  std::ofstream(text) << "this is not a PNG file, only text\n";
  const std::string text_message = error_message([&] { io::read_image(text); });
  CHECK(contains(text_message, text));
  CHECK(contains(text_message, "not a readable image"));

  const std::string empty = (dir / "empty.png");
  std::ofstream{empty};
  CHECK(contains(error_message([&] { io::read_grey(empty); }), "'" + empty + "': the file is empty"));

  // A valid PNG cut in half: noise does not compress, so half the file is half the pixel data.
  torch::manual_seed(3);
  const std::string truncated = (dir / "truncated.png");
  io::write_image(truncated, torch::rand({3, 64, 64}));
  CHECK_NOTHROW(io::read_image(truncated));
  fs::resize_file(truncated, fs::file_size(truncated) / 2);
  const std::string truncated_message = error_message([&] { io::read_image(truncated); });
  CHECK(contains(truncated_message, truncated));
  CHECK(contains(truncated_message, "corrupt or truncated"));
  MESSAGE("truncated PNG: " << truncated_message);

  CHECK(contains(error_message([&] { io::read_image(dir.dir.string()); }), "is a directory"));

  const torch::Tensor image = torch::rand({1, 4, 4});
  const std::string tiff = (dir / "out.tif");
  const std::string tiff_message = error_message([&] { io::write_image(tiff, image); });
  CHECK(contains(tiff_message, tiff));
  CHECK(contains(tiff_message, "unknown image format '.tif'"));
  CHECK_THROWS_WITH_AS(io::write_image((dir / "deep.jpg"), image, 16), doctest::Contains("16-bit output needs PNG"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image((dir / "odd.png"), image, 12), doctest::Contains("8 or 16"), c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image((dir / "rgba.png"), torch::rand({4, 4, 4})), doctest::Contains("C = 1 or 3"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image((dir / "nan.png"), torch::full({1, 2, 2}, NAN)), doctest::Contains("NaN"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image((dir / "ints.png"), torch::ones({1, 2, 2}, torch::kLong)),
                       doctest::Contains("floating-point"), c10::Error);
  const std::string nowhere = (dir / "no-such-dir/out.png");
  CHECK(contains(error_message([&] { io::write_image(nowhere, image); }), nowhere));
  CHECK(contains(error_message([&] { io::write_image((dir / "no-such-dir/out16.png"), image, 16); }), "out16.png"));
}

namespace {

/// root/{ir,vi}[/label] with `count` pairs of h x w images; ir pixels are label ids / 255, so a batch's
/// target can be checked against its infrared image.
void make_pair_folder(const fs::path& root, int count, int64_t h, int64_t w, bool labels) {
  fs::create_directories(root / "ir");
  fs::create_directories(root / "vi");
  if (labels) fs::create_directories(root / "label");
  for (int i = 0; i < count; ++i) {
    const std::string stem = "pair" + std::to_string(i);
    const torch::Tensor ids = (torch::arange(h * w, torch::kLong) * (i + 3)).remainder(5).view({1, h, w});
    io::write_image((root / "ir" / (stem + ".png")).string(), ids.to(torch::kDouble) / 255.0);
    io::write_image((root / "vi" / (stem + ".bmp")).string(), level_image(3, h, w, 255, i));
    if (labels) io::write_image((root / "label" / (stem + ".png")).string(), ids.to(torch::kDouble) / 255.0);
  }
}

/// All offsets (y, x) at which `crop` (1 x 1 x ch x cw) is a window of `image` (1 x 1 x H x W).
std::vector<std::pair<int64_t, int64_t>> window_offsets(const torch::Tensor& image, const torch::Tensor& crop) {
  std::vector<std::pair<int64_t, int64_t>> found;
  for (int64_t y = 0; y + crop.size(2) <= image.size(2); ++y) {
    for (int64_t x = 0; x + crop.size(3) <= image.size(3); ++x) {
      if (torch::equal(image.narrow(2, y, crop.size(2)).narrow(3, x, crop.size(3)), crop)) found.emplace_back(y, x);
    }
  }
  return found;
}

}  // namespace

TEST_CASE("PairedFolder serves reproducible, aligned batches with labels following the flip") {
  Scratch dir("folder");
  make_pair_folder(dir.dir, 3, 12, 16, /*labels=*/true);
  PairedFolder folder(dir.dir.string(), PairedFolderOptions().crop_size(8).num_classes(5));
  REQUIRE(folder.size() == 3);
  CHECK(folder.pairs()[1].stem == "pair1");
  CHECK(folder.pairs()[1].vi == (dir.dir / "vi" / "pair1.bmp").string());
  CHECK(folder.pairs()[1].label == (dir.dir / "label" / "pair1.png").string());

  int flips = 0;
  for (uint64_t counter = 0; counter < 16; ++counter) {
    const auto batch = folder.get(counter);
    batch.check();
    REQUIRE(batch.ir.sizes() == torch::IntArrayRef({1, 1, 12, 16}));
    REQUIRE(batch.target.sizes() == torch::IntArrayRef({1, 12, 16}));
    REQUIRE(batch.ir_crop.sizes() == torch::IntArrayRef({1, 1, 8, 8}));
    CHECK(batch.target.dtype() == torch::kLong);
    // The target follows the image through the flip: ir = ids / 255 pixel for pixel.
    CHECK(torch::equal(batch.target, (batch.ir[0] * 255.0).round().to(torch::kLong)));
    // Both crops come from the same window of the (possibly flipped) full-resolution images.
    const auto offsets = window_offsets(batch.vi, batch.vi_crop);
    REQUIRE(offsets.size() == 1);
    const auto [y, x] = offsets[0];
    CHECK(torch::equal(batch.ir.narrow(2, y, 8).narrow(3, x, 8), batch.ir_crop));
    // Flipped or not, relative to the file.
    const torch::Tensor file_vi = io::read_grey(folder.pairs()[counter % 3].vi).unsqueeze(0);
    const bool flipped = torch::equal(batch.vi, file_vi.flip({-1}));
    CHECK((flipped || torch::equal(batch.vi, file_vi)));
    flips += flipped ? 1 : 0;
    // Reproducible from (seed, counter).
    const auto again = folder.get(counter);
    CHECK(torch::equal(again.ir_crop, batch.ir_crop));
    CHECK(torch::equal(again.target, batch.target));
  }
  CHECK(flips > 0);
  CHECK(flips < 16);

  PairedFolder unflipped(dir.dir.string(), PairedFolderOptions().crop_size(100).num_classes(5).flip(false));
  const auto whole = unflipped.get(4);
  CHECK(whole.ir_crop.sizes() == torch::IntArrayRef({1, 1, 12, 16}));  // crop clamped to the image
  CHECK(torch::equal(whole.vi, io::read_grey(unflipped.pairs()[1].vi).unsqueeze(0)));

  // Resized to the task size: bilinear images, nearest labels (still valid class ids).
  PairedFolder resized(dir.dir.string(),
                       PairedFolderOptions().task_height(6).task_width(10).crop_size(8).num_classes(5));
  const auto small = resized.get(0);
  small.check();
  CHECK(small.ir.sizes() == torch::IntArrayRef({1, 1, 6, 10}));
  CHECK(small.target.sizes() == torch::IntArrayRef({1, 6, 10}));
  CHECK(small.ir_crop.sizes() == torch::IntArrayRef({1, 1, 8, 8}));
  CHECK(small.target.min().item<int64_t>() >= 0);
  CHECK(small.target.max().item<int64_t>() < 5);
  const auto swapped = small.with_modality_swap();
  CHECK(swapped.ir.size(0) == 2);

  // Labels out of range are reported when read.
  CHECK_THROWS_WITH_AS(PairedFolder(dir.dir.string(), PairedFolderOptions().num_classes(3)).get(0),
                       doctest::Contains("pair0.png"), c10::Error);
}

TEST_CASE("a fixed hold-out split and subsets of a PairedFolder") {
  const data::HoldoutSplit split = data::every_nth_holdout(10, 4);
  CHECK(split.held_out == std::vector<size_t>{3, 7});
  CHECK(split.train == std::vector<size_t>{0, 1, 2, 4, 5, 6, 8, 9});
  CHECK_THROWS_WITH_AS(data::every_nth_holdout(10, 1), doctest::Contains("every >= 2"), c10::Error);
  CHECK_THROWS_WITH_AS(data::every_nth_holdout(3, 4), doctest::Contains("leaves no pair held out"), c10::Error);

  Scratch dir("subset");
  make_pair_folder(dir.dir, 4, 12, 16, /*labels=*/true);
  const PairedFolder folder(dir.dir.string(), PairedFolderOptions().crop_size(8).num_classes(5).flip(false));
  const PairedFolder part = folder.subset({3, 1});
  REQUIRE(part.size() == 2);
  CHECK(part.pairs()[0].stem == "pair3");
  CHECK(part.pairs()[1].stem == "pair1");
  CHECK(torch::equal(part.get(0).vi, folder.get(3).vi));
  CHECK(torch::equal(part.get(3).target, folder.get(1).target));  // counters cycle through the subset
  CHECK_THROWS_WITH_AS(folder.subset({4}), doctest::Contains("out of range"), c10::Error);
  CHECK_THROWS_WITH_AS(folder.subset({}), doctest::Contains("at least one pair"), c10::Error);
}

TEST_CASE("PairedFolder validates the folder layout and names the offending files") {
  Scratch dir("layout");
  const std::string root = dir.dir.string();
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("is missing"), c10::Error);

  make_pair_folder(dir.dir, 2, 8, 8, /*labels=*/false);
  std::ofstream((dir.dir / "ir" / "README.txt").string()) << "not an image\n";  // skipped
  PairedFolder unlabelled(root);
  CHECK(unlabelled.size() == 2);
  const auto batch = unlabelled.get(1);
  CHECK(torch::equal(batch.target, torch::zeros({1, 8, 8}, torch::kLong)));  // no labels: zero target
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().require_labels(true)),
                       doctest::Contains("labels are required"), c10::Error);

  // A file with no partner in the other folder.
  io::write_image((dir.dir / "ir" / "lonely.png").string(), torch::rand({1, 8, 8}));
  const std::string partner = error_message([&] { PairedFolder{root}; });
  CHECK(contains(partner, "missing partner"));
  CHECK(contains(partner, "'lonely'"));
  fs::remove(dir.dir / "ir" / "lonely.png");
  io::write_image((dir.dir / "vi" / "stray.jpg").string(), torch::rand({3, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("'stray'"), c10::Error);
  fs::remove(dir.dir / "vi" / "stray.jpg");

  // Two files with one stem in one folder are ambiguous.
  io::write_image((dir.dir / "ir" / "pair0.bmp").string(), torch::rand({1, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("share the stem 'pair0'"), c10::Error);
  fs::remove(dir.dir / "ir" / "pair0.bmp");

  // Images of a pair that differ in size: both files are named, up front or when read.
  const std::string ir_path = (dir.dir / "ir" / "pair1.png").string(),
                    vi_path = (dir.dir / "vi" / "pair1.bmp").string();
  io::write_image(vi_path, torch::rand({3, 8, 10}));
  for (const std::string& message : {error_message([&] { PairedFolder{root}; }), error_message([&] {
                                       PairedFolder(root, PairedFolderOptions().check_files(false)).get(1);
                                     })}) {
    CHECK(contains(message, ir_path));
    CHECK(contains(message, vi_path));
    CHECK(contains(message, "8 x 8"));
    CHECK(contains(message, "8 x 10"));
  }
  io::write_image(vi_path, torch::rand({3, 8, 8}));

  // Labels: every pair needs one, and num_classes must be given.
  fs::create_directories(dir.dir / "label");
  io::write_image((dir.dir / "label" / "pair0.png").string(), torch::zeros({1, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().num_classes(2)), doctest::Contains("missing label"),
                       c10::Error);
  io::write_image((dir.dir / "label" / "pair1.png").string(), torch::zeros({1, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("num_classes > 0"), c10::Error);
  CHECK(PairedFolder(root, PairedFolderOptions().num_classes(2)).size() == 2);

  // A file that stops being readable after the scan is reported when read.
  std::ofstream(ir_path, std::ios::trunc) << "garbage";
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().num_classes(2).check_files(false)).get(1),
                       doctest::Contains(ir_path.c_str()), c10::Error);

  fs::create_directories(dir.dir / "empty" / "ir");
  fs::create_directories(dir.dir / "empty" / "vi");
  CHECK_THROWS_WITH_AS(PairedFolder((dir.dir / "empty").string()), doctest::Contains("contains no images"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().task_height(10)), doctest::Contains("task size"),
                       c10::Error);
}

TEST_CASE("PairedFolder on the real TNO and MSRS pairs") {
  const std::string tno_dir = shared_path("data/tno");
  if (tno_dir.empty()) return;
  const fs::path data = fs::path(tno_dir).parent_path();
  PairedFolder tno(tno_dir);
  REQUIRE(tno.size() == 25);
  CHECK(tno.pairs().front().stem == "01");
  CHECK(tno.pairs().back().stem == "25");
  for (uint64_t counter : {0ull, 13ull, 24ull, 25ull}) {
    const auto batch = tno.get(counter);
    batch.check();
    const auto& pair = tno.pairs()[counter % 25];
    const torch::Tensor ir = io::read_grey(pair.ir);
    CHECK(batch.ir.sizes() == torch::IntArrayRef({1, 1, ir.size(1), ir.size(2)}));
    CHECK(batch.ir_crop.sizes() == torch::IntArrayRef({1, 1, 256, 256}));  // every TNO image is at least 256 x 256
    CHECK(batch.ir.min().item<double>() >= 0.0);
    CHECK(batch.ir.max().item<double>() <= 1.0);
    // TNO stores grey content as RGB: the luminance is the stored value, exactly.
    CHECK((torch::equal(batch.ir[0], ir) || torch::equal(batch.ir[0], ir.flip({-1}))));
  }
  CHECK(torch::equal(tno.get(25).ir_crop, tno.get(25).ir_crop));

  if (fs::is_directory(data / "msrs")) {
    PairedFolder msrs((data / "msrs").string(), PairedFolderOptions().task_height(240).task_width(320));
    CHECK(msrs.size() == 60);
    const auto batch = msrs.get(7);
    batch.check();
    CHECK(batch.vi.sizes() == torch::IntArrayRef({1, 1, 240, 320}));
    CHECK(batch.target.sizes() == torch::IntArrayRef({1, 240, 320}));
    CHECK(io::read_image(msrs.pairs()[0].vi).sizes() == torch::IntArrayRef({3, 480, 640}));
    CHECK(io::read_image(msrs.pairs()[0].ir).sizes() == torch::IntArrayRef({1, 480, 640}));
  }
  if (fs::is_directory(data / "roadscene")) {
    PairedFolder road((data / "roadscene").string());
    CHECK(road.size() == 50);
    road.get(3).check();  // grey and colour JPEGs, crops clamped to images smaller than 256
  }
}

// ---------------------------------------------------------------------------------------------- model files
// State_dicts and checkpoints from anyone: each class of hostile file is made here, byte by byte.

namespace {

using namespace std::string_literals;

std::string le_bytes(uint64_t value, int width) {
  std::string out;
  for (int i = 0; i < width; ++i) out += static_cast<char>((value >> (8 * i)) & 0xff);
  return out;
}

/// The raw deflate stream of `data`: zlib's compress2 output without its 2-byte header and Adler-32 trailer.
std::string deflate_raw(const std::string& data) {
  uLongf size = compressBound(static_cast<uLong>(data.size()));
  std::string out(size, '\0');
  REQUIRE(compress2(reinterpret_cast<Bytef*>(out.data()), &size, reinterpret_cast<const Bytef*>(data.data()),
                    static_cast<uLong>(data.size()), 9) == Z_OK);
  return out.substr(2, size - 6);
}

struct ZipRecord {
  std::string name, data;
  bool deflate = false;
  std::optional<uint64_t> declared_size = {};  // what the directory says it inflates to (default: the truth)
};

/// A plain zip archive (no zip64) of `records`, as a hand-written file would be.
std::string zip_archive(const std::vector<ZipRecord>& records) {
  std::string out, directory;
  for (const ZipRecord& record : records) {
    const std::string stored = record.deflate ? deflate_raw(record.data) : record.data;
    const uLong crc =
        crc32(0L, reinterpret_cast<const Bytef*>(record.data.data()), static_cast<uInt>(record.data.size()));
    // version, flags, method, time, date, CRC, sizes, name and extra lengths: the same in both headers
    const std::string common = le_bytes(20, 2) + le_bytes(0, 2) + le_bytes(record.deflate ? 8 : 0, 2) + le_bytes(0, 4) +
                               le_bytes(crc, 4) + le_bytes(stored.size(), 4) +
                               le_bytes(record.declared_size.value_or(record.data.size()), 4) +
                               le_bytes(record.name.size(), 2) + le_bytes(0, 2);
    // then comment length, disk, internal and external attributes, and where the local header is
    directory += le_bytes(0x02014b50, 4) + le_bytes(20, 2) + common + le_bytes(0, 6) + le_bytes(0, 4) +
                 le_bytes(out.size(), 4) + record.name;
    out += le_bytes(0x04034b50, 4) + common + record.name + stored;
  }
  const size_t directory_offset = out.size();
  return out + directory + le_bytes(0x06054b50, 4) + le_bytes(0, 4) + le_bytes(records.size(), 2) +
         le_bytes(records.size(), 2) + le_bytes(directory.size(), 4) + le_bytes(directory_offset, 4) + le_bytes(0, 2);
}

/// Pickle opcodes, written by hand so that a test can give a tensor any size, stride or offset.
struct Pickle {
  std::string bytes = "\x80\x02";  // PROTO 2
  Pickle& op(const std::string& opcodes) {
    bytes += opcodes;
    return *this;
  }
  Pickle& global(const std::string& module, const std::string& name) { return op("c" + module + "\n" + name + "\n"); }
  Pickle& string(const std::string& text) { return op("X" + le_bytes(text.size(), 4) + text); }
  Pickle& integer(int64_t value) { return op("\x8a\x08" + le_bytes(static_cast<uint64_t>(value), 8)); }  // LONG1
  Pickle& integers(const std::vector<int64_t>& values) {
    op("(");
    for (const int64_t v : values) integer(v);
    return op("t");
  }
};

/// A float tensor of a state_dict as torch.save describes it.
struct TensorSpec {
  std::string key;
  std::vector<int64_t> sizes, strides;
  int64_t storage_numel = 0;
  std::string storage = "0";
  int64_t offset = 0;
};

/// data.pkl of an OrderedDict of _rebuild_tensor_v2 calls on float storages, as torch.save writes it.
std::string state_dict_pickle(const std::vector<TensorSpec>& tensors) {
  Pickle pickle;
  pickle.global("collections", "OrderedDict").op(")R(");
  for (const TensorSpec& t : tensors) {
    pickle.string(t.key).global("torch._utils", "_rebuild_tensor_v2").op("((").string("storage");
    pickle.global("torch", "FloatStorage").string(t.storage).string("cpu").integer(t.storage_numel).op("tQ");
    pickle.integer(t.offset).integers(t.sizes).integers(t.strides).op("\x89");
    pickle.global("collections", "OrderedDict").op(")RtR");
  }
  return pickle.op("u.").bytes;
}

/// A torch.save file of `tensors`; storage element i holds the float i.
std::string state_dict_file(const std::vector<TensorSpec>& tensors, bool deflate = false) {
  std::vector<ZipRecord> records = {{"archive/data.pkl", state_dict_pickle(tensors), deflate}};
  std::set<std::string> written;
  for (const TensorSpec& t : tensors) {
    if (!written.insert(t.storage).second) continue;
    const torch::Tensor values = torch::arange(t.storage_numel, torch::kFloat);
    records.push_back({"archive/data/" + t.storage,
                       std::string(static_cast<const char*>(values.data_ptr()), t.storage_numel * sizeof(float)),
                       deflate});
  }
  return zip_archive(records);
}

tdfusion::ParamDict read_state_dict_bytes(const std::string& bytes, uint64_t max_bytes = io::kMaxStateDictBytes) {
  std::istringstream in(bytes);
  return io::read_torch_state_dict(in, "crafted.pth", max_bytes);
}

/// The error of reading `bytes` as crafted.pth, which must come within a second.
std::string refusal(const std::string& bytes, uint64_t max_bytes = io::kMaxStateDictBytes) {
  const auto start = std::chrono::steady_clock::now();
  const std::string message = error_message([&] { read_state_dict_bytes(bytes, max_bytes); });
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO(message);
  CHECK(elapsed < 1.0);
  CHECK(message.rfind("tdfusion: crafted.pth", 0) == 0);
  return message;
}

/// No text of LibTorch's or the standard library's internals.
bool plain_words(const std::string& message) {
  for (const char* raw : {"setStorage", "out of bounds", "integer multiplication overflow", "_M_range_check",
                          "enforce fail", "istream reader failed", "PytorchStreamReader", "Exception raised from"})
    if (contains(message, raw)) return false;
  return true;
}

}  // namespace

TEST_CASE("hand-made state_dicts load, stored or deflated, with views sharing their storage") {
  const std::vector<TensorSpec> tensors = {
      {"a", {2, 3}, {3, 1}, 6}, {"b", {3}, {2}, 6, "0", 1}, {"c", {0}, {1}, 0, "1"}};
  for (const bool deflate : {false, true}) {
    const auto state = read_state_dict_bytes(state_dict_file(tensors, deflate));
    REQUIRE(state.size() == 3);
    CHECK(torch::equal(state["a"], torch::arange(6, torch::kFloat).view({2, 3})));
    CHECK(torch::equal(state["b"], torch::tensor({1.0f, 3.0f, 5.0f})));
    CHECK(state["a"].data_ptr() == static_cast<float*>(state["b"].data_ptr()) - 1);
    CHECK(state["c"].numel() == 0);
  }
}

TEST_CASE("state_dict pickles: deep nesting and long MARKs take linear time and no recursion") {
  // 10^6 nested tuples: a 1 KB file whose value tree used to be destroyed recursively (stack overflow).
  const std::string nested =
      zip_archive({{"archive/data.pkl", "\x80\x02)" + std::string(1000000, '\x85') + ".", /*deflate=*/true}});
  CHECK(nested.size() < 2000);
  CHECK(contains(refusal(nested), "crafted.pth does not hold a dictionary"));
  // MARK, 3 * 10^6 NONE, TUPLE: a 3 KB file that took quadratic time; now beyond the pickle's size limit, and
  // 10^6 NONEs, within it, take linear time.
  const auto marked = [](size_t nones) {
    return zip_archive({{"archive/data.pkl", "\x80\x02(" + std::string(nones, 'N') + "t.", /*deflate=*/true}});
  };
  CHECK(marked(3000000).size() < 5000);
  CHECK(contains(refusal(marked(3000000)),
                 "record archive/data.pkl declares 3000005 bytes, more than the 1048576 allowed"));
  CHECK(contains(refusal(marked(1000000)), "crafted.pth does not hold a dictionary"));
  // A dictionary holding itself (memo put, then get it twice and SETITEM): nothing to leak or recurse into.
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", "\x80\x02}q\x00h\x00h\x00s."s}})),
                 "crafted.pth: entry 0 is not a name -> tensor pair"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", "\x80\x02(N0t."}})),
                 "crafted.pth: unsupported pickle opcode 0x30 in data.pkl"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", "\x80\x02(N"}})), "crafted.pth: data.pkl is truncated"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", "\x80\x02N(N\x86."}})),
                 "crafted.pth: malformed data.pkl (stack underflow)"));
}

TEST_CASE("state_dict tensors are checked against their storage, with their names, before anything is allocated") {
  // A 10000-wide LightFusion input convolution from one stored float (stride 0): the 746-byte amplification.
  const std::string wide = state_dict_file({{"conv0.weight", {10000, 2, 3, 3}, {0, 0, 0, 0}, 1}});
  CHECK(wide.size() < 1000);
  CHECK(contains(refusal(wide),
                 "crafted.pth: 'conv0.weight' has shape [10000, 2, 3, 3], more elements than its "
                 "storage data/0 holds (1)"));
  // Twins of 2^48 stride-0 elements each, which used to be compared element by element.
  const int64_t big = int64_t{1} << 24;
  CHECK(contains(
      refusal(state_dict_file({{"x.weight", {big, big}, {0, 0}, 1}, {"x.conv.weight", {big, big}, {0, 0}, 1}})),
      "'x.weight' has shape [16777216, 16777216], more elements than its storage data/0 holds (1)"));
  // An element count beyond int64.
  const int64_t huge = int64_t{1} << 40;
  const std::string overflow = refusal(state_dict_file({{"w", {huge, huge, huge}, {1, 1, 1}, 8}}));
  CHECK(contains(overflow,
                 "'w' has shape [1099511627776, 1099511627776, 1099511627776], more elements than its "
                 "storage data/0 holds (8)"));
  CHECK(plain_words(overflow));
  CHECK(contains(refusal(state_dict_file({{"w", {4}, {1}, 8, "0", 5}})),
                 "'w' (shape [4], strides [1], offset 5) reaches beyond its storage data/0, which holds 8 elements"));
  CHECK(contains(refusal(state_dict_file({{"w", {2, 2}, {1, huge}, 8}})),
                 "'w' (shape [2, 2], strides [1, 1099511627776]"));
  CHECK(contains(refusal(state_dict_file({{"w", {-1}, {1}, 8}})),
                 "'w': its shape holds something other than a non-negative integer"));
  CHECK(contains(refusal(state_dict_file({{"w", {2, 2}, {1}, 8}})), "'w' has 2 sizes but 1 strides"));
  CHECK(contains(refusal(state_dict_file({{"a", {2}, {1}, 8}, {"b", {2}, {1}, 4}})),
                 "'b' describes its storage data/0 differently from an earlier entry"));
  CHECK(contains(refusal(state_dict_file({{"a", {2}, {1}, 8}, {"a", {2}, {1}, 8}})), "'a' appears twice"));
  // A storage whose declared size is not what its record holds, and one beyond the budget.
  std::string lying = state_dict_pickle({{"w", {2}, {1}, 100}});
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", lying}, {"archive/data/0", std::string(32, '\0')}})),
                 "storage data/0 holds 32 bytes, expected 400 (100 elements of 4 bytes)"));
  lying = state_dict_pickle({{"w", {2}, {1}, int64_t{1} << 60}});
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", lying}, {"archive/data/0", std::string(32, '\0')}})),
                 "the tensors need more than 536870912 bytes (storage data/0 of 'w' declares 1152921504606846976 "
                 "elements)"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", lying}})), "storage record data/0 of 'w' is missing"));
}

TEST_CASE("load_state_dict compares twins only once their shapes match") {
  tdfusion::fusion::LightFusion net(tdfusion::fusion::LightFusionOptions().width(2).depth(0));
  tdfusion::ParamDict state = io::released_layout(*net);
  state["conv0.conv.weight"] = torch::zeros({2, 2, 3});
  CHECK(contains(error_message([&] { io::load_state_dict(*net, state, "twins.pth"); }),
                 "tdfusion: twins.pth: conv0.conv.weight differs from its twin conv0.weight"));
  state["conv0.conv.weight"] = torch::zeros({2, 2, 3, 3}, torch::kDouble);
  CHECK(contains(error_message([&] { io::load_state_dict(*net, state, "twins.pth"); }), "differs from its twin"));
}

TEST_CASE("zip records: decompression is bounded by documented limits, checked before inflating") {
  // A 16 MiB data.pkl deflated to 16 KB: refused from the size its directory declares.
  const std::string pickle_bomb = zip_archive({{"archive/data.pkl", std::string(16 << 20, 'N'), true}});
  CHECK(pickle_bomb.size() < 20000);
  CHECK(
      contains(refusal(pickle_bomb), "record archive/data.pkl declares 16777216 bytes, more than the 1048576 allowed"));
  // 16 MiB of storage: refused under a 1 MiB budget, before its tensor exists; read under the default one.
  const std::string storage_bomb =
      zip_archive({{"archive/data.pkl", state_dict_pickle({{"w", {4 << 20}, {1}, 4 << 20}})},
                   {"archive/data/0", std::string(16 << 20, '\0'), true}});
  CHECK(storage_bomb.size() < 100000);
  CHECK(contains(refusal(storage_bomb, 1 << 20), "the tensors need more than 1048576 bytes"));
  CHECK(read_state_dict_bytes(storage_bomb)["w"].numel() == 4 << 20);
  // Sizes that the stored bytes cannot hold, or that inflating contradicts.
  const std::string pickle = state_dict_pickle({});  // an empty OrderedDict: 32 bytes
  REQUIRE(pickle.size() == 32);
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", pickle, false, uint64_t{1} << 31}})),
                 "record archive/data.pkl declares 2147483648 bytes, which its 32 stored bytes cannot hold"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", pickle, true, 4000000}})),
                 "stored bytes cannot hold (damaged or a decompression bomb)"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", pickle, true, 31}})),
                 "record archive/data.pkl inflates to more than its declared 31 bytes"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", pickle, true, 33}})),
                 "record archive/data.pkl holds 32 bytes, its directory entry says 33"));
  std::string garbled = zip_archive({{"archive/data.pkl", pickle, true}});
  garbled[30 + 16] ^= 0x40;  // inside the deflate stream
  CHECK(contains(refusal(garbled), "record archive/data.pkl is damaged"));
  CHECK(contains(refusal(zip_archive({{"data.pkl", pickle}})),
                 "crafted.pth is not a torch.save file (its records are not in a folder)"));
  CHECK(contains(refusal(zip_archive({{"archive/x", ""}})), "crafted.pth has no data.pkl"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", pickle}, {"archive/data.pkl", pickle}})), "appears twice"));
  CHECK(contains(refusal(zip_archive({{"archive/data.pkl", pickle}, {"archive/byteorder", "big"}})),
                 "was saved big-endian"));
  CHECK(contains(refusal(""), "crafted.pth is not a PyTorch zip archive"));
  const std::string whole = state_dict_file({{"w", {2}, {1}, 2}});
  for (const size_t cut : {whole.size() - 1, whole.size() - 30, whole.size() / 2, size_t{40}}) {
    const std::string message = refusal(whole.substr(0, cut));
    CHECK(plain_words(message));
  }
}

TEST_CASE("a flipped bit in a state_dict is found by the records' CRC-32") {
  std::string flipped = state_dict_file({{"w", {4}, {1}, 4}});
  flipped[flipped.find("archive/data/0") + 14 + 5] ^= 0x01;  // in the first float after the local header's name
  CHECK(contains(refusal(flipped), "crafted.pth: record archive/data/0 is damaged (its CRC-32 does not match)"));

  const std::string fixture = shared_path("fixtures/refusion-state-dict/refusion_state.pth");
  if (fixture.empty()) return;
  const std::string bytes = file_bytes(fixture);
  const auto original = read_state_dict_bytes(bytes);
  // data.pkl's bytes start after the first local header (30 bytes, its name and extra field).
  const size_t pickle_start =
      30 + (uint8_t(bytes[26]) | uint8_t(bytes[27]) << 8) + (uint8_t(bytes[28]) | uint8_t(bytes[29]) << 8);
  std::string damaged = bytes;
  damaged[pickle_start + 100] ^= 0x10;
  CHECK(contains(refusal(damaged), "record refusion_state/data.pkl is damaged (its CRC-32 does not match)"));
  // A bit flipped anywhere: refused with a sentence naming the file, or harmless (the same tensors).
  int refused = 0, harmless = 0;
  for (size_t at = 7; at < bytes.size(); at += 997) {
    damaged = bytes;
    damaged[at] ^= static_cast<char>(1 << (at % 8));
    std::istringstream in(damaged);
    try {
      const auto state = io::read_torch_state_dict(in, "crafted.pth");
      bool same = state.size() == original.size();
      for (size_t i = 0; same && i < state.size(); ++i)
        same = state[i].key() == original[i].key() && torch::equal(state[i].value(), original[i].value());
      INFO("bit flipped at byte " << at);
      CHECK(same);
      ++harmless;
    } catch (const c10::Error& error) {
      const std::string message = error.what_without_backtrace();
      INFO(message);
      CHECK(message.rfind("tdfusion: crafted.pth", 0) == 0);
      CHECK(plain_words(message));
      ++refused;
    }
  }
  MESSAGE("fixture with one bit flipped at " << refused + harmless << " places: " << refused << " refused, " << harmless
                                             << " harmless");
  CHECK(refused > 250);
}

namespace {

/// A checkpoint of a small network and its Adam state after one step.
struct SmallRun {
  torch::nn::Linear net{4, 3};
  torch::optim::Adam adam{net->parameters(), torch::optim::AdamOptions(0.01)};
  io::CheckpointState state() {
    io::CheckpointState s;
    s.modules = {{"fusion", net.ptr()}};
    s.optimizers = {{"adam", &adam}};
    s.counters = {{"epoch", 2}};
    return s;
  }
  SmallRun() {
    adam.zero_grad();
    net->forward(torch::ones({2, 4})).sum().backward();
    adam.step();
  }
};

}  // namespace

TEST_CASE("a flipped bit in a checkpoint is found by the records' CRC-32") {
  Scratch dir("checkpoint-bits");
  const std::string path = (dir / "checkpoint.pt");
  SmallRun saved;
  io::save_checkpoint(path, saved.state());
  const std::string bytes = file_bytes(path);

  // The first tensor record: its data follows its local header (30 bytes, the name and an extra field).
  const size_t name = bytes.find("/data/0");
  REQUIRE(name != std::string::npos);
  const size_t header = bytes.rfind("PK\x03\x04"s, name);
  const auto u16 = [&](size_t at) { return size_t(uint8_t(bytes[at])) | size_t(uint8_t(bytes[at + 1])) << 8; };
  std::string damaged = bytes;
  damaged[header + 30 + u16(header + 26) + u16(header + 28) + 4] ^= 0x04;  // in the weight's second float
  const std::string flipped = (dir / "flipped.pt");
  write_file(flipped, damaged);
  SmallRun loaded;
  io::CheckpointState state = loaded.state();
  const torch::Tensor before = loaded.net->weight.clone();
  const std::string message = error_message([&] { io::load_checkpoint(flipped, state); });
  CHECK(contains(message, "tdfusion: checkpoint '" + flipped + "': record "));
  CHECK(contains(message, "is damaged (its CRC-32 does not match)"));
  CHECK(torch::equal(loaded.net->weight, before));

  // A bit flipped anywhere: refused with a sentence naming the file, or harmless (the same weights).
  int refused = 0, harmless = 0;
  for (size_t at = 3; at < bytes.size(); at += bytes.size() / 40) {
    damaged = bytes;
    damaged[at] ^= static_cast<char>(1 << (at % 8));
    write_file(flipped, damaged);
    SmallRun run;
    io::CheckpointState s = run.state();
    try {
      io::load_checkpoint(flipped, s);
      INFO("bit flipped at byte " << at);
      CHECK(torch::equal(run.net->weight, saved.net->weight));
      CHECK(torch::equal(run.net->bias, saved.net->bias));
      ++harmless;
    } catch (const c10::Error& error) {
      const std::string text = error.what_without_backtrace();
      INFO(text);
      CHECK(text.rfind("tdfusion: ", 0) == 0);
      CHECK(contains(text, flipped));
      CHECK(plain_words(text));
      ++refused;
    }
  }
  // The harmless places are alignment padding and header fields that no reader uses (a small checkpoint is
  // almost half zip metadata).
  MESSAGE("checkpoint of " << bytes.size() << " bytes with one bit flipped at " << refused + harmless
                           << " places: " << refused << " refused, " << harmless << " harmless");
  CHECK(refused >= 20);

  // Truncated, and a zip that is not a checkpoint.
  write_file(flipped, bytes.substr(0, bytes.size() / 2));
  const std::string truncated = error_message([&] { io::load_checkpoint(flipped, state); });
  CHECK(contains(truncated, "tdfusion: checkpoint '" + flipped + "'"));
  CHECK(plain_words(truncated));
  write_file(flipped, state_dict_file({{"w", {2}, {1}, 2}}));
  CHECK(error_message([&] { io::load_checkpoint(flipped, state); }) ==
        "tdfusion: '" + flipped + "' is not a readable checkpoint (it has no version record)");
  // Records beyond the budget are refused before LibTorch allocates them.
  CHECK(contains(error_message([&] { io::load_checkpoint(path, state, 1000); }),
                 "tdfusion: checkpoint '" + path + "' declares more than 1000 bytes of records"));
  CHECK_NOTHROW(io::load_checkpoint(path, state));
}

TEST_CASE("non-finite weights are refused, naming the file and the key") {
  Scratch dir("non-finite");
  tdfusion::fusion::LightFusion net(tdfusion::fusion::LightFusionOptions().width(2).depth(0));
  const std::string weights = (dir / "nan.pth");
  {
    torch::NoGradGuard no_grad;
    net->named_parameters()["conv0.bias"][1] = std::nan("");
  }
  io::write_torch_state_dict(weights, io::released_layout(*net));
  tdfusion::fusion::LightFusion target(tdfusion::fusion::LightFusionOptions().width(2).depth(0));
  CHECK(error_message([&] { io::load_torch_state_dict(*target, weights); }) ==
        "tdfusion: " + weights + ": 'conv0.bias' contains NaN or infinite values");

  const std::string path = (dir / "checkpoint.pt");
  SmallRun poisoned;
  {
    torch::NoGradGuard no_grad;
    poisoned.net->weight[0][1] = std::numeric_limits<float>::infinity();
  }
  io::save_checkpoint(path, poisoned.state());
  SmallRun loaded;
  io::CheckpointState state = loaded.state();
  CHECK(contains(error_message([&] { io::load_checkpoint(path, state); }),
                 "tdfusion: checkpoint '" + path + "': fusion.weight contains NaN or infinite values"));

  // NaN in Adam's moments (a NaN gradient), the weights themselves finite again.
  SmallRun moments;
  const torch::Tensor weight = moments.net->weight.detach().clone();
  moments.net->weight.mutable_grad() = torch::full_like(weight, std::nan(""));
  moments.adam.step();
  {
    torch::NoGradGuard no_grad;
    moments.net->weight.copy_(weight);
  }
  io::save_checkpoint(path, moments.state());
  const torch::Tensor before = loaded.net->weight.clone();
  const std::string message = error_message([&] { io::load_checkpoint(path, state); });
  CHECK(contains(message, "tdfusion: checkpoint '" + path + "': optimizers.adam."));
  CHECK(contains(message, "contains NaN or infinite values"));
  CHECK(torch::equal(loaded.net->weight, before));  // nothing was changed

  // Adam's moments as a view of one stored element (stride 0): checking them must not allocate the view.
  SmallRun expanded;
  for (auto& entry : expanded.adam.state()) {
    auto& moments = static_cast<torch::optim::AdamParamState&>(*entry.second);
    moments.exp_avg(torch::zeros({1}).expand(moments.exp_avg().sizes()));
  }
  io::save_checkpoint(path, expanded.state());
  const std::string view = error_message([&] { io::load_checkpoint(path, state); });
  CHECK(contains(view, "tdfusion: checkpoint '" + path + "': optimizers.adam."));
  CHECK(contains(view, "has more elements than its storage holds"));

  SmallRun rate;
  static_cast<torch::optim::AdamOptions&>(rate.adam.param_groups()[0].options()).lr(std::nan(""));
  io::save_checkpoint(path, rate.state());
  CHECK(contains(error_message([&] { io::load_checkpoint(path, state); }),
                 "tdfusion: checkpoint '" + path + "': optimizers.adam."));
}

TEST_CASE("checkpoint records that LibTorch would recurse into or run are refused before it reads them") {
  Scratch dir("checkpoint-records");
  const std::string path = (dir / "checkpoint.pt");
  SmallRun saved;
  io::save_checkpoint(path, saved.state());
  std::vector<ZipRecord> records;
  {
    std::ifstream file(path, std::ios::binary);
    io::ZipArchive archive(file, path);
    for (const io::ZipEntry& entry : archive.entries())
      records.push_back({entry.name, archive.read_string(entry, 1 << 20), true});
  }
  const auto index_of = [&](const std::string& suffix) {
    for (size_t i = 0; i < records.size(); ++i)
      if (records[i].name.size() >= suffix.size() &&
          records[i].name.rfind(suffix) == records[i].name.size() - suffix.size())
        return i;
    FAIL("no record " << suffix);
    return size_t{0};
  };
  const std::string crafted = (dir / "crafted.pt");
  /// The error of loading the checkpoint with the records ending in `suffix` replaced, which must come within a second.
  const auto load_with = [&](const std::string& suffix, const std::string& data) {
    std::vector<ZipRecord> changed = records;
    for (ZipRecord& r : changed)
      if (r.name.size() >= suffix.size() && r.name.rfind(suffix) == r.name.size() - suffix.size()) r.data = data;
    write_file(crafted, zip_archive(changed));
    SmallRun run;
    io::CheckpointState state = run.state();
    const auto start = std::chrono::steady_clock::now();
    const std::string message = error_message([&] { io::load_checkpoint(crafted, state); });
    CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 1.0);
    CHECK(plain_words(message));
    return message;
  };
  const std::string pickle = records[index_of("/data.pkl")].data;
  CHECK(load_with("/data.pkl", pickle).empty());  // the test's zip writer makes a checkpoint that loads
  const std::string refused = "tdfusion: checkpoint '" + crafted + "': record " + records[index_of("/data.pkl")].name;

  // 10^6 nested tuples: LibTorch's unpickler crashed on this 4 KB file (stack overflow).
  CHECK(load_with("/data.pkl", "\x80\x02)" + std::string(1000000, '\x85') + ".") ==
        refused + " nests deeper than 256 levels");
  CHECK(load_with("/data.pkl", "\x80\x02]q\x00h\x00"s + "a.") ==
        refused + " changes a value it already refers to twice (a cycle?)");
  CHECK(load_with("/data.pkl", "\x80\x02(N\x86.") == refused + " is malformed (stack underflow)");
  // A memo key of 2^31 would make LibTorch's unpickler allocate a 32 GB memo table.
  CHECK(load_with("/data.pkl", "\x80\x02Nr"s + le_bytes(uint64_t{1} << 31, 4) + ".") ==
        refused + " is malformed (memo key 2147483648 beyond its size)");
  CHECK(load_with("/data.pkl", pickle.substr(0, pickle.size() / 2)) == refused + " is truncated");
  CHECK(contains(load_with("/constants.pkl", "\x80\x02\xff."),
                 "holds pickle opcode 0xff, which LibTorch's archives do not use"));
  CHECK(contains(load_with("/data.pkl", "\x80\x02"s + "cos\nsystem\n."),
                 "tdfusion: '" + crafted + "' is not a readable checkpoint: LibTorch cannot load its archive"));

  // LibTorch's reader leaks its zip state when its constructor throws, as it does for a version it cannot read.
  CHECK(contains(load_with("/version", "Z3\n"), "/version is not a format version"));
  CHECK(contains(load_with("/version", "99\n"), "/version says format version 99, which this LibTorch does not read"));

  // TorchScript source: a method would run while loading (this one would never return); deep types would recurse.
  const std::string code = records[index_of("/code/__torch__.py")].data;
  const std::string line = " line " + std::to_string(std::count(code.begin(), code.end(), '\n') + 1) +
                           " is not a declaration (tdfusion checkpoints hold no code)";
  const std::string refused_code =
      "tdfusion: checkpoint '" + crafted + "': record " + records[index_of("/code/__torch__.py")].name;
  CHECK(load_with("/code/__torch__.py", code + "  def __setstate__(self, state):\n    while True:\n      pass\n") ==
        refused_code + line);
  CHECK(load_with("/code/__torch__.py", code + "  x : " + std::string(100000, '[') + "int" +
                                            std::string(100000, ']')) == refused_code + line);
}
