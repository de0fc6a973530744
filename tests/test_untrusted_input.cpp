// Hostile files and output paths: atomic writes that cannot be redirected, image headers checked before
// decoding, YOLO label files of any content, and tiled fusion within a tile's memory. Every case makes its
// small input files itself and checks the message, the time taken and that nothing else was written or harmed.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/data/yolo_labels.hpp"
#include "tdfusion/fusion/fuse_images.hpp"
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/io/atomic_file.hpp"
#include "tdfusion/io/checkpoint.hpp"
#include "tdfusion/io/image.hpp"
#include "tdfusion/io/torch_state_dict.hpp"

#include <malloc.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;
namespace io = tdfusion::io;
namespace data = tdfusion::data;
using namespace tdfusion::test;

/// Seconds `action` takes.
double seconds(const std::function<void()>& action) {
  const auto start = std::chrono::steady_clock::now();
  action();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

mode_t mode_of(const std::string& path) {
  struct stat info {};
  REQUIRE(::lstat(path.c_str(), &info) == 0);
  return info.st_mode;
}

std::string be32(uint32_t value) {
  return {static_cast<char>(value >> 24), static_cast<char>(value >> 16), static_cast<char>(value >> 8),
          static_cast<char>(value)};
}

std::string le16(uint32_t value) { return {static_cast<char>(value), static_cast<char>(value >> 8)}; }
std::string le32(uint32_t value) { return le16(value & 0xffff) + le16(value >> 16); }

/// A PNG chunk with its length and CRC.
std::string png_chunk(const std::string& type, const std::string& payload) {
  const std::string body = type + payload;
  const auto crc = static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(body.data()), body.size()));
  return be32(static_cast<uint32_t>(payload.size())) + body + be32(crc);
}

std::string zlib_compress(const std::string& raw) {
  uLongf size = compressBound(raw.size());
  std::string out(size, '\0');
  REQUIRE(compress2(reinterpret_cast<Bytef*>(out.data()), &size, reinterpret_cast<const Bytef*>(raw.data()), raw.size(),
                    9) == Z_OK);
  out.resize(size);
  return out;
}

/// A PNG built by hand: its IHDR says width x height at `depth` bits with `colour` type, and its IDAT holds
/// `raw` (scanlines with their filter bytes), deflated.
std::string png_file(uint32_t width, uint32_t height, int depth, int colour, const std::string& raw) {
  const std::string header = be32(width) + be32(height) + std::string{static_cast<char>(depth), static_cast<char>(colour),
                                                                       0, 0, 0};
  return "\x89PNG\r\n\x1a\n" + png_chunk("IHDR", header) + png_chunk("IDAT", zlib_compress(raw)) +
         png_chunk("IEND", "");
}

/// Encodes a PNG with libpng (any bit depth, colour type and interlacing): `rows` are packed scanlines as PNG
/// stores them, without filter bytes; `palette` is RGB triples for colour type 3.
std::string encode_png(int width, int height, int depth, int colour, bool interlaced, const std::string& rows,
                       const std::string& palette = "") {
  io::detail::PngWriter writer;
  REQUIRE(writer.ready());
  png_structp png = writer.png();
  png_infop info = writer.info();
  std::string out;
  const auto append = [](png_structp p, png_bytep data, size_t length) {
    static_cast<std::string*>(png_get_io_ptr(p))->append(reinterpret_cast<const char*>(data), length);
  };
  const size_t row_bytes = rows.size() / static_cast<size_t>(height);
  const bool ok = io::detail::png_call(png, [&] {
    png_set_write_fn(png, &out, append, nullptr);
    png_set_IHDR(png, info, width, height, depth, colour, interlaced ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (colour == PNG_COLOR_TYPE_PALETTE) {
      png_set_PLTE(png, info, reinterpret_cast<png_const_colorp>(palette.data()), static_cast<int>(palette.size() / 3));
    }
    png_write_info(png, info);
    const int passes = png_set_interlace_handling(png);
    for (int pass = 0; pass < passes; ++pass) {
      for (int y = 0; y < height; ++y) {
        png_write_row(png, reinterpret_cast<png_const_bytep>(rows.data() + static_cast<size_t>(y) * row_bytes));
      }
    }
    png_write_end(png, nullptr);
  });
  REQUIRE(ok);
  return out;
}

/// Peak resident memory of this process since the last reset, in MiB, or -1 where Linux does not offer it.
/// reset_peak_memory starts a new measurement (writing 5 to clear_refs resets VmHWM); under AddressSanitizer,
/// whose quarantine keeps freed memory, there is none.
bool reset_peak_memory() {
#if defined(__SANITIZE_ADDRESS__)
  return false;
#else
  return static_cast<bool>(std::ofstream("/proc/self/clear_refs") << "5");
#endif
}
double peak_memory_mib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return -1.0;
}
double current_memory_mib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return -1.0;
}

