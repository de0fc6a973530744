// The `tdfusion` command, run as a user would: outputs on real pairs, exit codes and messages on bad input.
#include <doctest/doctest.h>

#include "support.hpp"

#include "tdfusion/data/synthetic_scenes.hpp"
#include "tdfusion/fusion/light_fusion.hpp"
#include "tdfusion/io/checkpoint.hpp"
#include "tdfusion/io/image.hpp"
#include "tdfusion/lossgen/lpn.hpp"
#include "tdfusion/meta/run_folder.hpp"
#include "tdfusion/task/segmentation.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

namespace {

using namespace tdfusion::test;

namespace fs = std::filesystem;
const std::string kShared = TDFUSION_SHARED_DIR;

struct Run {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

/// Runs the built `tdfusion` program with `arguments` (already quoted for the shell).
Run run_cli(const std::string& arguments) {
  const std::string command = std::string("'") + TDFUSION_CLI + "' " + arguments + " 2>&1";
  Run run;
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buffer{};
  while (fgets(buffer.data(), buffer.size(), pipe) != nullptr) run.output += buffer.data();
  const int status = pclose(pipe);
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return run;
}


std::string quoted(const std::string& path) { return "'" + path + "'"; }

/// A folder `root/ir`, `root/vi` linking the first `count` pairs of a shared data set.
void link_pairs(const std::string& set, const fs::path& root, size_t count) {
  fs::create_directories(root / "ir");
  fs::create_directories(root / "vi");
  std::vector<fs::path> names;
  for (const auto& entry : fs::directory_iterator(fs::path(kShared) / "data" / set / "ir")) names.push_back(entry.path());
  std::sort(names.begin(), names.end());
  for (size_t i = 0; i < std::min(count, names.size()); ++i) {
    fs::create_symlink(names[i], root / "ir" / names[i].filename());
    fs::create_symlink(fs::path(kShared) / "data" / set / "vi" / names[i].filename(), root / "vi" / names[i].filename());
  }
}

}  // namespace

TEST_CASE("tdfusion fuse on the real example pairs writes images of the sources' size and mode") {
  Scratch scratch("real");
  const Run run = run_cli("fuse --ir " + quoted(kExampleData + "/ir") + " --vi " + quoted(kExampleData + "/vi") +
                          " --out " + quoted(scratch / "fused"));
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  int pairs = 0;
  for (const auto& entry : fs::directory_iterator(kExampleData + "/ir")) {
    const std::string stem = entry.path().stem().string();
    const torch::Tensor ir = tdfusion::io::read_image(entry.path().string());
    const torch::Tensor fused = tdfusion::io::read_image(scratch / ("fused/" + stem + ".png"));
    INFO(stem);
    CHECK(fused.size(1) == ir.size(1));
    CHECK(fused.size(2) == ir.size(2));
    CHECK(fused.size(0) == (stem == "tno_05" ? 1 : 3));  // TNO's grey images are RGB files with equal channels
    CHECK(fused.std().item<double>() > 0.02);                   // an image, not a constant
    ++pairs;
  }
  CHECK(pairs == 4);
}

TEST_CASE("tdfusion fuse --model chooses between the two built-in networks, ReFusion by default") {
  Scratch scratch("models");
  const std::string pair =
      " --ir " + quoted(kExampleData + "/ir/tno_05.png") + " --vi " + quoted(kExampleData + "/vi/tno_05.png");
  REQUIRE(run_cli("fuse" + pair + " --out " + quoted(scratch / "default.png")).exit_code == 0);
  REQUIRE(run_cli("fuse" + pair + " --out " + quoted(scratch / "refusion.png") + " --model refusion").exit_code == 0);
  REQUIRE(run_cli("fuse" + pair + " --out " + quoted(scratch / "light.png") + " --model light").exit_code == 0);
  CHECK(file_bytes(scratch / "default.png") == file_bytes(scratch / "refusion.png"));
  const torch::Tensor refusion = tdfusion::io::read_image(scratch / "refusion.png");
  const torch::Tensor light = tdfusion::io::read_image(scratch / "light.png");
  CHECK((refusion - light).abs().max().item<double>() > 0.05);  // two different networks
}

TEST_CASE("tdfusion fuse --timings reports each stage's seconds, one pair or a folder") {
  Scratch scratch("timings");
  const Run one = run_cli("fuse --timings --ir " + quoted(kExampleData + "/ir/tno_05.png") + " --vi " +
                          quoted(kExampleData + "/vi/tno_05.png") + " --out " + quoted(scratch / "one.png"));
  REQUIRE(one.exit_code == 0);
  for (const std::string& stage : std::vector<std::string>{"decoding and checking 1 pair: ", "loading the model: ",
                                                          "fusing tno_05: ", "writing " + (scratch / "one.png") + ": "}) {
    CHECK_MESSAGE(contains(one.output, "tdfusion: " + stage), one.output);
  }
  const Run folder = run_cli("fuse --timings --ir " + quoted(kExampleData + "/ir") + " --vi " +
                             quoted(kExampleData + "/vi") + " --out " + quoted(scratch / "all"));
  REQUIRE(folder.exit_code == 0);
  CHECK(contains(folder.output, "tdfusion: decoding and checking 4 pairs: "));
  CHECK(contains(folder.output, "tdfusion: decoding and fusing msrs_00537D: "));
  CHECK_FALSE(contains(run_cli("fuse --ir " + quoted(kExampleData + "/ir/tno_05.png") + " --vi " +
                               quoted(kExampleData + "/vi/tno_05.png") + " --out " + quoted(scratch / "quiet.png"))
                           .output,
                       "loading the model"));
}

TEST_CASE("tdfusion demo fuses a synthetic pair and the shipped example pairs") {
  Scratch scratch("demo");
  const Run run = run_cli("demo --out " + quoted(scratch / "demo"));
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  for (const char* name : {"synthetic", "msrs_00537D", "msrs_00881N", "roadscene_037", "tno_05"}) {
    for (const char* suffix : {"_ir", "_vi", "_fused"}) CHECK(fs::exists(scratch / ("demo/" + std::string(name) + suffix + ".png")));
  }
}

TEST_CASE("tdfusion fuse --tile gives the whole-image result, with tiles one at a time or in parallel") {
  Scratch scratch("tiled");
  torch::manual_seed(8);
  const std::string ir = scratch / "ir.png", vi = scratch / "vi.png";
  tdfusion::io::write_image(ir, torch::rand({1, 90, 130}));
  tdfusion::io::write_image(vi, torch::rand({3, 90, 130}));
  std::vector<torch::Tensor> fused;
  for (const std::string flags : {"", "--tile 40", "--tile 40 --parallel-tiles"}) {
    const std::string out = scratch / ("fused_" + std::to_string(fused.size()) + ".png");
    const Run run = run_cli("--threads 2 fuse --ir " + quoted(ir) + " --vi " + quoted(vi) + " --out " + quoted(out) + " " + flags);
    INFO(flags << ": " << run.output);
    REQUIRE(run.exit_code == 0);
    fused.push_back(tdfusion::io::read_image(out));
  }
  CHECK(fused[0].std().item<double>() > 0.02);
  for (size_t i = 1; i < fused.size(); ++i) {  // equal up to float rounding, so up to one 8-bit step
    CHECK((fused[i] - fused[0]).abs().max().item<double>() <= 1.0 / 255 + 1e-6);
  }
}

TEST_CASE("tdfusion fuse fails with exit code 1 and names the file for bad data, leaving no output behind") {
  Scratch scratch("bad");
  const torch::Tensor image = torch::rand({1, 24, 32});
  const std::string good = scratch / "good.png", other = scratch / "other.png";
  tdfusion::io::write_image(good, image);
  tdfusion::io::write_image(other, torch::rand({1, 20, 32}));
  std::ofstream(scratch / "text.png") << "this is not an image";
  {
    std::ifstream in(good, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(scratch / "truncated.png", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  }
  auto fuse = [&](const std::string& ir, const std::string& vi, const std::string& out) {
    return run_cli("fuse --ir " + quoted(ir) + " --vi " + quoted(vi) + " --out " + quoted(out));
  };
  struct Case {
    std::string name, ir, vi, fragment, not_named = {};
  };
  const std::vector<Case> cases = {
      {"different sizes", good, other, other},
      {"truncated PNG", good, scratch / "truncated.png", "truncated.png"},
      {"text file named .png", scratch / "text.png", good, "text.png"},
      {"unreadable path", scratch / "absent.png", good, "absent.png"},
      // The two are decoded at once; the infrared image's failure is the one reported, as when decoded in turn.
      {"both bad", scratch / "text.png", scratch / "truncated.png", "text.png", "truncated.png"},
  };
  for (const Case& c : cases) {
    const std::string out = scratch / ("out_" + std::to_string(&c - cases.data()) + ".png");
    const Run run = fuse(c.ir, c.vi, out);
    INFO(c.name << ": " << run.output);
    CHECK(run.exit_code == 1);
    CHECK(run.output.find(c.fragment) != std::string::npos);
    if (!c.not_named.empty()) CHECK(run.output.find(c.not_named) == std::string::npos);
    CHECK(run.output.find("Exception raised from") == std::string::npos);  // a message, not a backtrace
    CHECK_FALSE(fs::exists(out));
  }

  // Folders: a missing partner and an empty folder.
  fs::create_directories(scratch.dir / "pairs/ir");
  fs::create_directories(scratch.dir / "pairs/vi");
  fs::create_directories(scratch.dir / "empty/ir");
  fs::create_directories(scratch.dir / "empty/vi");
  tdfusion::io::write_image(scratch / "pairs/ir/a.png", image);
  tdfusion::io::write_image(scratch / "pairs/vi/a.png", image);
  tdfusion::io::write_image(scratch / "pairs/ir/lonely.png", image);
  Run run = fuse(scratch / "pairs/ir", scratch / "pairs/vi", scratch / "pairs/out");
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("missing partner") != std::string::npos);
  CHECK(run.output.find("lonely") != std::string::npos);
  run = fuse(scratch / "empty/ir", scratch / "empty/vi", scratch / "empty/out");
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("contains no images") != std::string::npos);
}

TEST_CASE("tdfusion usage errors exit with code 2 and a one-line message; --help exits with 0") {
  CHECK(run_cli("").exit_code == 2);
  CHECK(run_cli("fuse --ir a.png").exit_code == 2);
  CHECK(run_cli("frobnicate").exit_code == 2);
  CHECK(run_cli("train --fusion resnet").exit_code == 2);
  Scratch scratch("usage");
  const std::string image = scratch / "a.png";
  tdfusion::io::write_image(image, torch::rand({1, 8, 8}));
  const std::string fuse = "fuse --ir " + quoted(image) + " --vi " + quoted(image) + " --out " + quoted(scratch / "f.png");
  struct Case {
    std::string arguments, fragment;
  };
  std::vector<Case> cases = {
      {"--threads 100000 " + fuse, "--threads"},
      {"--threads 0 " + fuse, "--threads"},
      {"--threads -1 " + fuse, "--threads"},
      {fuse + " --device nonsense", "expected cpu, cuda or cuda:N"},
      {fuse + " --device meta", "expected cpu, cuda or cuda:N"},
      {fuse + " --tile 0", "--tile"},
      {fuse + " --tile 99999999999", "--tile"},
      {fuse + " --model resnet", "--model: resnet not in {refusion,light}"},
      {fuse + " --model light --weights " + quoted(scratch / "w.pth"), "--weights excludes --model"},
      {"train --meta-lr -1", "expected a learning rate in (0, 10]"},
      {"train --meta-lr nan", "expected a learning rate in (0, 10]"},
      {"train --fusion-lr nan", "expected a learning rate in (0, 10]"},
      {"train --fusion-lr 1e308", "expected a learning rate in (0, 10]"},
      {"train --task-size 12by5 --out " + quoted(scratch / "run"), "--task-size: expected HxW"},
      {"train --batch 1000 --out " + quoted(scratch / "run"), "--batch"},
      {"train --scenes 2 --batch 4 --out " + quoted(scratch / "run"), "--batch 4 exceeds the 2 synthetic scenes"},
      {"train --val-every 3 --out " + quoted(scratch / "run"), "--val-every needs --data"},
  };
  if (!torch::cuda::is_available()) cases.push_back({fuse + " --device cuda", "no CUDA device is available"});
  for (const Case& c : cases) {
    const Run run = run_cli(c.arguments);
    INFO(c.arguments << ": " << run.output);
    CHECK(run.exit_code == 2);
    CHECK(run.output.find(c.fragment) != std::string::npos);
    CHECK(run.output.find("179769") == std::string::npos);  // no DBL_MAX written out in full
    CHECK(std::count(run.output.begin(), run.output.end(), '\n') <= 2);
  }
  CHECK_FALSE(fs::exists(scratch / "f.png"));
  CHECK_FALSE(fs::exists(scratch / "run/config.json"));
  for (const char* help : {"--help", "fuse --help", "train --help", "eval --help", "demo --help"}) {
    const Run run = run_cli(help);
    CHECK(run.exit_code == 0);
    CHECK(run.output.find("Usage") != std::string::npos);
  }
}

TEST_CASE("tdfusion fuse refuses outputs that would replace an input, and checks every pair before writing") {
  Scratch scratch("replace");
  fs::create_directories(scratch.dir / "ir");
  fs::create_directories(scratch.dir / "vi");
  for (const char* name : {"a", "b", "c"}) {
    tdfusion::io::write_image(scratch / ("ir/" + std::string(name) + ".png"), torch::rand({1, 16, 16}));
    tdfusion::io::write_image(scratch / ("vi/" + std::string(name) + ".png"), torch::rand({1, 16, 16}));
  }
  const std::string ir = scratch / "ir/a.png", vi = scratch / "vi/a.png", before = file_bytes(ir);
  fs::create_symlink(ir, scratch.dir / "alias.png");
  for (const std::string& out : {ir, vi, scratch / "alias.png", scratch / "ir/../ir/a.png"}) {
    const Run run = run_cli("fuse --ir " + quoted(ir) + " --vi " + quoted(vi) + " --out " + quoted(out));
    INFO(out << ": " << run.output);
    CHECK(run.exit_code == 2);
    CHECK(run.output.find("would replace an input image") != std::string::npos);
  }
  const std::string folders = "fuse --ir " + quoted(scratch / "ir") + " --vi " + quoted(scratch / "vi") + " --out ";
  for (const std::string& out : {scratch / "ir", scratch / "vi/"}) {
    const Run run = run_cli(folders + quoted(out));
    INFO(run.output);
    CHECK(run.exit_code == 2);
    CHECK(run.output.find("is an input folder") != std::string::npos);
  }
  CHECK(file_bytes(ir) == before);
  // A bad pair in the middle of the folder fails before the first output is written.
  std::ofstream(scratch / "vi/b.png", std::ios::trunc) << "not an image";
  const Run run = run_cli(folders + quoted(scratch / "out"));
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("vi/b.png") != std::string::npos);
  CHECK((!fs::exists(scratch.dir / "out") || fs::is_empty(scratch.dir / "out")));
}

