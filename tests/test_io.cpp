// Image files, colour restoration and the paired-folder data set.
#include <doctest/doctest.h>

#include "tdfusion/data/paired_folder.hpp"
#include "tdfusion/io/colour.hpp"
#include "tdfusion/io/image.hpp"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace io = tdfusion::io;
namespace data = tdfusion::data;
using tdfusion::data::PairedFolder;
using tdfusion::data::PairedFolderOptions;

/// A fresh directory under the system's temp directory, unique per process and test, removed at scope exit.
struct ScratchDir {
  fs::path path;
  explicit ScratchDir(const std::string& name) {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("tdfusion-io-" + name + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string error_message(const std::function<void()>& action) {
  try {
    action();
  } catch (const c10::Error& error) {
    return error.what_without_backtrace();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

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
  ScratchDir dir("roundtrip");
  const torch::Tensor grey = level_image(1, 13, 17, 255), rgb = level_image(3, 13, 17, 255, 5);

  io::write_image(dir.file("grey.png"), grey);
  const torch::Tensor grey_back = io::read_image(dir.file("grey.png"));
  CHECK(grey_back.sizes() == grey.sizes());
  CHECK(grey_back.dtype() == torch::kFloat);
  CHECK(torch::equal(grey_back, grey));

  io::write_image(dir.file("rgb.PNG"), rgb);  // the extension's case does not matter
  CHECK(torch::equal(io::read_image(dir.file("rgb.PNG")), rgb));

  // H x W is written as grey.
  io::write_image(dir.file("plane.png"), grey[0]);
  CHECK(torch::equal(io::read_image(dir.file("plane.png")), grey));

  const torch::Tensor grey16 = level_image(1, 9, 11, 65535, 3), rgb16 = level_image(3, 9, 11, 65535, 1);
  io::write_image(dir.file("grey16.png"), grey16, 16);
  io::write_image(dir.file("rgb16.png"), rgb16, 16);
  CHECK(torch::equal(io::read_image(dir.file("grey16.png")), grey16));
  CHECK(torch::equal(io::read_image(dir.file("rgb16.png")), rgb16));

  io::write_image(dir.file("rgb.bmp"), rgb);
  CHECK(torch::equal(io::read_image(dir.file("rgb.bmp")), rgb));
  io::write_image(dir.file("grey.bmp"), grey);  // BMP stores grey as 24-bit: three equal channels
  CHECK(io::read_image(dir.file("grey.bmp")).size(0) == 3);
  CHECK(torch::equal(io::read_grey(dir.file("grey.bmp")), grey));

  // Out-of-range values are clamped, then rounded to the nearest level.
  io::write_image(dir.file("clamped.png"), torch::tensor({-0.5, 0.2, 1.5, 0.5 / 255.0 + 1e-6}).view({1, 1, 4}));
  CHECK(torch::equal(io::read_image(dir.file("clamped.png")),
                     torch::tensor({0.0f, 51.0f / 255.0f, 1.0f, 1.0f / 255.0f}).view({1, 1, 4})));

  const torch::Tensor smooth = smooth_image(3, 40, 48);
  io::write_image(dir.file("smooth.jpg"), smooth);
  io::write_image(dir.file("smooth.jpeg"), smooth[0].unsqueeze(0));
  const torch::Tensor jpeg = io::read_image(dir.file("smooth.jpg"));
  CHECK(jpeg.sizes() == smooth.sizes());
  CHECK(max_abs(jpeg, smooth) < 0.05);
  CHECK((jpeg - smooth).abs().mean().item<double>() < 0.01);
  CHECK(max_abs(io::read_grey(dir.file("smooth.jpeg")), smooth[0].unsqueeze(0)) < 0.05);
}

TEST_CASE("16-bit normalisation modes map known raw values") {
  ScratchDir dir("normalise");
  const std::string path = dir.file("thermal.png");
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
  write_raw16(dir.file("flat.png"), torch::full({1, 2, 2}, 777));
  CHECK(torch::equal(io::read_image(dir.file("flat.png"), io::ImageReadOptions().normalisation(Normalisation::min_max)),
                     torch::zeros({1, 2, 2})));

  // 8-bit files keep v / 255 unless asked otherwise.
  io::write_image(dir.file("eight.png"), torch::tensor({51.0, 102.0, 204.0}).view({1, 1, 3}) / 255.0);
  const auto min_max = io::ImageReadOptions().normalisation(Normalisation::min_max);
  CHECK(max_abs(io::read_image(dir.file("eight.png"), min_max).view({3}), torch::tensor({0.2, 0.4, 0.8})) < 1e-7);
  CHECK(max_abs(io::read_image(dir.file("eight.png"), io::ImageReadOptions(min_max).normalise_8_bit(true)).view({3}),
                torch::tensor({0.0, 1.0 / 3.0, 1.0})) < 1e-7);
}

TEST_CASE("read_grey: BT.601 luma for colour files, exact values for grey content") {
  ScratchDir dir("grey");
  const torch::Tensor rgb =
      torch::tensor({255.0, 0.0, 0.0, 51.0, 0.0, 255.0, 0.0, 102.0, 0.0, 0.0, 255.0, 153.0}).view({3, 1, 4}) / 255.0;
  io::write_image(dir.file("rgb.png"), rgb);
  const torch::Tensor expected = torch::tensor({0.299, 0.587, 0.114, (0.299 * 51 + 0.587 * 102 + 0.114 * 153) / 255.0});
  const torch::Tensor grey = io::read_grey(dir.file("rgb.png"));
  CHECK(grey.sizes() == torch::IntArrayRef({1, 1, 4}));
  CHECK(max_abs(grey.view({4}), expected) < 1e-6);

  // RGB files holding grey content (TNO) come back bit-exact.
  const torch::Tensor plane = level_image(1, 5, 6, 255);
  io::write_image(dir.file("grey-as-rgb.png"), plane.expand({3, 5, 6}));
  CHECK(io::read_image(dir.file("grey-as-rgb.png")).size(0) == 3);
  CHECK(torch::equal(io::read_grey(dir.file("grey-as-rgb.png")), plane));
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
  ScratchDir dir("label");
  torch::Tensor ids = torch::arange(20, torch::kLong).remainder(9).view({4, 5});
  io::write_image(dir.file("ok.png"), ids.to(torch::kDouble).unsqueeze(0) / 255.0);
  const torch::Tensor labels = io::read_label(dir.file("ok.png"), 9);
  CHECK(labels.dtype() == torch::kLong);
  CHECK(torch::equal(labels, ids));

  const torch::Tensor wide = torch::arange(0, 600, 30, torch::kLong).view({4, 5});
  write_raw16(dir.file("sixteen.png"), wide.unsqueeze(0));
  CHECK(torch::equal(io::read_label(dir.file("sixteen.png"), 600), wide));

  torch::Tensor bad = ids.clone();
  bad[2][3] = 9;
  io::write_image(dir.file("bad.png"), bad.to(torch::kDouble).unsqueeze(0) / 255.0);
  const std::string message = error_message([&] { io::read_label(dir.file("bad.png"), 9); });
  CHECK(contains(message, dir.file("bad.png")));
  CHECK(contains(message, "class id 9"));
  CHECK(contains(message, "row 2, col 3"));

  torch::Tensor ignored = ids.clone();
  ignored[1][1] = 255;
  io::write_image(dir.file("ignored.png"), ignored.to(torch::kDouble).unsqueeze(0) / 255.0);
  CHECK(torch::equal(io::read_label(dir.file("ignored.png"), 9, 255), ignored));
  CHECK(contains(error_message([&] { io::read_label(dir.file("ignored.png"), 9); }), "class id 255"));

  // Three equal channels are accepted; colour-coded labels are not.
  io::write_image(dir.file("rgb-equal.png"), ids.to(torch::kDouble).unsqueeze(0).expand({3, 4, 5}) / 255.0);
  CHECK(torch::equal(io::read_label(dir.file("rgb-equal.png"), 9), ids));
  torch::Tensor colour = ids.to(torch::kDouble).unsqueeze(0).repeat({3, 1, 1}) / 255.0;
  colour[1][0][4] = 0.5;
  io::write_image(dir.file("colour.png"), colour);
  const std::string colour_message = error_message([&] { io::read_label(dir.file("colour.png"), 9); });
  CHECK(contains(colour_message, dir.file("colour.png")));
  CHECK(contains(colour_message, "row 0, col 4"));

  io::write_image(dir.file("lossy.jpg"), ids.to(torch::kDouble).unsqueeze(0) / 255.0);
  CHECK_THROWS_WITH_AS(io::read_label(dir.file("lossy.jpg"), 9), doctest::Contains("JPEG"), c10::Error);
}

TEST_CASE("image reading and writing errors name the file and the problem") {
  ScratchDir dir("errors");
  const std::string missing = dir.file("missing.png");
  const std::string missing_message = error_message([&] { io::read_image(missing); });
  CHECK(contains(missing_message, missing));
  CHECK(contains(missing_message, "No such file or directory"));

  const std::string text = dir.file("notes.png");
  std::ofstream(text) << "this is not a PNG file, only text\n";
  const std::string text_message = error_message([&] { io::read_image(text); });
  CHECK(contains(text_message, text));
  CHECK(contains(text_message, "not a readable image"));

  const std::string empty = dir.file("empty.png");
  std::ofstream{empty};
  CHECK(contains(error_message([&] { io::read_grey(empty); }), "'" + empty + "': the file is empty"));

  // A valid PNG cut in half: noise does not compress, so half the file is half the pixel data.
  torch::manual_seed(3);
  const std::string truncated = dir.file("truncated.png");
  io::write_image(truncated, torch::rand({3, 64, 64}));
  CHECK_NOTHROW(io::read_image(truncated));
  fs::resize_file(truncated, fs::file_size(truncated) / 2);
  const std::string truncated_message = error_message([&] { io::read_image(truncated); });
  CHECK(contains(truncated_message, truncated));
  CHECK(contains(truncated_message, "corrupt or truncated"));
  MESSAGE("truncated PNG: " << truncated_message);

  CHECK(contains(error_message([&] { io::read_image(dir.path.string()); }), "is a directory"));

  const torch::Tensor image = torch::rand({1, 4, 4});
  const std::string tiff = dir.file("out.tif");
  const std::string tiff_message = error_message([&] { io::write_image(tiff, image); });
  CHECK(contains(tiff_message, tiff));
  CHECK(contains(tiff_message, "unknown image format '.tif'"));
  CHECK_THROWS_WITH_AS(io::write_image(dir.file("deep.jpg"), image, 16), doctest::Contains("16-bit output needs PNG"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image(dir.file("odd.png"), image, 12), doctest::Contains("8 or 16"), c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image(dir.file("rgba.png"), torch::rand({4, 4, 4})), doctest::Contains("C = 1 or 3"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image(dir.file("nan.png"), torch::full({1, 2, 2}, NAN)), doctest::Contains("NaN"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(io::write_image(dir.file("ints.png"), torch::ones({1, 2, 2}, torch::kLong)),
                       doctest::Contains("floating-point"), c10::Error);
  const std::string nowhere = dir.file("no-such-dir/out.png");
  CHECK(contains(error_message([&] { io::write_image(nowhere, image); }), nowhere));
  CHECK(contains(error_message([&] { io::write_image(dir.file("no-such-dir/out16.png"), image, 16); }), "out16.png"));
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
  ScratchDir dir("folder");
  make_pair_folder(dir.path, 3, 12, 16, /*labels=*/true);
  PairedFolder folder(dir.path.string(), PairedFolderOptions().crop_size(8).num_classes(5));
  REQUIRE(folder.size() == 3);
  CHECK(folder.pairs()[1].stem == "pair1");
  CHECK(folder.pairs()[1].vi == (dir.path / "vi" / "pair1.bmp").string());
  CHECK(folder.pairs()[1].label == (dir.path / "label" / "pair1.png").string());

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

  PairedFolder unflipped(dir.path.string(), PairedFolderOptions().crop_size(100).num_classes(5).flip(false));
  const auto whole = unflipped.get(4);
  CHECK(whole.ir_crop.sizes() == torch::IntArrayRef({1, 1, 12, 16}));  // crop clamped to the image
  CHECK(torch::equal(whole.vi, io::read_grey(unflipped.pairs()[1].vi).unsqueeze(0)));

  // Resized to the task size: bilinear images, nearest labels (still valid class ids).
  PairedFolder resized(dir.path.string(),
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
  CHECK_THROWS_WITH_AS(PairedFolder(dir.path.string(), PairedFolderOptions().num_classes(3)).get(0),
                       doctest::Contains("pair0.png"), c10::Error);
}

TEST_CASE("a fixed hold-out split and subsets of a PairedFolder") {
  const data::HoldoutSplit split = data::every_nth_holdout(10, 4);
  CHECK(split.held_out == std::vector<size_t>{3, 7});
  CHECK(split.train == std::vector<size_t>{0, 1, 2, 4, 5, 6, 8, 9});
  CHECK_THROWS_WITH_AS(data::every_nth_holdout(10, 1), doctest::Contains("every >= 2"), c10::Error);
  CHECK_THROWS_WITH_AS(data::every_nth_holdout(3, 4), doctest::Contains("leaves no pair held out"), c10::Error);

  ScratchDir dir("subset");
  make_pair_folder(dir.path, 4, 12, 16, /*labels=*/true);
  const PairedFolder folder(dir.path.string(), PairedFolderOptions().crop_size(8).num_classes(5).flip(false));
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
  ScratchDir dir("layout");
  const std::string root = dir.path.string();
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("is missing"), c10::Error);

  make_pair_folder(dir.path, 2, 8, 8, /*labels=*/false);
  std::ofstream((dir.path / "ir" / "README.txt").string()) << "not an image\n";  // skipped
  PairedFolder unlabelled(root);
  CHECK(unlabelled.size() == 2);
  const auto batch = unlabelled.get(1);
  CHECK(torch::equal(batch.target, torch::zeros({1, 8, 8}, torch::kLong)));  // no labels: zero target
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().require_labels(true)),
                       doctest::Contains("labels are required"), c10::Error);

  // A file with no partner in the other folder.
  io::write_image((dir.path / "ir" / "lonely.png").string(), torch::rand({1, 8, 8}));
  const std::string partner = error_message([&] { PairedFolder{root}; });
  CHECK(contains(partner, "missing partner"));
  CHECK(contains(partner, "'lonely'"));
  fs::remove(dir.path / "ir" / "lonely.png");
  io::write_image((dir.path / "vi" / "stray.jpg").string(), torch::rand({3, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("'stray'"), c10::Error);
  fs::remove(dir.path / "vi" / "stray.jpg");

  // Two files with one stem in one folder are ambiguous.
  io::write_image((dir.path / "ir" / "pair0.bmp").string(), torch::rand({1, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("share the stem 'pair0'"), c10::Error);
  fs::remove(dir.path / "ir" / "pair0.bmp");

  // Images of a pair that differ in size: both files are named, up front or when read.
  const std::string ir_path = (dir.path / "ir" / "pair1.png").string(),
                    vi_path = (dir.path / "vi" / "pair1.bmp").string();
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
  fs::create_directories(dir.path / "label");
  io::write_image((dir.path / "label" / "pair0.png").string(), torch::zeros({1, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().num_classes(2)), doctest::Contains("missing label"),
                       c10::Error);
  io::write_image((dir.path / "label" / "pair1.png").string(), torch::zeros({1, 8, 8}));
  CHECK_THROWS_WITH_AS(PairedFolder{root}, doctest::Contains("num_classes > 0"), c10::Error);
  CHECK(PairedFolder(root, PairedFolderOptions().num_classes(2)).size() == 2);

  // A file that stops being readable after the scan is reported when read.
  std::ofstream(ir_path, std::ios::trunc) << "garbage";
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().num_classes(2).check_files(false)).get(1),
                       doctest::Contains(ir_path.c_str()), c10::Error);

  fs::create_directories(dir.path / "empty" / "ir");
  fs::create_directories(dir.path / "empty" / "vi");
  CHECK_THROWS_WITH_AS(PairedFolder((dir.path / "empty").string()), doctest::Contains("contains no images"),
                       c10::Error);
  CHECK_THROWS_WITH_AS(PairedFolder(root, PairedFolderOptions().task_height(10)), doctest::Contains("task size"),
                       c10::Error);
}

TEST_CASE("PairedFolder on the real TNO and MSRS pairs") {
  const fs::path data = fs::path(TDFUSION_SHARED_DIR) / "data";
  if (!fs::is_directory(data / "tno")) {
    MESSAGE("skipped: no TNO data at " << (data / "tno").string());
    return;
  }
  PairedFolder tno((data / "tno").string());
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