/// Runs `action` and returns how far the peak resident memory rose above the memory in use before it, in MiB
/// (-1: not measurable here). Freed memory the allocator kept is given back first, so that `action` cannot
/// reuse it unseen.
double memory_growth_mib(const std::function<void()>& action) {
  ::malloc_trim(0);
  const bool measurable = reset_peak_memory();
  const double before = current_memory_mib();
  action();
  return measurable ? peak_memory_mib() - before : -1.0;
}

}  // namespace

// ------------------------------------------------------------------------------------------ atomic writes

TEST_CASE("atomic writes do not follow links planted under the names of temporaries or the target") {
  Scratch dir("links");
  Scratch elsewhere("foreign");
  const std::string secret = (elsewhere / "secret");
  write_file(secret, "root's secret\n");
  REQUIRE(::chmod(secret.c_str(), 0600) == 0);

  // Every name the earlier scheme (<out>.tmp-<pid>-<n>) would have used for the first writes of this
  // process, and the targets themselves, are links to the foreign file.
  const std::vector<std::string> outputs = {"fused.png", "fused16.png", "fused.jpg", "fused.bmp",  "report.json",
                                            "table.csv", "table.md",    "run.ckpt",  "fusion.pth", "linked.png"};
  std::set<std::string> planted;
  for (const std::string& name : outputs) {
    for (int n = 0; n < 64; ++n) {
      const std::string link = name + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(n);
      fs::create_symlink(secret, dir.dir / link);
      planted.insert(link);
    }
  }
  fs::create_symlink(secret, dir.dir / "linked.png");

  const torch::Tensor image = torch::rand({3, 12, 10});
  tdfusion::fusion::LightFusion net;
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(1e-3));
  io::CheckpointState state;
  state.modules = {{"fusion", net.ptr()}};
  state.optimizers = {{"adam", &adam}};
  state.counters = {{"epoch", 3}};
  const double took = seconds([&] {
    io::write_image((dir / "fused.png"), image);
    io::write_image((dir / "fused16.png"), image, 16);
    io::write_image((dir / "fused.jpg"), image);
    io::write_image((dir / "fused.bmp"), image);
    io::write_text_atomically((dir / "report.json"), "{}\n");
    io::write_text_atomically((dir / "table.csv"), "a,b\n");
    io::write_text_atomically((dir / "table.md"), "| a |\n");
    io::save_checkpoint((dir / "run.ckpt"), state);
    io::write_torch_state_dict((dir / "fusion.pth"), net->named_parameters());
    io::write_image((dir / "linked.png"), image);  // replaces the link, not what it points to
  });
  CHECK(took < 10.0);

  CHECK(file_bytes(secret) == "root's secret\n");
  CHECK((mode_of(secret) & 07777) == 0600);
  const mode_t expected = 0666 & ~io::detail::current_umask();
  for (const std::string& name : outputs) {
    CAPTURE(name);
    CHECK(S_ISREG(mode_of((dir / name))));
    CHECK((mode_of((dir / name)) & 07777) == expected);
  }
  for (const std::string& link : planted) CHECK(fs::read_symlink(dir.dir / link) == secret);
  std::set<std::string> expected_entries = planted;
  expected_entries.insert(outputs.begin(), outputs.end());
  CHECK(dir.entries() == expected_entries);  // no temporary left

  // The outputs are what was written.
  CHECK(torch::equal(io::read_image((dir / "linked.png")), io::read_image((dir / "fused.png"))));
  CHECK(file_bytes((dir / "table.csv")) == "a,b\n");
  tdfusion::fusion::LightFusion loaded;
  io::load_torch_state_dict(*loaded, (dir / "fusion.pth"));
  CHECK(torch::equal(loaded->named_parameters()["conv0.weight"], net->named_parameters()["conv0.weight"]));
}