TEST_CASE("tdfusion train keeps its run folder consistent: one process, the same options on --resume") {
  Scratch scratch("runfolder");
  const std::string run_dir = scratch / "run";
  const std::string data = " --scenes 4 --scene-size 32 --crop 24 --meta-steps 1 --fusion-lr 1e-3 --task-lr 1e-3 --out " +
                           quoted(run_dir);
  const std::string common = " --fusion light --task small-seg" + data;
  REQUIRE(run_cli("train --epochs 1" + common).exit_code == 0);
  const std::string config = file_bytes(run_dir + "/config.json"), checkpoint = file_bytes(run_dir + "/checkpoint.pt");
  // Another loss, fusion network or task on --resume: refused before anything is written, naming the change.
  const std::vector<std::pair<std::string, std::string>> changes = {
      {" --fusion light --task small-seg --loss fixed", "--loss \"fixed\" (the run was trained with \"lpn\")"},
      {" --fusion refusion --task small-seg", "--fusion \"refusion\" (the run was trained with \"light\")"},
      {" --fusion light --task segformer", "--task \"segformer\" (the run was trained with \"small-seg\")"}};
  for (const auto& [change, message] : changes) {
    const Run run = run_cli("train --epochs 2 --resume" + change + data);
    INFO(change << ": " << run.output);
    CHECK(run.exit_code == 2);
    CHECK(run.output.find(message) != std::string::npos);
  }
  Run run;
  // Training again into a folder that holds a run needs --resume.
  run = run_cli("train --epochs 1" + common);
  CHECK(run.exit_code == 2);
  CHECK(run.output.find("already holds a run") != std::string::npos);
  CHECK(file_bytes(run_dir + "/config.json") == config);
  CHECK(file_bytes(run_dir + "/checkpoint.pt") == checkpoint);
  // Another process holding the run folder (here: this test) makes a second one fail at once.
  {
    const tdfusion::meta::RunFolder held(run_dir);
    run = run_cli("train --epochs 2 --resume" + common);
    CHECK(run.exit_code == 1);
    CHECK(run.output.find("is in use by another tdfusion process") != std::string::npos);
  }
  CHECK(file_bytes(run_dir + "/checkpoint.pt") == checkpoint);
  run = run_cli("train --epochs 2 --resume" + common);
  CHECK(run.exit_code == 0);
  CHECK(run.output.find("resuming") != std::string::npos);
}

