// Fusion metrics (closed forms, the protocols, the NumPy/SciPy reference, a published MATLAB table), the
// folder driver and its reports, and the segmentation / detection metrics.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/io/image.hpp"
#include "tdfusion/metrics/bar_chart.hpp"
#include "tdfusion/metrics/confidence_interval.hpp"
#include "tdfusion/metrics/evaluate_folders.hpp"
#include "tdfusion/metrics/fusion_metrics.hpp"
#include "tdfusion/metrics/report.hpp"
#include "tdfusion/metrics/task_metrics.hpp"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <sstream>
#include <string>
#include <vector>

namespace {

using namespace tdfusion::test;

namespace fs = std::filesystem;
namespace m = tdfusion::metrics;
using Eigen::ArrayXXd;

const std::string kData = std::string(TDFUSION_SHARED_DIR) + "/data";

/// |a - b| <= rel * max(|a|, |b|) + abs_floor, NaN == NaN.
bool close(double a, double b, double rel, double abs_floor = 1e-12) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::abs(a - b) <= rel * std::max(std::abs(a), std::abs(b)) + abs_floor;
}

ArrayXXd grey_of(const std::string& path) { return m::to_grey8(tdfusion::io::read_image(path)); }

std::string file_with_stem(const std::string& dir, const std::string& stem) {
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().stem() == stem) return entry.path().string();
  }
  FAIL("no file with stem ", stem, " in ", dir);
  return "";
}

ArrayXXd constant(int rows, int cols, double value) { return ArrayXXd::Constant(rows, cols, value); }

/// image(r, c) = offset + step * c: a horizontal ramp.
ArrayXXd ramp(int rows, int cols, double offset = 0.0, double step = 1.0) {
  ArrayXXd image(rows, cols);
  for (int c = 0; c < cols; ++c) image.col(c).setConstant(offset + step * c);
  return image;
}

ArrayXXd checkerboard(int rows, int cols) {
  ArrayXXd image(rows, cols);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) image(r, c) = (r + c) % 2 == 0 ? 0.0 : 255.0;
  }
  return image;
}

/// Deterministic pseudo-random grey levels, smoothed a little so that windows see structure.
ArrayXXd texture(int rows, int cols, unsigned seed) {
  ArrayXXd image(rows, cols);
  unsigned state = seed * 2654435761u + 12345u;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      state = state * 1664525u + 1013904223u;
      const double noise = static_cast<double>(state >> 24);  // 0..255
      image(r, c) = std::clamp(std::round(0.5 * noise + 60.0 + 40.0 * std::sin(0.3 * r + 0.2 * c + seed)), 0.0, 255.0);
    }
  }
  return image;
}

torch::Tensor to_tensor01(const ArrayXXd& image) {
  torch::Tensor t = torch::empty({1, image.rows(), image.cols()}, torch::kFloat);
  for (int r = 0; r < image.rows(); ++r) {
    for (int c = 0; c < image.cols(); ++c) t[0][r][c] = static_cast<float>(image(r, c) / 255.0);
  }
  return t;
}

}  // namespace

TEST_CASE("metrics: closed forms on constant, ramp and checkerboard images") {
  const int h = 48, w = 48;
  const ArrayXXd flat = constant(h, w, 100.0);
  CHECK(m::entropy(flat) == 0.0);
  CHECK(m::standard_deviation(flat) == 0.0);
  CHECK(m::spatial_frequency(flat) == 0.0);
  CHECK(m::average_gradient(flat) == 0.0);
  CHECK(m::mutual_information(flat, flat) == 0.0);
  CHECK(m::ssim(flat, flat, 255.0) == doctest::Approx(1.0).epsilon(1e-14));
  CHECK(m::vif(flat, flat) == 1.0);          // 0 / 0 -> 1, the classic convention
  const ArrayXXd black = constant(h, w, 0.0);
  CHECK(std::isnan(m::qabf(black, black, black)));  // no edges anywhere, not even at the zero-padded border: 0 / 0

  const ArrayXXd r = ramp(h, w);  // levels 0..47 along each row
  CHECK(m::entropy(r) == doctest::Approx(std::log2(48.0)).epsilon(1e-14));
  CHECK(m::standard_deviation(r) == doctest::Approx(std::sqrt((48.0 * 48.0 - 1.0) / 12.0)).epsilon(1e-14));
  CHECK(m::spatial_frequency(r) == doctest::Approx(1.0).epsilon(1e-14));
  CHECK(m::average_gradient(r) == doctest::Approx(std::sqrt(0.5)).epsilon(1e-12));
  CHECK(m::mutual_information(r, r) == doctest::Approx(std::log(48.0)).epsilon(1e-14));  // H(X) in nats
  CHECK(m::mutual_information(r, flat) == 0.0);

  const ArrayXXd board = checkerboard(h, w);
  CHECK(m::entropy(board) == doctest::Approx(1.0).epsilon(1e-14));
  CHECK(m::standard_deviation(board) == doctest::Approx(127.5).epsilon(1e-14));
  CHECK(m::spatial_frequency(board) == doctest::Approx(255.0 * std::sqrt(2.0)).epsilon(1e-14));
  // Central differences vanish inside (equal colours two apart); one-sided ones on the border are +-255.
  const double edge = 255.0 / std::sqrt(2.0), corner = 255.0;
  const double ag = (4 * corner + (2 * (h - 2) + 2 * (w - 2)) * edge) / (h * w);
  CHECK(m::average_gradient(board) == doctest::Approx(ag).epsilon(1e-14));
  CHECK(m::mutual_information(board, board) == doctest::Approx(std::log(2.0)).epsilon(1e-14));
}

