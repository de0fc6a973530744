// Hostile files and output paths: atomic writes that cannot be redirected. Every case makes its small input
// files itself and checks the message, the time taken and that nothing else was written or harmed.
#include <doctest/doctest.h>

#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/io/atomic_file.hpp"
#include "tdfusion/io/checkpoint.hpp"
#include "tdfusion/io/image.hpp"
#include "tdfusion/io/torch_state_dict.hpp"

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

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

/// A fresh directory under the system's temp directory, removed at scope exit.
struct Scratch {
  fs::path path;
  explicit Scratch(const std::string& name) {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("tdfusion-untrusted-" + name + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Scratch() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  std::set<std::string> entries() const {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(path)) names.insert(entry.path().filename().string());
    return names;
  }
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

/// Seconds `action` takes.
double seconds(const std::function<void()>& action) {
  const auto start = std::chrono::steady_clock::now();
  action();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

mode_t mode_of(const std::string& path) {
  struct stat info {};
  REQUIRE(::lstat(path.c_str(), &info) == 0);
  return info.st_mode;
}

}  // namespace

// ------------------------------------------------------------------------------------------ atomic writes

TEST_CASE("atomic writes do not follow links planted under the names of temporaries or the target") {
  Scratch dir("links");
  Scratch elsewhere("foreign");
  const std::string secret = elsewhere.file("secret");
  write_bytes(secret, "root's secret\n");
  REQUIRE(::chmod(secret.c_str(), 0600) == 0);

  // Every name the earlier scheme (<out>.tmp-<pid>-<n>) would have used for the first writes of this
  // process, and the targets themselves, are links to the foreign file.
  const std::vector<std::string> outputs = {"fused.png", "fused16.png", "fused.jpg", "fused.bmp",  "report.json",
                                            "table.csv", "table.md",    "run.ckpt",  "fusion.pth", "linked.png"};
  std::set<std::string> planted;
  for (const std::string& name : outputs) {
    for (int n = 0; n < 64; ++n) {
      const std::string link = name + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(n);
      fs::create_symlink(secret, dir.path / link);
      planted.insert(link);
    }
  }
  fs::create_symlink(secret, dir.path / "linked.png");

  const torch::Tensor image = torch::rand({3, 12, 10});
  tdfusion::fusion::LightFusion net;
  torch::optim::Adam adam(net->parameters(), torch::optim::AdamOptions(1e-3));
  io::CheckpointState state;
  state.modules = {{"fusion", net.ptr()}};
  state.optimizers = {{"adam", &adam}};
  state.counters = {{"epoch", 3}};
  const double took = seconds([&] {
    io::write_image(dir.file("fused.png"), image);
    io::write_image(dir.file("fused16.png"), image, 16);
    io::write_image(dir.file("fused.jpg"), image);
    io::write_image(dir.file("fused.bmp"), image);
    io::write_text_atomically(dir.file("report.json"), "{}\n");
    io::write_text_atomically(dir.file("table.csv"), "a,b\n");
    io::write_text_atomically(dir.file("table.md"), "| a |\n");
    io::save_checkpoint(dir.file("run.ckpt"), state);
    io::write_torch_state_dict(dir.file("fusion.pth"), net->named_parameters());
    io::write_image(dir.file("linked.png"), image);  // replaces the link, not what it points to
  });
  CHECK(took < 10.0);

  CHECK(read_bytes(secret) == "root's secret\n");
  CHECK((mode_of(secret) & 07777) == 0600);
  const mode_t expected = 0666 & ~io::detail::current_umask();
  for (const std::string& name : outputs) {
    CAPTURE(name);
    CHECK(S_ISREG(mode_of(dir.file(name))));
    CHECK((mode_of(dir.file(name)) & 07777) == expected);
  }
  for (const std::string& link : planted) CHECK(fs::read_symlink(dir.path / link) == secret);
  std::set<std::string> expected_entries = planted;
  expected_entries.insert(outputs.begin(), outputs.end());
  CHECK(dir.entries() == expected_entries);  // no temporary left

  // The outputs are what was written.
  CHECK(torch::equal(io::read_image(dir.file("linked.png")), io::read_image(dir.file("fused.png"))));
  CHECK(read_bytes(dir.file("table.csv")) == "a,b\n");
  tdfusion::fusion::LightFusion loaded;
  io::load_torch_state_dict(*loaded, dir.file("fusion.pth"));
  CHECK(torch::equal(loaded->named_parameters()["conv0.weight"], net->named_parameters()["conv0.weight"]));
}

TEST_CASE("atomic writes take the mode a new file gets from the umask, and unpredictable temporaries") {
  Scratch dir("umask");
  const mode_t saved = ::umask(027);
  io::write_text_atomically(dir.file("private.txt"), "x");
  ::umask(077);
  io::write_image(dir.file("private.png"), torch::zeros({1, 2, 2}));
  ::umask(saved);
  CHECK((mode_of(dir.file("private.txt")) & 07777) == 0640);
  CHECK((mode_of(dir.file("private.png")) & 07777) == 0600);
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
  const std::string target = dir.file("result.png");
  io::write_image(target, torch::full({1, 4, 4}, 0.5));
  const std::string before = read_bytes(target);

  const std::string big(3 << 20, 'x');  // more than the sink's buffer: part of it reaches the temporary
  const std::string message = error_message([&] {
    io::write_file_atomically(target, [&](io::FileSink& sink) {
      sink.write(big);
      TORCH_CHECK(false, "the encoder gave up");
    });
  });
  CHECK(contains(message, "failed to write '" + target + "' (previous content, if any, is unchanged): the encoder gave up"));
  CHECK(read_bytes(target) == before);
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
  const std::string full = error_message([&] { io::save_checkpoint(dir.file("run.ckpt"), state); });
  const std::string full_image = error_message([&] { io::write_image(target, torch::rand({3, 64, 64})); });
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, previous_handler);
  CHECK(full == "tdfusion: failed to write '" + dir.file("run.ckpt") +
                    "' (previous content, if any, is unchanged): File too large");
  CHECK(contains(full_image, "(previous content, if any, is unchanged): File too large"));
  CHECK(read_bytes(target) == before);
  CHECK(dir.entries() == std::set<std::string>{"result.png"});

  // Image writes refused before any file is made: NaN values, a missing directory, a directory as the target.
  CHECK(contains(error_message([&] { io::write_image(target, torch::full({1, 4, 4}, NAN)); }), "NaN"));
  CHECK(read_bytes(target) == before);
  CHECK(contains(error_message([&] { io::write_image(dir.file("missing/out.png"), torch::zeros({1, 2, 2})); }),
                 "directory '" + dir.file("missing") + "' is not accessible"));
  CHECK(contains(error_message([&] { io::write_text_atomically(dir.path.string() + "/", "x"); }), "names a directory"));
  CHECK(dir.entries() == std::set<std::string>{"result.png"});
}

TEST_CASE("stale temporaries: only this user's regular files of the recognised names are removed") {
  Scratch dir("stale");
  Scratch elsewhere("stale-foreign");
  const std::string secret = elsewhere.file("secret");
  write_bytes(secret, "keep");
  for (const char* name : {"a.png.tdfusion-tmp-0123456789abcdef", "a.png.tdfusion-tmp-fedcba9876543210",
                           "checkpoint.pt.tmp-4242-7", "b.txt.tdfusion-tmp-00000000000000aa", "a.png", "notes.tmp-x-1",
                           "c.png.tdfusion-tmp-0123", "d.png.tdfusion-tmp-0123456789abcdeg"}) {
    write_bytes(dir.file(name), "partial");
  }
  fs::create_symlink(secret, dir.path / "e.png.tdfusion-tmp-1111111111111111");
  fs::create_directory(dir.path / "f.png.tdfusion-tmp-2222222222222222");
  const bool foreign = ::chown(dir.file("b.txt.tdfusion-tmp-00000000000000aa").c_str(), 65534, 65534) == 0;

  const std::vector<std::string> of_a = io::remove_stale_temporaries_of(dir.file("a.png"));
  CHECK(std::set<std::string>(of_a.begin(), of_a.end()) ==
        std::set<std::string>{dir.file("a.png.tdfusion-tmp-0123456789abcdef"), dir.file("a.png.tdfusion-tmp-fedcba9876543210")});
  const std::vector<std::string> rest = io::remove_stale_temporaries(dir.path.string());
  std::set<std::string> expected_rest = {dir.file("checkpoint.pt.tmp-4242-7")};
  if (!foreign) expected_rest.insert(dir.file("b.txt.tdfusion-tmp-00000000000000aa"));
  CHECK(std::set<std::string>(rest.begin(), rest.end()) == expected_rest);
  std::set<std::string> left = {"a.png", "notes.tmp-x-1", "c.png.tdfusion-tmp-0123", "d.png.tdfusion-tmp-0123456789abcdeg",
                                "e.png.tdfusion-tmp-1111111111111111", "f.png.tdfusion-tmp-2222222222222222"};
  if (foreign) {
    left.insert("b.txt.tdfusion-tmp-00000000000000aa");
  } else {
    MESSAGE("skipped: not root, so no file of another user could be made to check that it is kept");
  }
  CHECK(dir.entries() == left);
  CHECK(read_bytes(secret) == "keep");
  CHECK(contains(error_message([&] { io::remove_stale_temporaries(dir.file("nowhere")); }), dir.file("nowhere")));
}