TEST_CASE("a run's config.json is read back exactly, and a damaged one is refused naming the file and the key") {
  namespace meta = tdfusion::meta;
  meta::RunConfig config;
  config.fusion = "refusion", config.loss = "lpn", config.task = "small-det", config.classes = 3;
  config.task_size = "240x320", config.crop = 128, config.data = "msrs", config.fusion_data = {"roadscene", "llvip"};
  config.seed = 18446744073709551615ull, config.fusion_lr = 1e-3, config.meta_steps = 10;
  const nlohmann::json json = meta::to_json(config);
  CHECK(meta::config_differences(config, meta::parse_run_config(json.dump(), "RUN/config.json")).empty());
  const auto refusal = [&](const std::string& key, const nlohmann::json& value) {
    nlohmann::json damaged = json;
    damaged[key] = value;
    return error_message([&] { meta::parse_run_config(damaged.dump(), "RUN/config.json"); });
  };
  // Found by fuzzing: a float where an integer belongs was cast, undefined when out of range.
  CHECK(refusal("classes", 4.4e91) == "tdfusion: RUN/config.json: \"classes\" is not a number of the right kind (4.4e+91)");
  CHECK(refusal("seed", -1) == "tdfusion: RUN/config.json: \"seed\" is not a number of the right kind (-1)");
  CHECK(refusal("batch", 9223372036854775808ull) ==
        "tdfusion: RUN/config.json: \"batch\" is not a number of the right kind (9223372036854775808)");
  CHECK(refusal("crop", "128") == "tdfusion: RUN/config.json: \"crop\" is not a number of the right kind (string)");
  CHECK(refusal("fusion", 1) == "tdfusion: RUN/config.json: \"fusion\" has the wrong type (number)");
  CHECK(contains(error_message([] { meta::parse_run_config("{\"fusion\": ", "RUN/config.json"); }),
                 "tdfusion: RUN/config.json is not valid JSON"));
}