TEST_CASE("metrics: identities of the pair metrics") {
  const ArrayXXd a = texture(64, 72, 1), b = texture(64, 72, 2);
  // SCD with F = A + B: corr(A, F - B) = corr(B, F - A) = 1.
  CHECK(m::scd(a, b, a + b) == doctest::Approx(2.0).epsilon(1e-12));
  // SSIM(X, X) = 1 for any data range; VIF(X, X) = 1 up to the eps of the noise-variance clamp.
  CHECK(m::ssim(a, a, 255.0) == doctest::Approx(1.0).epsilon(1e-13));
  CHECK(m::ssim(a, a, 2.0) == doctest::Approx(1.0).epsilon(1e-13));
  CHECK(m::vif(a, a) == doctest::Approx(1.0).epsilon(1e-8));
  CHECK(m::vif(a, 1.5 * a) > 1.0);  // contrast enhancement raises VIF above 1
  CHECK(m::ssim(a, b, 255.0) < 0.9);
  CHECK(m::ssim(a, b, 255.0) == doctest::Approx(m::ssim(b, a, 255.0)).epsilon(1e-14));
  CHECK(m::mutual_information(a, b) == doctest::Approx(m::mutual_information(b, a)).epsilon(1e-12));

  // Qabf(A, A, A): angles agree (A = 1), and the classic quirk makes the strength ratio gF itself where
  // gA == gF, so every pixel with a strong gradient scores Tg * Ta / (1 + exp(ka (1 - Da))). Without the quirk
  // the ratio would be 1 and the value Tg / (1 + exp(kg (1 - Dg))) times that, 5.5e-4 lower.
  const ArrayXXd steep = ramp(48, 48, 10.0, 2.0);  // every Sobel magnitude >= 16, also at the zero-padded border
  const double qa = m::QabfConstants::kTa / (1.0 + std::exp(m::QabfConstants::kKa * (1.0 - m::QabfConstants::kDa)));
  CHECK(m::qabf(steep, steep, steep) == doctest::Approx(m::QabfConstants::kTg * qa).epsilon(1e-13));
}

TEST_CASE("metrics: bad inputs are rejected with a message") {
  const ArrayXXd a = texture(48, 48, 1);
  CHECK(contains(error_message([&] { m::ssim(a, texture(48, 50, 2), 255.0); }), "48 x 48 and 48 x 50"));
  CHECK(contains(error_message([&] { m::vif(texture(40, 60, 1), texture(40, 60, 2)); }), "at least 41 x 41"));
  CHECK(contains(error_message([&] { m::entropy(constant(8, 8, 256.0)); }), "[0, 255]"));
  CHECK(contains(error_message([&] { m::entropy(constant(8, 8, std::nan(""))); }), "[0, 255]"));
  CHECK(contains(error_message([&] { m::evaluate_fusion(a, a, constant(48, 48, -1.0), m::Protocol::tdfusion); }),
                 "[0, 255]"));
  CHECK(contains(error_message([&] { m::parse_protocol("matlab"); }), "cddfuse or tdfusion"));
  CHECK(contains(error_message([&] { m::evaluate_fusion(a, a, a, m::Protocol::cddfuse).at("PSNR"); }), "PSNR"));
}