TEST_CASE("atomic writes take the mode a new file gets from the umask, and unpredictable temporaries") {
  Scratch dir("umask");
  const mode_t saved = ::umask(027);
  io::write_text_atomically((dir / "private.txt"), "x");
  ::umask(077);
  io::write_image((dir / "private.png"), torch::zeros({1, 2, 2}));
  ::umask(saved);
  CHECK((mode_of((dir / "private.txt")) & 07777) == 0640);
  CHECK((mode_of((dir / "private.png")) & 07777) == 0600);
  CHECK(io::detail::current_umask() == saved);

  std::set<std::string> names;
  const std::regex pattern(R"(out\.png\.tdfusion-tmp-[0-9a-f]{16})");
  for (int i = 0; i < 1000; ++i) {
    const std::string name = io::detail::temporary_name("out.png");
    CHECK(std::regex_match(name, pattern));
    names.insert(name);
  }
  CHECK(names.size() == 1000);
}

TEST_CASE("a failing writer leaves nothing behind and the old file untouched") {
  Scratch dir("failing");
  const std::string target = (dir / "result.png");
  io::write_image(target, torch::full({1, 4, 4}, 0.5));
  const std::string before = file_bytes(target);

  const std::string big(3 << 20, 'x');  // more than the sink's buffer: part of it reaches the temporary
  const std::string message = error_message([&] {
    io::write_file_atomically(target, [&](io::FileSink& sink) {
      sink.write(big);
      TORCH_CHECK(false, "the encoder gave up");
    });
  });
  CHECK(contains(message, "failed to write '" + target + "' (previous content, if any, is unchanged): the encoder gave up"));
  CHECK(file_bytes(target) == before);
  CHECK(dir.entries() == std::set<std::string>{"result.png"});

  // A write that fails for want of space (here: the file size limit, with its signal ignored) names the
  // cause, whatever the encoder made of it, and leaves nothing behind.
  tdfusion::fusion::LightFusion net;
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(1e-3));
  io::CheckpointState state;
  state.modules = {{"fusion", net.ptr()}};
  state.optimizers = {{"adam", &adam}};
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &saved) == 0);
  struct rlimit small = saved;
  small.rlim_cur = 4096;
  const auto previous_handler = std::signal(SIGXFSZ, SIG_IGN);
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  const std::string full = error_message([&] { io::save_checkpoint((dir / "run.ckpt"), state); });
  const std::string full_image = error_message([&] { io::write_image(target, torch::rand({3, 64, 64})); });
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, previous_handler);
  CHECK(full == "tdfusion: failed to write '" + (dir / "run.ckpt") +
                    "' (previous content, if any, is unchanged): File too large");
  CHECK(contains(full_image, "(previous content, if any, is unchanged): File too large"));
  CHECK(file_bytes(target) == before);
  CHECK(dir.entries() == std::set<std::string>{"result.png"});

  // Image writes refused before any file is made: NaN values, a missing directory, a directory as the target.
  CHECK(contains(error_message([&] { io::write_image(target, torch::full({1, 4, 4}, NAN)); }), "NaN"));
  CHECK(file_bytes(target) == before);
  CHECK(contains(error_message([&] { io::write_image((dir / "missing/out.png"), torch::zeros({1, 2, 2})); }),
                 "directory '" + (dir / "missing") + "' is not accessible"));
  CHECK(contains(error_message([&] { io::write_text_atomically(dir.dir.string() + "/", "x"); }), "names a directory"));
  CHECK(dir.entries() == std::set<std::string>{"result.png"});
}