TEST_CASE("tdfusion train rejects labels with out-of-range class ids, naming the file") {
  Scratch scratch("labels");
  for (const char* folder : {"ir", "vi", "label"}) fs::create_directories(scratch.dir / folder);
  tdfusion::io::write_image(scratch / "ir/a.png", torch::rand({1, 32, 32}));
  tdfusion::io::write_image(scratch / "vi/a.png", torch::rand({1, 32, 32}));
  tdfusion::io::write_image(scratch / "label/a.png", torch::full({1, 32, 32}, 7.0 / 255.0));  // class 7
  const Run run = run_cli("train --data " + quoted(scratch.dir.string()) + " --classes 3 --fusion light --task small-seg"
                           " --epochs 1 --meta-steps 1 --crop 16 --out " + quoted(scratch / "run"));
  INFO(run.output);
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("label/a.png") != std::string::npos);
  CHECK(run.output.find("7") != std::string::npos);
  CHECK_FALSE(fs::exists(scratch / "run/checkpoint.pt"));
}

TEST_CASE("tdfusion train checks every label file before the first step") {
  Scratch scratch("yolo");
  for (const char* folder : {"ir", "vi", "boxes"}) fs::create_directories(scratch.dir / folder);
  for (int i = 0; i < 8; ++i) {
    const std::string name = "p" + std::to_string(i);
    tdfusion::io::write_image(scratch / ("ir/" + name + ".png"), torch::rand({1, 32, 32}));
    tdfusion::io::write_image(scratch / ("vi/" + name + ".png"), torch::rand({1, 32, 32}));
    std::ofstream(scratch / ("boxes/" + name + ".txt")) << "0 0.5 0.5 0.2 0.2\n" << (i == 7 ? "1 0.5 nope 0.2 0.2\n" : "");
  }
  const Run run = run_cli("train --data " + quoted(scratch.dir.string()) + " --labels " + quoted(scratch / "boxes") +
                          " --classes 2 --task small-det --fusion light --epochs 1 --meta-steps 1 --crop 16 --out " +
                          quoted(scratch / "run"));
  INFO(run.output);
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("boxes/p7.txt") != std::string::npos);
  CHECK(run.output.find("p7.txt:2") != std::string::npos);  // file and line
  CHECK_FALSE(fs::exists(scratch / "run/log.jsonl"));  // no step was taken
  CHECK_FALSE(fs::exists(scratch / "run/config.json"));
}