TEST_CASE("metrics: to_grey8 quantises per channel, then rounds the luma half to even") {
  auto rgb = [](int r, int g, int b) {
    return torch::tensor({r / 255.0f, g / 255.0f, b / 255.0f}).view({3, 1, 1});
  };
  CHECK(m::to_grey8(rgb(10, 20, 30))(0, 0) == 18.0);  // 18.15
  CHECK(m::to_grey8(rgb(0, 0, 250))(0, 0) == 28.0);   // exactly 28.5 -> even
  CHECK(m::to_grey8(rgb(0, 4, 168))(0, 0) == 22.0);   // exactly 21.5 -> even
  CHECK(m::to_grey8(rgb(77, 77, 77))(0, 0) == 77.0);  // identical channels give the channel
  const torch::Tensor grey = torch::tensor({0.0f, 0.5f, 1.0f, 1.2f, -0.1f, 0.2f}).view({1, 2, 3});
  const ArrayXXd g = m::to_grey8(grey);
  REQUIRE(g.rows() == 2);
  REQUIRE(g.cols() == 3);
  CHECK(g(0, 0) == 0.0);
  CHECK(g(0, 1) == 128.0);  // 127.5 -> even
  CHECK(g(0, 2) == 255.0);
  CHECK(g(1, 0) == 255.0);  // clamped as an 8-bit file would store it
  CHECK(g(1, 1) == 0.0);
  CHECK(g(1, 2) == 51.0);
  CHECK(m::to_grey8(torch::tensor({3, 200}, torch::kByte).view({1, 2}))(0, 1) == 200.0);
  CHECK(contains(error_message([] { m::to_grey8(torch::zeros({2, 4, 4})); }), "3 x H x W"));
  CHECK(contains(error_message([] { m::to_grey8(torch::full({1, 2, 2}, std::nan(""))); }), "NaN"));

  // A TNO file: RGB with identical channels, so the grey image is the channel itself.
  const torch::Tensor tno = tdfusion::io::read_image(kExampleData + "/ir/tno_05.png");
  REQUIRE(tno.size(0) == 3);
  const ArrayXXd tno_grey = m::to_grey8(tno);
  CHECK(tno_grey(5, 7) == std::round(tno[0][5][7].item<double>() * 255.0));
  CHECK(tno_grey.rows() == tno.size(1));
}

TEST_CASE("metrics: the two protocols on the same images") {
  const ArrayXXd ir = grey_of(kExampleData + "/ir/roadscene_037.png");
  const ArrayXXd vi = grey_of(kExampleData + "/vi/roadscene_037.png");
  const ArrayXXd fused = (0.7 * ir + 0.3 * vi).round();  // a plain fusion of a real pair
  const m::MetricRow cdd = m::evaluate_fusion(ir, vi, fused, m::Protocol::cddfuse);
  const m::MetricRow tdf = m::evaluate_fusion(ir, vi, fused, m::Protocol::tdfusion);
  const m::MetricRow tdf_threads = m::evaluate_fusion(ir, vi, fused, m::Protocol::tdfusion, /*threads=*/4);

  CHECK(m::metric_names(m::Protocol::cddfuse) ==
        std::vector<std::string>{"EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"});
  CHECK(m::metric_names(m::Protocol::tdfusion) == std::vector<std::string>{"EN", "SF", "SCD", "VIF", "Qabf", "SSIM"});
  REQUIRE(cdd.values.size() == 9);
  REQUIRE(tdf.values.size() == 6);
  for (std::size_t i = 0; i < tdf.values.size(); ++i) {
    CHECK(tdf.values[i].first == m::metric_names(m::Protocol::tdfusion)[i]);
    CHECK(close(tdf.values[i].second, tdf_threads.values[i].second, 1e-14));
  }
  for (const char* name : {"EN", "SF", "SCD", "Qabf"}) CHECK(cdd.at(name) == tdf.at(name));

  const double vif_ir = m::vif(ir, fused), vif_vi = m::vif(vi, fused);
  CHECK(close(cdd.at("VIF"), vif_ir + vif_vi, 1e-13));          // summed
  CHECK(close(tdf.at("VIF"), (vif_ir + vif_vi) / 2.0, 1e-13));  // averaged
  CHECK(close(cdd.at("SSIM"), m::ssim(fused, ir, 2.0) + m::ssim(fused, vi, 2.0), 1e-13));
  CHECK(close(tdf.at("SSIM"), (m::ssim(fused, ir, 255.0) + m::ssim(fused, vi, 255.0)) / 2.0, 1e-13));
  CHECK(close(cdd.at("MI"), m::mutual_information(fused, ir) + m::mutual_information(fused, vi), 1e-13));
  // The data range matters: C1, C2 of range 2 are tiny, so flat regions weigh differently.
  CHECK(std::abs(cdd.at("SSIM") - 2.0 * tdf.at("SSIM")) > 1e-3);
}