TEST_CASE("stale temporaries: only this user's regular files of the recognised names are removed") {
  Scratch dir("stale");
  Scratch elsewhere("stale-foreign");
  const std::string secret = (elsewhere / "secret");
  write_file(secret, "keep");
  for (const char* name : {"a.png.tdfusion-tmp-0123456789abcdef", "a.png.tdfusion-tmp-fedcba9876543210",
                           "checkpoint.pt.tmp-4242-7", "b.txt.tdfusion-tmp-00000000000000aa", "a.png", "notes.tmp-x-1",
                           "c.png.tdfusion-tmp-0123", "d.png.tdfusion-tmp-0123456789abcdeg"}) {
    write_file((dir / name), "partial");
  }
  fs::create_symlink(secret, dir.dir / "e.png.tdfusion-tmp-1111111111111111");
  fs::create_directory(dir.dir / "f.png.tdfusion-tmp-2222222222222222");
  const bool foreign = ::chown((dir / "b.txt.tdfusion-tmp-00000000000000aa").c_str(), 65534, 65534) == 0;

  const std::vector<std::string> of_a = io::remove_stale_temporaries_of((dir / "a.png"));
  CHECK(std::set<std::string>(of_a.begin(), of_a.end()) ==
        std::set<std::string>{(dir / "a.png.tdfusion-tmp-0123456789abcdef"), (dir / "a.png.tdfusion-tmp-fedcba9876543210")});
  const std::vector<std::string> rest = io::remove_stale_temporaries(dir.dir.string());
  std::set<std::string> expected_rest = {(dir / "checkpoint.pt.tmp-4242-7")};
  if (!foreign) expected_rest.insert((dir / "b.txt.tdfusion-tmp-00000000000000aa"));
  CHECK(std::set<std::string>(rest.begin(), rest.end()) == expected_rest);
  std::set<std::string> left = {"a.png", "notes.tmp-x-1", "c.png.tdfusion-tmp-0123", "d.png.tdfusion-tmp-0123456789abcdeg",
                                "e.png.tdfusion-tmp-1111111111111111", "f.png.tdfusion-tmp-2222222222222222"};
  if (foreign) {
    left.insert("b.txt.tdfusion-tmp-00000000000000aa");
  } else {
    MESSAGE("skipped: not root, so no file of another user could be made to check that it is kept");
  }
  CHECK(dir.entries() == left);
  CHECK(file_bytes(secret) == "keep");
  CHECK(contains(error_message([&] { io::remove_stale_temporaries((dir / "nowhere")); }), (dir / "nowhere")));
}

// ------------------------------------------------------------------------------------------------- images