TEST_CASE("tdfusion train on synthetic scenes writes a checkpoint, a JSON-lines log and weights; --resume continues") {
  Scratch scratch("train");
  const std::string common = " --fusion light --task small-seg --scenes 4 --scene-size 32 --crop 24 --meta-steps 1"
                             " --fusion-lr 1e-3 --task-lr 1e-3 --out " + quoted(scratch / "run");
  Run run = run_cli("train --epochs 1" + common);
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  for (const char* file : {"run/checkpoint.pt", "run/log.jsonl", "run/fusion.pth"}) CHECK(fs::exists(scratch / file));
  run = run_cli("train --epochs 2 --resume" + common);
  REQUIRE(run.exit_code == 0);
  CHECK(run.output.find("resuming") != std::string::npos);
  CHECK(run.output.find("epoch 2/2") != std::string::npos);
  CHECK(run.output.find("epoch 1/2") == std::string::npos);  // the first epoch is not run again
  std::ifstream log(scratch / "run/log.jsonl");
  int epochs = 0;
  for (std::string line; std::getline(log, line);) epochs += line.find("\"kind\":\"epoch\"") != std::string::npos;
  CHECK(epochs == 2);
  // The written weights are a valid model for `fuse`.
  tdfusion::io::write_image(scratch / "ir.png", torch::rand({1, 16, 16}));
  tdfusion::io::write_image(scratch / "vi.png", torch::rand({1, 16, 16}));
  run = run_cli("fuse --ir " + quoted(scratch / "ir.png") + " --vi " + quoted(scratch / "vi.png") + " --out " +
                 quoted(scratch / "fused.png") + " --weights " + quoted(scratch / "run/fusion.pth"));
  CHECK(run.exit_code == 0);
  CHECK(fs::exists(scratch / "fused.png"));
}