TEST_CASE("metrics: agree with the independent NumPy/SciPy reference on real TNO and MSRS pairs") {
  const std::string python = TDFUSION_REFERENCE_PYTHON;
  if (python.empty()) {
    MESSAGE("skipped: no python3 with numpy, scipy and PIL was found at configure time (see .ci/bootstrap)");
    return;
  }
  const std::string script = TDFUSION_REFERENCE_SCRIPT;  // not __FILE__: -ffile-prefix-map makes it relative
  Scratch scratch("python");
  struct Case {
    std::string ir, vi, fused, names;
    m::Protocol protocol;
  };
  // The shipped example pairs with a fusion made here, always; with the shared data, published fusions too:
  // SeAFusion's files are colour (luma rounding matters), DenseFuse's are 8-bit grey; small TNO images (and
  // odd sizes: 472 x 371) keep the Python side quick.
  const std::string blended = scratch.folder("blended");
  for (const std::string stem : {"roadscene_037", "tno_05"}) {
    const torch::Tensor ir = tdfusion::io::read_image(kExampleData + "/ir/" + stem + ".png");
    const torch::Tensor vi = tdfusion::io::read_image(kExampleData + "/vi/" + stem + ".png");
    tdfusion::io::write_image(blended + "/" + stem + ".png", 0.5 * ir.mean(0, true) + 0.5 * vi.mean(0, true));
  }
  std::vector<Case> cases = {
      {kExampleData + "/ir", kExampleData + "/vi", blended, "roadscene_037,tno_05", m::Protocol::cddfuse}};
  if (fs::is_directory(kData)) {
    cases.push_back({kData + "/tno/ir", kData + "/tno/vi", kData + "/peer_results/SeAFusion/tno", "07,19", m::Protocol::cddfuse});
    cases.push_back({kData + "/tno/ir", kData + "/tno/vi", kData + "/peer_results/DenseFuse/tno", "24", m::Protocol::tdfusion});
    cases.push_back({kData + "/msrs/ir", kData + "/msrs/vi", kData + "/peer_results/SeAFusion/msrs", "00004N", m::Protocol::cddfuse});
  } else {
    MESSAGE("the published fusions of " << kData << " are absent: comparing on the example pairs only");
  }
  std::vector<std::string> outputs, commands;
  std::vector<std::future<int>> runs;  // the reference runs concurrently
  for (std::size_t k = 0; k < cases.size(); ++k) {
    const Case& c = cases[k];
    outputs.push_back((scratch.dir / ("reference" + std::to_string(k) + ".json")).string());
    commands.push_back(python + " '" + script + "' --ir '" + c.ir + "' --vi '" + c.vi + "' --fused '" + c.fused +
                       "' --names " + c.names + " --protocol " + m::protocol_name(c.protocol) + " --json '" +
                       outputs.back() + "'");
    runs.push_back(
        std::async(std::launch::async, [command = commands.back()] { return std::system(command.c_str()); }));
  }
  int compared = 0;
  double worst = 0.0;
  for (std::size_t k = 0; k < cases.size(); ++k) {
    const Case& c = cases[k];
    REQUIRE_MESSAGE(runs[k].get() == 0, commands[k]);
    std::ifstream file(outputs[k]);
    const nlohmann::json reference = nlohmann::json::parse(file);
    for (const auto& [stem, values] : reference.at("images").items()) {
      const ArrayXXd ir = grey_of(file_with_stem(c.ir, stem)), vi = grey_of(file_with_stem(c.vi, stem));
      const m::MetricRow row = m::evaluate_fusion(ir, vi, grey_of(file_with_stem(c.fused, stem)), c.protocol);
      for (const auto& [name, value] : row.values) {
        const double expected = values.at(name).get<double>();
        CHECK_MESSAGE(close(value, expected, 1e-6, 1e-9), c.fused, " ", stem, " ", name, ": C++ ", value,
                      " vs Python ", expected);
        worst = std::max(worst, std::abs(value - expected) / std::max(std::abs(expected), 1e-300));
        ++compared;
      }
    }
  }
  CHECK(compared == 2 * 9 + (fs::is_directory(kData) ? 9 + 9 + 6 + 9 : 0));
  MESSAGE("largest relative difference C++ vs Python: ", worst);
}