TEST_CASE("image headers are checked against the pixel limit before decoding") {
  Scratch dir("headers");
  struct Case {
    const char* name;
    std::string bytes;
    const char* fragment;
  };
  // SOI, an APP0 segment (length 16), then SOF0 (length 17): 8 bits, height and width 65535, 3 components.
  const std::string jpeg_sof = std::string("\xff\xd8\xff\xe0\x00\x10JFIF", 10) + std::string(10, '\0') +
                               std::string("\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03", 10) + std::string(9, '\x01');
  const std::string bmp = "BM" + std::string(12, '\0') + le32(40) + le32(50000) + le32(50000) + std::string(40, '\0');
  const std::string psd = "8BPS" + std::string("\x00\x01", 2) + std::string(6, '\0') + std::string("\x00\x03", 2) +
                          be32(100000) + be32(100000) + std::string("\x00\x08\x00\x03", 4) + std::string(40, '\0');
  const std::vector<Case> cases = {
      {"huge.png", png_file(100000, 100000, 8, 0, std::string(1000, '\0')), "width 100000 and height 100000"},
      {"wide.png", png_file(20000, 20000, 8, 2, std::string(1000, '\0')), "400000000 pixels"},
      {"huge.jpg", jpeg_sof, "width 65535 and height 65535"},
      {"huge.bmp", bmp, "width 50000 and height 50000"},
      {"huge.gif", "GIF89a" + le16(65535) + le16(65535) + std::string(20, '\0'), "width 65535 and height 65535"},
      {"huge.psd", psd, "width 100000 and height 100000"},
      {"huge.pgm", "P5\n# a comment\n100000 100000\n255\n" + std::string(100, '\0'), "width 100000 and height 100000"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    const std::string path = (dir / c.name);
    write_file(path, c.bytes);
    std::string message;
    const double took = seconds([&] { message = error_message([&] { io::read_image(path); }); });
    CHECK(contains(message, "tdfusion: cannot read image '" + path + "': it is too large"));
    CHECK(contains(message, c.fragment));
    CHECK(contains(message, "above the limit of 67108864 (max_pixels)"));
    CHECK(took < 1.0);
    CHECK(contains(error_message([&] { io::read_image_info(path); }), "it is too large"));
  }

  // The limit is an option; a small image passes the default.
  const std::string small = (dir / "small.png");
  io::write_image(small, torch::rand({3, 100, 100}));
  CHECK(io::read_image(small).sizes() == torch::IntArrayRef({3, 100, 100}));
  CHECK(contains(error_message([&] { io::read_image(small, io::ImageReadOptions().max_pixels(9999)); }),
                 "10000 pixels, above the limit of 9999 (max_pixels)"));
  CHECK(contains(error_message([&] { io::read_image(small, io::ImageReadOptions().max_pixels(0)); }),
                 "max_pixels must be positive"));
}

TEST_CASE("empty, truncated, invalid and non-regular image files are named with the problem") {
  Scratch dir("bad-images");
  struct Case {
    const char* name;
    std::string bytes;
    const char* fragment;
  };
  const std::vector<Case> cases = {
      {"zero.png", png_file(0, 5, 8, 0, ""), "the image is empty (its PNG header gives width 0 and height 5)"},
      {"zero.bmp", "BM" + std::string(12, '\0') + le32(40) + le32(7) + le32(0) + std::string(40, '\0'),
       "the image is empty (its BMP header gives width 7 and height 0)"},
      {"zero.gif", "GIF87a" + le16(0) + le16(0) + std::string(20, '\0'), "the image is empty"},
      {"zero.pgm", std::string("P5 0 5 255\n"), "the image is empty (its PNM header gives width 0 and height 5)"},
      {"empty.png", "", "the file is empty"},
      {"short.png", std::string("\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", 16), "the file ends inside its PNG header"},
      {"depth.png", png_file(4, 4, 3, 0, std::string(20, '\0')), "invalid PNG header (bit depth 3 with colour type 0)"},
      {"noihdr.png", "\x89PNG\r\n\x1a\n" + png_chunk("IDAT", "") + std::string(20, '\0'), "invalid PNG header (no IHDR"},
      {"deep.jpg", std::string("\xff\xd8\xff\xc0\x00\x0b\x0c\x00\x10\x00\x10\x01\x01\x11\x00", 15),
       "12-bit samples; only 8-bit JPEG is supported"},
      {"sos.jpg", std::string("\xff\xd8\xff\xda\x00\x02", 6), "no frame header before the image data"},
      {"pnm.pgm", std::string("P5 4 four 255\n"), "invalid PNM header (width, height and maximum value"},
      {"maxval.pgm", std::string("P5 4 4 70000\n"), "maximum value 70000"},
      {"cut.ppm", std::string("P6 4 4 65535\n") + std::string(95, '\x7f'), "its 96 bytes of samples are not all there"},
      {"radiance.hdr", std::string("#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n"), "Radiance HDR images are not supported"},
      {"text.png", std::string("this is not an image at all, only text\n"), "not a readable image"},
      {"idat.png", png_file(8, 8, 8, 0, std::string(3, '\0')), "corrupt or truncated file?"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    const std::string path = (dir / c.name);
    write_file(path, c.bytes);
    const std::string message = error_message([&] { io::read_image(path); });
    CHECK(contains(message, "'" + path + "'"));
    CHECK(contains(message, c.fragment));
  }

  // Not a regular file: a directory and a named pipe (which must not wait for a writer).
  CHECK(contains(error_message([&] { io::read_image(dir.dir.string()); }), "': it is a directory"));
  const std::string pipe = (dir / "pipe.png");
  REQUIRE(::mkfifo(pipe.c_str(), 0600) == 0);
  std::string pipe_message;
  const double took = seconds([&] { pipe_message = error_message([&] { io::read_image(pipe); }); });
  CHECK(contains(pipe_message, "'" + pipe + "': it is not a regular file"));
  CHECK(took < 1.0);
}

TEST_CASE("PNG bit depths, palettes, alpha and interlacing decode exactly") {
  Scratch dir("png-kinds");
  auto read = [&](const std::string& name, const std::string& bytes) {
    write_file((dir / name), bytes);
    return io::read_image((dir / name));
  };
  // 1, 2 and 4-bit grey scale to 0..255 as v * 255 / (2^bits - 1).
  const torch::Tensor one_bit = read("1bit.png", encode_png(8, 1, 1, PNG_COLOR_TYPE_GRAY, false, "\xa5"));
  CHECK(torch::equal(one_bit, torch::tensor({1.f, 0.f, 1.f, 0.f, 0.f, 1.f, 0.f, 1.f}).view({1, 1, 8})));
  const torch::Tensor two_bit = read("2bit.png", encode_png(4, 1, 2, PNG_COLOR_TYPE_GRAY, false, "\x1b"));
  CHECK(torch::equal(two_bit, torch::tensor({0.f, 85.f, 170.f, 255.f}).div(255.0).view({1, 1, 4})));
  const torch::Tensor four_bit = read("4bit.png", encode_png(2, 1, 4, PNG_COLOR_TYPE_GRAY, false, "\x3c"));
  CHECK(torch::equal(four_bit, torch::tensor({51.f, 204.f}).div(255.0).view({1, 1, 2})));

  // A palette becomes RGB; grey + alpha and RGBA lose the alpha.
  const std::string palette("\x10\x20\x30\xf0\xe0\xd0", 6);
  const torch::Tensor indexed = read("palette.png", encode_png(3, 1, 8, PNG_COLOR_TYPE_PALETTE, false, std::string("\x01\x00\x01", 3), palette));
  CHECK(torch::equal(indexed, torch::tensor({240.f, 16.f, 240.f, 224.f, 32.f, 224.f, 208.f, 48.f, 208.f}).div(255.0).view({3, 1, 3})));
  const torch::Tensor grey_alpha = read("ga.png", encode_png(2, 1, 8, PNG_COLOR_TYPE_GRAY_ALPHA, false, "\x40\xff\x80\x00"));
  CHECK(torch::equal(grey_alpha, torch::tensor({64.f, 128.f}).div(255.0).view({1, 1, 2})));
  const torch::Tensor rgba16 =
      read("rgba16.png", encode_png(1, 1, 16, PNG_COLOR_TYPE_RGB_ALPHA, false, std::string("\x12\x34\xab\xcd\xff\xff\x00\x01", 8)));
  CHECK(torch::equal(rgba16, torch::tensor({0x1234 / 65535.f, 0xabcd / 65535.f, 1.f}).view({3, 1, 1})));
  CHECK(io::read_image_info((dir / "rgba16.png")).bit_depth == 16);

  // Adam7 interlacing gives the same pixels as the plain file, 8- and 16-bit.
  std::string grey8, grey16;
  for (int i = 0; i < 7 * 5; ++i) {
    grey8 += static_cast<char>(i * 7);
    grey16 += std::string{static_cast<char>(i * 5), static_cast<char>(i * 3)};
  }
  const torch::Tensor plain = read("plain.png", encode_png(7, 5, 8, PNG_COLOR_TYPE_GRAY, false, grey8));
  CHECK(torch::equal(read("adam7.png", encode_png(7, 5, 8, PNG_COLOR_TYPE_GRAY, true, grey8)), plain));
  CHECK(plain[0][4][6].item<float>() == 34 * 7 / 255.f);
  const torch::Tensor plain16 = read("plain16.png", encode_png(7, 5, 16, PNG_COLOR_TYPE_GRAY, false, grey16));
  CHECK(torch::equal(read("adam7-16.png", encode_png(7, 5, 16, PNG_COLOR_TYPE_GRAY, true, grey16)), plain16));
  CHECK(plain16[0][4][6].item<float>() == (34 * 5 * 256 + 34 * 3) / 65535.f);

  // 8- and 16-bit PNM, grey and colour.
  const torch::Tensor pgm = read("grey.pgm", std::string("P5\n3 1\n255\n\x00\x80\xff", 14));
  CHECK(torch::equal(pgm, torch::tensor({0.f, 128.f, 255.f}).div(255.0).view({1, 1, 3})));
  const torch::Tensor pgm16 = read("grey16.pgm", std::string("P5 2 1 65535\n\x01\x02\xff\xfe", 17));
  CHECK(torch::equal(pgm16, torch::tensor({258 / 65535.f, 65534 / 65535.f}).view({1, 1, 2})));
  const io::ImageInfo info = io::read_image_info((dir / "grey16.pgm"));
  CHECK(info.format == "PNM");
  CHECK(info.width == 2);
  CHECK(info.height == 1);
  CHECK(info.channels == 1);
  CHECK(info.bit_depth == 16);

  // read_image_compact: uint8 levels for 8-bit files, the same floats as read_image otherwise.
  const torch::Tensor rgb = torch::rand({3, 6, 5});
  io::write_image((dir / "rgb.png"), rgb);
  const torch::Tensor compact = io::read_image_compact((dir / "rgb.png"));
  CHECK(compact.dtype() == torch::kByte);
  CHECK(torch::equal(compact.to(torch::kFloat).div(255.0), io::read_image((dir / "rgb.png"))));
  CHECK(torch::equal(io::read_image_compact((dir / "rgba16.png")), rgba16));
}

TEST_CASE("a PNG whose data inflates far beyond its size is bounded by its header") {
  Scratch dir("bomb");
  // 4 x 4 grey pixels declared, 64 MiB of zeros deflated into about 64 KiB.
  const std::string bomb = png_file(4, 4, 8, 0, std::string(size_t{64} << 20, '\0'));
  CHECK(bomb.size() < (size_t{1} << 20));
  const std::string path = (dir / "bomb.png");
  write_file(path, bomb);
  torch::Tensor image;
  double took = 0;
  const double growth = memory_growth_mib([&] { took = seconds([&] { image = io::read_image(path); }); });
  CHECK(torch::equal(image, torch::zeros({1, 4, 4})));  // its 4 rows are read; the rest is never inflated
  CHECK(took < 0.5);
  if (growth < 0) {
    MESSAGE("skipped: peak memory cannot be measured here (needs /proc/self/clear_refs, without AddressSanitizer)");
  } else {
    CHECK(growth < 32.0);
  }
}

TEST_CASE("tiled fusion of 8-bit images keeps a tile's memory and the whole image's result") {
  tdfusion::fusion::LightFusion net;
  torch::manual_seed(5);
  const torch::Tensor ir = torch::randint(0, 256, {1, 768, 768}, torch::kByte);
  const torch::Tensor vi = torch::randint(0, 256, {3, 768, 768}, torch::kByte);
  using tdfusion::fusion::FuseImagesOptions;
  torch::Tensor tiled, whole;
  const double tiled_growth =
      memory_growth_mib([&] { tiled = tdfusion::fusion::fuse_images(net, ir, vi, FuseImagesOptions().tile(128)); });
  const double whole_growth = memory_growth_mib([&] { whole = tdfusion::fusion::fuse_images(net, ir, vi); });
  CHECK(tiled.sizes() == torch::IntArrayRef({3, 768, 768}));
  CHECK((tiled - whole).abs().max().item<double>() < 1e-5);
  // 8-bit sources give exactly what their [0,1] floats give.
  const torch::Tensor from_floats = tdfusion::fusion::fuse_images(net, ir.to(torch::kFloat).div(255.0),
                                                                  vi.to(torch::kFloat).div(255.0), FuseImagesOptions().tile(128));
  CHECK(torch::equal(tiled, from_floats));
  if (tiled_growth < 0) {
    MESSAGE("skipped: peak memory cannot be measured here (needs /proc/self/clear_refs, without AddressSanitizer)");
  } else {
    // The result (3 x 768 x 768 floats, 6.75 MiB), the fused luminance, its stretch and a band of colour
    // work; the untiled network holds 16-channel feature maps of the whole image.
    MESSAGE("peak memory growth: tiled " << tiled_growth << " MiB, whole image " << whole_growth << " MiB");
    CHECK(tiled_growth < 64.0);
    CHECK(tiled_growth < whole_growth / 2);
  }
}

// ---------------------------------------------------------------------------------------------- YOLO labels

TEST_CASE("YOLO label files: bounded sizes and clear messages for any content") {
  Scratch dir("yolo");
  auto labels = [&](const std::string& name, const std::string& text) {
    write_file((dir / name), text);
    return data::read_yolo_labels((dir / name), 3);
  };
  auto message_of = [&](const std::string& name, const std::string& text) {
    write_file((dir / name), text);
    std::string message;
    const double took = seconds([&] { message = error_message([&] { data::read_yolo_labels((dir / name), 3); }); });
    CHECK(took < 2.0);
    return message;
  };

  // A byte-order mark, CRLF, tabs, a final line without newline, exponents and signs.
  const torch::Tensor good = labels("good.txt", "\xef\xbb\xbf" "1e0 5e-1 +0.25 .5\t1.\r\n\r\n2 0.1 0.2 0.3 1E-1");
  CHECK(torch::equal(good, torch::tensor({{1.f, 0.5f, 0.25f, 0.5f, 1.f}, {2.f, 0.1f, 0.2f, 0.3f, 0.1f}})));

  // Four MiB of blank lines is an image without objects, read quickly.
  double took = 0;
  torch::Tensor blank;
  took = seconds([&] { blank = labels("blank.txt", std::string(size_t{4} << 20, '\n')); });
  CHECK(blank.sizes() == torch::IntArrayRef({0, 5}));
  CHECK(took < 2.0);

  const std::string path = (dir / "x.txt");
  struct Bad {
    std::string text;
    std::string fragment;
  };
  const std::vector<Bad> bad = {
      {"0 0.5 0.5 nan 0.1\n", ":1: w 'nan' is not a number"},
      {"0 0.5 0.5 0.1 inf\n", ":1: h 'inf' is not a number"},
      {"\n0 -infinity 0.5 0.1 0.1\n", ":2: cx '-infinity' is not a number"},
      {"0 1e999 0.5 0.1 0.1\n", ":1: cx '1e999' is not a number (or out of range)"},
      {"0 0.5 -1e999 0.1 0.1\n", ":1: cy '-1e999' is not a number"},
      {"0 0x1p-2 0.5 0.1 0.1\n", ":1: cx '0x1p-2' is not a number"},
      {"+-1 0.5 0.5 0.1 0.1\n", ":1: class '+-1' is not a number"},
      {"0 0.5 0.5 0.1 1e\n", ":1: h '1e' is not a number"},
      {"0 0.5 0.5 . 0.1\n", ":1: w '.' is not a number"},
      {"1e1 0.5 0.5 0.1 0.1\n", ":1: class id 1e1 is not an integer in [0, 3)"},
      {"0 0.5 5e-1x 0.1 0.1\n", ":1: cy '5e-1x' is not a number"},
      {std::string("0 0.5\0 0.5 0.1 0.1\n", 19), ":1: cx '0.5\\x00' is not a number"},
      {"0 0.5 0.5 0.1 0.1 \xff\n", ":1: expected 5 values (class cx cy w h), got 6"},
      {"0 0.5 0.5\r0.1\r0.1\r\n", ""},  // carriage returns separate fields: a valid line
  };
  for (const Bad& b : bad) {
    CAPTURE(b.text);
    const std::string message = message_of("x.txt", b.text);
    if (b.fragment.empty()) {
      CHECK(message.empty());
    } else {
      CHECK(contains(message, "tdfusion: " + path + b.fragment));
    }
    CHECK(message.find('\0') == std::string::npos);
  }

  // A megabyte-long token is quoted in part.
  const std::string long_message = message_of("long.txt", "0 0.5 0.5 0.1 " + std::string(1 << 20, '7') + "x\n");
  CHECK(contains(long_message, ":1: h '7777777777777777777777777777777777777777...' is not a number"));
  CHECK(long_message.size() < 300);

  // Too many boxes, and too large a file.
  std::string many;
  for (int i = 0; i < 10001; ++i) many += "0 0.5 0.5 0.1 0.1\n";
  CHECK(contains(message_of("many.txt", many), "tdfusion: " + (dir / "many.txt") + ":10001: more than 10000 boxes in one file"));
  CHECK(contains(message_of("huge.txt", std::string((size_t{4} << 20) + 1, ' ')),
                 "tdfusion: cannot read YOLO label file " + (dir / "huge.txt") + ": the file has 4194305 bytes, more than the 4194304"));

  // Not a regular file: a directory and a named pipe (which must not wait for a writer).
  CHECK(contains(error_message([&] { data::read_yolo_labels(dir.dir.string(), 3); }), "it is a directory"));
  const std::string pipe = (dir / "pipe.txt");
  REQUIRE(::mkfifo(pipe.c_str(), 0600) == 0);
  std::string pipe_message;
  took = seconds([&] { pipe_message = error_message([&] { data::read_yolo_labels(pipe, 3); }); });
  CHECK(contains(pipe_message, "cannot read YOLO label file " + pipe + ": it is not a regular file"));
  CHECK(took < 1.0);
}