TEST_CASE("tdfusion train --val-every validates on held-out MSRS pairs; eval --task-run adds the detector's AP") {
  if (!fs::is_directory(fs::path(kShared) / "data" / "msrs")) {
    MESSAGE("skipped: " << kShared << "/data/msrs is absent");
    return;
  }
  Scratch scratch("validate");
  link_pairs("msrs", scratch.dir / "data", 8);
  const fs::path shared_labels = fs::path(kShared) / "data" / "msrs" / "det_labels" / "fusion";
  fs::create_directories(scratch.dir / "labels");
  for (const auto& entry : fs::directory_iterator(scratch.dir / "data" / "ir")) {
    const std::string name = entry.path().stem().string() + ".txt";
    fs::create_symlink(shared_labels / name, scratch.dir / "labels" / name);
  }
  Run run = run_cli("train --data " + quoted(scratch / "data") + " --labels " + quoted(scratch / "labels") +
                    " --classes 3 --task small-det --fusion light --loss fixed --task-size 48x64 --crop 32"
                    " --epochs 1 --val-every 4 --out " + quoted(scratch / "run"));
  INFO(run.output);
  REQUIRE(run.exit_code == 0);
  CHECK(run.output.find("validating on 2 (every 4-th pair") != std::string::npos);
  CHECK(run.output.find("validation (2 images): task loss") != std::string::npos);
  std::ifstream log(scratch / "run/log.jsonl");
  int validations = 0;
  for (std::string line; std::getline(log, line);) {
    if (line.find("\"kind\":\"validation\"") == std::string::npos) continue;
    ++validations;
    CHECK(line.find("\"AP50:95\"") != std::string::npos);
    CHECK(line.find("\"Qabf\"") != std::string::npos);
  }
  CHECK(validations == 1);
  CHECK(fs::exists(scratch / "run/config.json"));

  const std::string sources = " --ir " + quoted(scratch / "data/ir") + " --vi " + quoted(scratch / "data/vi");
  REQUIRE(run_cli("fuse" + sources + " --out " + quoted(scratch / "fused") + " --weights " +
                  quoted(scratch / "run/fusion.pth")).exit_code == 0);
  const std::string eval = "eval" + sources + " --fused " + quoted(scratch / "fused") + " --task-run " +
                           quoted(scratch / "run") + " --labels ";
  run = run_cli(eval + quoted(scratch / "labels"));
  CHECK(run.exit_code == 0);
  CHECK(run.output.find("task metrics over the 8 images (small-det trained in") != std::string::npos);
  CHECK(run.output.find("AP50:95") != std::string::npos);

  fs::remove(scratch.dir / "labels" / "00004N.txt");
  run = run_cli(eval + quoted(scratch / "labels"));
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("no label for fused image") != std::string::npos);
  CHECK(run.output.find("00004N.png") != std::string::npos);
  run = run_cli("eval" + sources + " --fused " + quoted(scratch / "fused") + " --task-run " + quoted(scratch / "data") +
                " --labels " + quoted(scratch / "labels"));
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("config.json") != std::string::npos);
}