TEST_CASE("metrics: a published MATLAB table agrees where the formulas are the same") {
  // Linfeng-Tang/Image-Fusion's toolbox on the same files: EN and SCD are the same formulas, SF the same on
  // [0, 1] data (x 255 here), Qabf the same up to filtering details (~0.1%).
  if (shared_path("data/peer_results/matlab_tno42_metrics.json").empty()) return;
  std::ifstream file(kData + "/peer_results/matlab_tno42_metrics.json");
  REQUIRE(file.good());
  const nlohmann::json table = nlohmann::json::parse(file).at("metrics");
  const std::vector<std::pair<std::string, int>> images = {{"01", 0}, {"11", 16}};  // tno25 -> tang42 row
  for (const std::string method : {"DenseFuse", "SeAFusion"}) {
    for (const auto& [stem, row] : images) {
      const ArrayXXd ir = grey_of(kData + "/tno/ir/" + stem + ".png"), vi = grey_of(kData + "/tno/vi/" + stem + ".png");
      const ArrayXXd fused = grey_of(kData + "/peer_results/" + method + "/tno/" + stem + ".png");
      auto published = [&](const char* metric) { return table.at(metric).at(method).at(row).get<double>(); };
      CHECK(close(m::entropy(fused), published("EN"), 1e-9));
      CHECK(close(m::scd(ir, vi, fused), published("SCD"), 1e-9));
      CHECK(close(m::spatial_frequency(fused), 255.0 * published("SF"), 1e-9));
      CHECK(close(m::qabf(ir, vi, fused), published("Qabf"), 3e-3));
    }
  }
}

TEST_CASE("metrics: folder evaluation, incomplete triplets, errors naming the file, reports") {
  Scratch scratch("folders");
  const std::string ir = scratch.folder("ir"), vi = scratch.folder("vi"), fused = scratch.folder("fusedA");
  namespace io = tdfusion::io;
  const ArrayXXd a_ir = texture(48, 56, 1), a_vi = texture(48, 56, 2), b_ir = texture(48, 56, 3);
  const ArrayXXd b_vi = texture(48, 56, 4);
  io::write_image(ir + "/a.png", to_tensor01(a_ir));
  io::write_image(vi + "/a.png", to_tensor01(a_vi));
  io::write_image(fused + "/a.bmp", to_tensor01((a_ir + a_vi) / 2.0));  // extensions may differ
  io::write_image(ir + "/b.png", to_tensor01(b_ir));
  io::write_image(vi + "/b.png", to_tensor01(b_vi));
  io::write_image(fused + "/b.png", to_tensor01(b_ir.max(b_vi)));
  io::write_image(ir + "/c.png", to_tensor01(b_ir));  // c: infrared only
  io::write_image(ir + "/d.png", to_tensor01(b_ir));  // d: no fused image
  io::write_image(vi + "/d.png", to_tensor01(b_vi));
  std::ofstream(fused + "/notes.txt") << "not an image";

  const m::EvaluationTable table = m::evaluate_folders(ir, vi, fused, m::FolderEvaluationOptions().threads(2));
  CHECK(table.method == "fusedA");
  REQUIRE(table.rows.size() == 2);
  CHECK(table.rows[0].image == "a");
  CHECK(table.rows[1].image == "b");
  const m::MetricRow expected_a = m::evaluate_fusion(a_ir, a_vi, grey_of(fused + "/a.bmp"), m::Protocol::cddfuse);
  for (std::size_t i = 0; i < expected_a.values.size(); ++i) {
    CHECK(table.rows[0].metrics.values[i].second == expected_a.values[i].second);
  }
  CHECK(close(table.mean.at("VIF"), (table.rows[0].metrics.at("VIF") + table.rows[1].metrics.at("VIF")) / 2, 1e-15));
  REQUIRE(table.incomplete.size() == 2);
  CHECK(table.incomplete[0].image == "c");
  CHECK(table.incomplete[0].missing_from == std::vector<std::string>{"vi", "fused"});
  CHECK(table.incomplete[1].image == "d");
  CHECK(table.incomplete[1].missing_from == std::vector<std::string>{"fused"});
  CHECK(table.incomplete[1].present.size() == 2);

  const m::EvaluationTable serial = m::evaluate_folders(ir, vi, fused, m::FolderEvaluationOptions().threads(1));
  CHECK(serial.rows[1].metrics.values == table.rows[1].metrics.values);

  // Errors name the file.
  const std::string strict = error_message(
      [&] { m::evaluate_folders(ir, vi, fused, m::FolderEvaluationOptions().require_complete(true)); });
  CHECK(contains(strict, "no vi image named 'c.*'"));
  CHECK(contains(error_message([&] { m::evaluate_folders(ir, vi, scratch.dir.string() + "/nowhere"); }), "nowhere"));
  const std::string bad_size_dir = scratch.folder("fusedB");
  io::write_image(bad_size_dir + "/a.png", to_tensor01(texture(48, 50, 1)));
  CHECK(contains(error_message([&] { m::evaluate_folders(ir, vi, bad_size_dir); }), bad_size_dir + "/a.png"));
  const std::string unreadable_dir = scratch.folder("fusedC");
  io::write_image(unreadable_dir + "/a.png", to_tensor01(texture(48, 56, 1)));
  std::ofstream(unreadable_dir + "/b.png") << "garbage, not a PNG";
  CHECK(contains(error_message([&] { m::evaluate_folders(ir, vi, unreadable_dir); }), unreadable_dir + "/b.png"));
  const std::string duplicate_dir = scratch.folder("fusedD");
  io::write_image(duplicate_dir + "/a.png", to_tensor01(a_ir));
  io::write_image(duplicate_dir + "/a.jpg", to_tensor01(a_ir));
  CHECK(contains(error_message([&] { m::evaluate_folders(ir, vi, duplicate_dir); }), duplicate_dir + "/a.jpg"));
  const std::string empty_dir = scratch.folder("empty");
  CHECK(contains(error_message([&] { m::evaluate_folders(ir, vi, empty_dir); }), "no image name is present in all"));
  const std::string small_dir = scratch.folder("small");
  for (const std::string& d : {small_dir + "/ir", small_dir + "/vi", small_dir + "/f"}) {
    fs::create_directories(d);
    io::write_image(d + "/s.png", to_tensor01(texture(30, 30, 5)));
  }
  CHECK(contains(error_message([&] { m::evaluate_folders(small_dir + "/ir", small_dir + "/vi", small_dir + "/f"); }),
                 small_dir + "/f/s.png"));

  // Reports.
  const std::string text = m::format_table(table);
  CHECK(contains(text, "protocol cddfuse"));
  CHECK(contains(text, "mean"));
  CHECK(contains(text, "c: missing from vi fused"));
  const std::string csv = m::format_csv(table);
  CHECK(csv.rfind("image,EN,SD,SF,AG,MI,SCD,VIF,Qabf,SSIM,protocol\n", 0) == 0);
  CHECK(std::count(csv.begin(), csv.end(), '\n') == 4);
  CHECK(contains(csv, "\nmean,"));
  const nlohmann::json json = nlohmann::json::parse(m::format_json(table));
  CHECK(json.at("protocol") == "cddfuse");
  CHECK(json.at("images").size() == 2);
  CHECK(json.at("images")[0].at("values").at("VIF").get<double>() == table.rows[0].metrics.at("VIF"));
  CHECK(json.at("incomplete").size() == 2);
  CHECK(json.at("incomplete")[1].at("image") == "d");

  const std::vector<m::EvaluationTable> methods =
      m::evaluate_methods(ir, vi, {{"mean-fuse", fused}, {"ir copy", ir}},
                          m::FolderEvaluationOptions().protocol(m::Protocol::tdfusion));
  const std::string markdown = m::format_markdown_comparison(methods, 4, "a test set");
  CHECK(contains(markdown, "protocol tdfusion"));
  CHECK(contains(markdown, "| Method | EN | SF | SCD | VIF | Qabf | SSIM | n |"));
  CHECK(contains(markdown, "| mean-fuse |"));
  CHECK(contains(markdown, "**"));
  CHECK(contains(error_message([&] { m::format_markdown_comparison({table, methods[0]}); }), "not comparable"));

  // The bar chart: an RGB image whose first panel holds a bar in the first palette colour.
  const torch::Tensor chart = m::draw_comparison_chart(methods);
  REQUIRE(chart.dim() == 3);
  CHECK(chart.size(0) == 3);
  CHECK(chart.min().item<double>() >= 0.0);
  CHECK(chart.max().item<double>() <= 1.0);
  const torch::Tensor first_colour = torch::tensor({31.0f, 119.0f, 180.0f}).view({3, 1, 1}) / 255.0f;
  CHECK(((chart - first_colour).abs().sum(0) < 1e-6).sum().item<int64_t>() > 100);
  const std::string chart_path = (scratch.dir / "chart.png").string();
  m::write_comparison_chart(chart_path, methods);
  CHECK(tdfusion::io::read_image(chart_path).sizes() == chart.sizes());
}