TEST_CASE("tdfusion train --nproc 2 (Gloo on loopback) gives the parameters of one process on the combined batch") {
  Scratch scratch("ddp");
  const std::string common = "train --fusion light --task small-seg --scenes 4 --scene-size 32 --crop 24 --meta-steps 2"
                             " --epochs 2 --fusion-lr 1e-3 --task-lr 1e-3 --out ";
  Run single = run_cli(common + quoted(scratch / "one") + " --batch 2");
  INFO(single.output);
  REQUIRE(single.exit_code == 0);
  Run parallel = run_cli(common + quoted(scratch / "two") + " --batch 2 --nproc 2");
  INFO(parallel.output);
  REQUIRE(parallel.exit_code == 0);
  CHECK(parallel.output.find("process 0 of 2 joined 127.0.0.1:") != std::string::npos);

  // All three networks of both runs' checkpoints, parameter by parameter.
  namespace td = tdfusion;
  auto networks = [] {
    torch::manual_seed(0);
    return std::make_tuple(td::fusion::LightFusion(), td::lossgen::Lpn(),
                           td::task::SmallSegNet(td::task::SmallSegNetOptions().num_classes(td::data::kSceneClasses)));
  };
  auto load = [](const std::string& path, auto& nets) {
    td::io::CheckpointState state;
    state.modules = {{"fusion", std::get<0>(nets).ptr()}, {"loss_generator", std::get<1>(nets).ptr()},
                     {"task", std::get<2>(nets).ptr()}};
    td::io::load_checkpoint(path, state);
  };
  auto a = networks(), b = networks();
  load(scratch / "one/checkpoint.pt", a);
  load(scratch / "two/checkpoint.pt", b);
  double worst = 0.0, moved = 0.0;
  auto compare = [&](const torch::nn::Module& x, const torch::nn::Module& y, const torch::nn::Module& initial) {
    const auto px = x.parameters(), py = y.parameters(), p0 = initial.parameters();
    REQUIRE(px.size() == py.size());
    for (size_t i = 0; i < px.size(); ++i) {
      worst = std::max(worst, (px[i] - py[i]).abs().max().item<double>());
      moved = std::max(moved, (px[i] - p0[i]).abs().max().item<double>());
    }
  };
  auto initial = networks();
  compare(*std::get<0>(a), *std::get<0>(b), *std::get<0>(initial));
  compare(*std::get<1>(a), *std::get<1>(b), *std::get<1>(initial));
  compare(*std::get<2>(a), *std::get<2>(b), *std::get<2>(initial));
  MESSAGE("largest parameter change in training " << moved << ", largest difference between the runs " << worst);
  CHECK(moved > 1e-3);  // the runs trained
  CHECK(worst < 1e-5);

  const Run uneven = run_cli(common + quoted(scratch / "three") + " --nproc 2 --batch 3");
  CHECK(uneven.exit_code == 2);
  CHECK(uneven.output.find("--batch 3 is not a multiple of the 2 processes") != std::string::npos);

  // On CUDA each process needs a GPU of its own.
  const Run one_gpu = run_cli(common + quoted(scratch / "four") + " --batch 2 --nproc 2 --device cuda:1");
  CHECK(one_gpu.exit_code == 2);
  if (!torch::cuda::is_available()) {
    CHECK(one_gpu.output.find("no CUDA device is available") != std::string::npos);
  } else {
    CHECK(one_gpu.output.find("2 processes take the device cuda, not cuda:1") != std::string::npos);
  }
  if (torch::cuda::is_available() && torch::cuda::device_count() < 2) {
    const Run too_few = run_cli(common + quoted(scratch / "five") + " --batch 2 --nproc 2 --device cuda");
    CHECK(too_few.exit_code == 2);
    CHECK(too_few.output.find("2 processes on cuda need 2 GPUs (NCCL runs one process per GPU), but this "
                              "machine has " + std::to_string(torch::cuda::device_count())) != std::string::npos);
  }
}