TEST_CASE("metrics: confusion matrix, IoU and mIoU with an ignore label") {
  m::ConfusionMatrix matrix(4, /*ignore_index=*/255);
  const std::vector<int> target = {0, 0, 0, 1, 1, 255, 255, 2};
  const std::vector<int> prediction = {0, 0, 1, 1, 2, 3, 0, 2};  // class 3 is predicted only where ignored
  matrix.update(prediction, target);
  CHECK(matrix.total() == 6);
  CHECK(matrix.count(0, 1) == 1);
  const std::vector<double> iou = matrix.iou();
  CHECK(iou[0] == doctest::Approx(2.0 / 3.0));  // TP 2, union 3
  CHECK(iou[1] == doctest::Approx(1.0 / 3.0));  // TP 1, predicted 2, truth 2
  CHECK(iou[2] == doctest::Approx(0.5));        // TP 1, predicted 2, truth 1
  CHECK(std::isnan(iou[3]));                    // absent from both: excluded from the mean
  CHECK(matrix.mean_iou() == doctest::Approx(0.5));
  CHECK(matrix.pixel_accuracy() == doctest::Approx(4.0 / 6.0));
  CHECK(matrix.class_accuracy()[0] == doctest::Approx(2.0 / 3.0));

  // A class predicted but never true counts with IoU 0.
  m::ConfusionMatrix other(4, 255);
  other.update(std::vector<int>{3}, std::vector<int>{0});
  matrix.merge(other);
  CHECK(matrix.iou()[3] == 0.0);
  CHECK(matrix.mean_iou() == doctest::Approx((0.5 + 1.0 / 3.0 + 0.5 + 0.0) / 4.0));  // IoU0 = 2 / 4 now

  // Tensors: logits N x C x H x W reduced by argmax; labels outside the classes are errors.
  m::ConfusionMatrix from_tensors(3, 255);
  const torch::Tensor labels = torch::tensor({0, 1, 2, 255}, torch::kLong).view({1, 2, 2});
  const torch::Tensor logits = torch::one_hot(torch::tensor({0, 1, 1, 2}, torch::kLong), 3)
                                   .to(torch::kFloat).view({1, 2, 2, 3}).permute({0, 3, 1, 2});
  m::update(from_tensors, logits, labels);
  CHECK(from_tensors.total() == 3);
  CHECK(from_tensors.iou()[2] == 0.0);
  const torch::Tensor sevens = torch::full({1, 2, 2}, 7, torch::kLong);
  CHECK(contains(error_message([&] { m::update(from_tensors, labels.clamp_max(2), sevens); }),
                 "ground-truth class 7"));
  CHECK(contains(error_message([&] { m::update(from_tensors, torch::full({1, 2, 2}, 3, torch::kLong), labels); }),
                 "predicted class 3"));
}

TEST_CASE("metrics: COCO-style AP against a hand-worked precision-recall curve") {
  // One class, three ground-truth boxes in two images; detections by score: TP, FP, TP, duplicate (FP), TP.
  // recall    1/3, 1/3, 2/3, 2/3, 1;  precision 1, 1/2, 2/3, 1/2, 3/5;  envelope 1, 2/3, 2/3, 3/5, 3/5.
  // 101-point: recall 0..0.33 -> 1 (34 points), 0.34..0.66 -> 2/3 (33), 0.67..1 -> 3/5 (34).
  const double expected = (34.0 * 1.0 + 33.0 * 2.0 / 3.0 + 34.0 * 0.6) / 101.0;
  CHECK(m::average_precision_101({1 / 3.0, 1 / 3.0, 2 / 3.0, 2 / 3.0, 1.0}, {1.0, 0.5, 2 / 3.0, 0.5, 0.6}) ==
        doctest::Approx(expected).epsilon(1e-14));

  const m::Box g1{0, 0, 10, 10, 0}, g2{20, 20, 30, 30, 0}, g3{5, 5, 15, 15, 0};
  auto det = [](const m::Box& box, float score) { return m::Box{box.x1, box.y1, box.x2, box.y2, box.cls, score}; };
  m::DetectionEvaluator evaluator(2);
  evaluator.add_image({det(g1, 0.9f), m::Box{40, 40, 50, 50, 0, 0.8f}, det(g1, 0.6f), det(g2, 0.5f)}, {g1, g2});
  evaluator.add_image({det(g3, 0.7f)}, {g3});
  const m::DetectionMetrics result = evaluator.compute();
  REQUIRE(result.classes.size() == 2);
  CHECK(result.classes_with_ground_truth == 1);  // class 1 has no ground truth: left out of the means
  CHECK(std::isnan(result.classes[1].ap50));
  CHECK(result.classes[0].ap50 == doctest::Approx(expected).epsilon(1e-12));
  CHECK(result.classes[0].ap50_95 == doctest::Approx(expected).epsilon(1e-12));  // matched boxes have IoU 1
  CHECK(result.map50 == doctest::Approx(expected).epsilon(1e-12));
  CHECK(result.classes[0].recall == 1.0);
  CHECK(result.classes[0].precision == doctest::Approx(0.6));
  CHECK(result.classes[0].ground_truths == 3);
  CHECK(result.classes[0].detections == 5);

  // IoU 0.62 is a match at thresholds 0.50, 0.55, 0.60 only: AP50 = 1, AP50:95 = 0.3.
  m::DetectionEvaluator loose(1);
  loose.add_image({m::Box{0, 0, 10, 6.2f, 0, 0.9f}}, {m::Box{0, 0, 10, 10, 0}});
  const m::DetectionMetrics l = loose.compute();
  CHECK(m::box_iou(m::Box{0, 0, 10, 6.2f, 0}, m::Box{0, 0, 10, 10, 0}) == doctest::Approx(0.62).epsilon(1e-6));
  CHECK(l.map50 == doctest::Approx(1.0));
  CHECK(l.map50_95 == doctest::Approx(0.3));

  // A ground truth without any detection gives AP 0; the score threshold moves precision / recall only.
  m::DetectionEvaluator partial(1, m::DetectionEvaluationOptions{100, 0.75});
  partial.add_image({det(g1, 0.9f), det(g2, 0.5f)}, {g1, g2, g3});
  const m::DetectionMetrics p = partial.compute();
  CHECK(p.classes[0].recall == doctest::Approx(1.0 / 3.0));
  CHECK(p.classes[0].precision == 1.0);
  CHECK(p.map50 == doctest::Approx((67.0 * 1.0) / 101.0));  // recall reaches 2/3 with precision 1

  // max_detections keeps the highest scores per image and class.
  m::DetectionEvaluator capped(1, m::DetectionEvaluationOptions{1, 0.0});
  capped.add_image({det(g2, 0.2f), det(g1, 0.9f)}, {g1, g2});
  CHECK(capped.compute().classes[0].detections == 1);

  // Tensors and bad boxes.
  const std::vector<m::Box> boxes = m::boxes_from_tensors(torch::tensor({{1.0f, 2.0f, 3.0f, 4.0f}}),
                                                          torch::tensor({1}), torch::tensor({0.25f}));
  CHECK(boxes[0].x2 == 3.0f);
  CHECK(boxes[0].cls == 1);
  CHECK(boxes[0].score == 0.25f);
  CHECK(contains(error_message([&] { evaluator.add_image({m::Box{0, 0, 1, 1, 5}}, {}); }), "class 5"));
  CHECK(contains(error_message([&] { evaluator.add_image({}, {m::Box{3, 0, 1, 1, 0}}); }), "x2 < x1"));
}

TEST_CASE("metrics: Student-t quantiles and the t-interval of a mean") {
  using tdfusion::metrics::student_t_quantile;
  const double pi = std::acos(-1.0);
  // Closed forms: 1 degree of freedom (Cauchy) tan(pi (p - 1/2)); 2 degrees (2p - 1) sqrt(2 / (4 p (1 - p))).
  CHECK(student_t_quantile(0.975, 1) == doctest::Approx(std::tan(pi * 0.475)).epsilon(1e-8));
  CHECK(student_t_quantile(0.995, 1) == doctest::Approx(std::tan(pi * 0.495)).epsilon(1e-8));
  CHECK(student_t_quantile(0.975, 2) == doctest::Approx(0.95 * std::sqrt(2.0 / (4 * 0.975 * 0.025))).epsilon(1e-8));
  CHECK(student_t_quantile(0.975, 4) == doctest::Approx(2.7764451052).epsilon(1e-8));  // printed tables
  CHECK(student_t_quantile(0.975, 30) == doctest::Approx(2.0422724563).epsilon(1e-8));
  CHECK(student_t_quantile(0.025, 4) == doctest::Approx(-2.7764451052).epsilon(1e-8));
  CHECK_THROWS_WITH_AS(student_t_quantile(1.0, 4), doctest::Contains("needs p in (0, 1)"), c10::Error);
  CHECK_THROWS_WITH_AS(student_t_quantile(0.9, 0), doctest::Contains("positive degrees of freedom"), c10::Error);

  // {1, 2, 3}: mean 2, s = 1, half-width t(0.975, 2) / sqrt(3).
  const auto m = tdfusion::metrics::mean_interval({1.0, 2.0, 3.0});
  const double half = 0.95 * std::sqrt(2.0 / (4 * 0.975 * 0.025)) / std::sqrt(3.0);
  CHECK(m.count == 3);
  CHECK(m.mean == 2.0);
  CHECK(m.low == doctest::Approx(2.0 - half).epsilon(1e-8));
  CHECK(m.high == doctest::Approx(2.0 + half).epsilon(1e-8));
  const auto one = tdfusion::metrics::mean_interval({0.25});
  CHECK(one.mean == 0.25);
  CHECK(std::isnan(one.low));
  CHECK(std::isnan(one.high));
  CHECK(tdfusion::metrics::mean_interval({}).count == 0);
}
