// The `tdfusion` command: fuse, train, demo (git-style subcommands).
//
//   tdfusion fuse --ir ir.png --vi vi.png --out fused.png        one pair (any size; --tile N for huge images)
//   tdfusion fuse --ir DIR/ir --vi DIR/vi --out OUT/              whole folders, matched by file stem
//   tdfusion train --data DIR --out RUN/ [--task ...] [--resume]  bilevel training with checkpoints
//   tdfusion eval --ir DIR --vi DIR --fused DIR [--fused ...] [--protocol cddfuse|tdfusion] [--json F] [--csv F]
//                 [--markdown F] [--chart F.png]                 fusion metrics, one table per method
//   tdfusion demo [--out DIR]                                     fuses built-in and (if present) shared pairs
//
// Exit codes: 0 success, 2 usage error, 1 data or runtime error (the message names the file).
#include <tdfusion/distributed/process_group.hpp>
#include <tdfusion/tdfusion.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

// The built-in default model: examples/models/default_fusion.pth, embedded at build time by
// cmake/embed_file.cmake (size 0 when the file was absent at build time).
extern const unsigned char tdfusion_default_model[];
extern const std::size_t tdfusion_default_model_size;

namespace {

namespace fs = std::filesystem;
using namespace tdfusion;

// ---------------------------------------------------------------------------------------------- weights

/// A fusion network chosen at run time from the weights it is given.
struct LoadedFusion {
  fusion::ReFusion refusion{nullptr};
  fusion::LightFusion light{nullptr};

  template <class Fn>
  auto visit(Fn&& fn) {
    return refusion ? fn(refusion) : fn(light);
  }
};

/// Loads the default model (`file` empty) or a state_dict file; the architecture follows from the keys.
LoadedFusion load_fusion(const std::string& file, const torch::Device& device) {
  ParamDict state;
  std::string name = file;
  if (file.empty()) {
    name = "the built-in model";
    TORCH_CHECK(tdfusion_default_model_size > 0, "tdfusion: this build has no built-in model "
                "(examples/models/default_fusion.pth was absent); pass --weights FILE");
    std::istringstream bytes(std::string(reinterpret_cast<const char*>(tdfusion_default_model), tdfusion_default_model_size));
    state = io::read_torch_state_dict(bytes, name);
  } else {
    state = io::read_torch_state_dict(file);
  }
  LoadedFusion net;
  if (state.contains("FM.temperature1")) {
    net.refusion = fusion::ReFusion();
    io::load_state_dict(*net.refusion, state, name);
  } else {
    TORCH_CHECK(state.contains("conv0.weight"), "tdfusion: ", name,
                " holds neither a ReFusion nor a LightFusion state_dict (no FM.temperature1 or conv0.weight)");
    const int64_t width = state["conv0.weight"].size(0);
    int64_t depth = 0;
    while (state.contains("conv" + std::to_string(depth + 1) + ".weight")) ++depth;
    net.light = fusion::LightFusion(fusion::LightFusionOptions().width(width).depth(depth));
    io::load_state_dict(*net.light, state, name);
  }
  net.visit([&](auto& n) { n->to(device); return 0; });
  return net;
}

// ---------------------------------------------------------------------------------------------- fuse

struct FuseArgs {
  std::string ir, vi, out, weights, device = "cpu";
  int64_t tile = 0;
  bool parallel_tiles = false;
  bool raw = false;
};

int run_fuse(const FuseArgs& args) {
  LoadedFusion net = load_fusion(args.weights, torch::Device(args.device));
  const auto options = fusion::FuseImagesOptions()
                           .tile(args.tile)
                           .parallel_tiles(args.parallel_tiles)
                           .min_max(!args.raw)
                           .device(torch::Device(args.device));
  std::vector<std::pair<data::PairPaths, std::string>> jobs;  // pair -> output file
  if (fs::is_directory(args.ir) || fs::is_directory(args.vi)) {
    TORCH_CHECK(fs::is_directory(args.ir) && fs::is_directory(args.vi), "tdfusion: --ir and --vi must both be folders "
                "or both be files (got '", args.ir, "' and '", args.vi, "')");
    fs::create_directories(args.out);
    for (const auto& pair : data::match_pairs(args.ir, args.vi, "fuse"))
      jobs.emplace_back(pair, (fs::path(args.out) / (pair.stem + ".png")).string());
  } else {
    jobs.push_back({data::PairPaths{fs::path(args.ir).stem().string(), args.ir, args.vi, ""}, args.out});
  }
  for (size_t i = 0; i < jobs.size(); ++i) {
    const auto& [pair, out] = jobs[i];
    const torch::Tensor ir = io::read_image_compact(pair.ir), vi = io::read_image_compact(pair.vi);
    TORCH_CHECK(ir.size(1) == vi.size(1) && ir.size(2) == vi.size(2), "tdfusion: '", pair.ir, "' is ", ir.size(1), " x ",
                ir.size(2), " (H x W) but its partner '", pair.vi, "' is ", vi.size(1), " x ", vi.size(2));
    const torch::Tensor fused = net.visit([&](auto& n) { return fusion::fuse_images(n, ir, vi, options); });
    io::write_image(out, fused);
    std::cout << "[" << i + 1 << "/" << jobs.size() << "] " << out << " (" << fused.size(2) << "x" << fused.size(1)
              << (fused.size(0) == 3 ? ", colour" : ", grey") << ")\n";
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------- train

struct TrainArgs {
  std::vector<std::string> fusion_data;  // extra pair folders without labels for F's phase-B steps
  std::string data, labels, out = "tdfusion-run", fusion = "refusion", loss = "lpn", task = "small-seg",
              device = "cpu", task_size;
  int64_t epochs = 10, lr_step = 10, meta_steps = 20, classes = 9, crop = 128, scenes = 32, scene_size = 128, val_every = 0,
          batch = 1;
  double fusion_lr = 1e-4, task_lr = 1e-4, meta_lr = 0.0;
  uint64_t seed = 0;
  bool resume = false;
  // Data-parallel processes: --nproc N on one machine, or --world-size/--rank/--master-* on each of several.
  int64_t nproc = 1, world_size = 1, rank = 0;
  std::string master_addr = "127.0.0.1";
  uint16_t master_port = 29500;
};

/// One line on stderr, rewritten in place: epoch, phase, step, losses, elapsed time.
class ProgressBar {
 public:
  ProgressBar(int64_t epochs, int64_t meta_steps, int64_t train_steps, int64_t fusion_steps)
      : epochs_(epochs), meta_steps_(meta_steps), train_steps_(train_steps), fusion_steps_(fusion_steps),
        start_(Clock::now()),
        terminal_(isatty(STDERR_FILENO) != 0) {}
  void operator()(const meta::MetaStepReport& r) const {
    draw(r.epoch, "meta", r.step + 1, meta_steps_, r.fusion_loss, r.task_loss);
  }
  void operator()(const meta::TrainStepReport& r) const {
    draw(r.epoch, "train", r.step + 1, train_steps_, r.fusion_loss, r.task_loss);
  }
  void operator()(const meta::FusionStepReport& r) const {
    draw(r.epoch, "fuse", r.step + 1, fusion_steps_, r.fusion_loss, std::nan(""));
  }
  void operator()(const meta::EpochReport& r) const {
    if (terminal_) std::cerr << "\r\033[K";
    std::cout << "epoch " << r.epoch + 1 << "/" << epochs_ << ": fusion loss " << r.fusion_loss << ", task loss "
              << r.task_loss << ", lr " << r.learning_rate << std::endl;
  }
  void operator()(const meta::ValidationReport& r) const { std::cout << "  " << meta::format_validation(r) << std::endl; }

 private:
  using Clock = std::chrono::steady_clock;
  void draw(int64_t epoch, const char* phase, int64_t step, int64_t steps, double fusion, double task) const {
    if (!terminal_) return;  // logs get the per-epoch lines only
    const int width = 20;
    const int filled = static_cast<int>(width * step / std::max<int64_t>(steps, 1));
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    std::cerr << "\r\033[Kepoch " << epoch + 1 << "/" << epochs_ << " " << std::setw(5) << phase << " ["
              << std::string(filled, '#') << std::string(width - filled, '.') << "] " << step << "/" << steps
              << "  fusion " << std::setprecision(4) << fusion << "  task " << task << "  " << std::fixed
              << std::setprecision(0) << seconds << " s" << std::defaultfloat << std::setprecision(6) << std::flush;
  }
  int64_t epochs_, meta_steps_, train_steps_, fusion_steps_;
  Clock::time_point start_;
  bool terminal_;
};

/// Appends every report to a JSON-lines file (one object per line, flushed, so a crash loses nothing).
class JsonLinesLog {
 public:
  explicit JsonLinesLog(const std::string& path) : out_(std::make_shared<std::ofstream>(path, std::ios::app)) {
    TORCH_CHECK(out_->good(), "tdfusion: cannot open log file ", path, ": ", std::strerror(errno));
  }
  void operator()(const meta::MetaStepReport& r) const {
    write({{"kind", "meta"}, {"epoch", r.epoch}, {"step", r.step}, {"fusion_loss", r.fusion_loss},
           {"task_loss", r.task_loss}, {"hypergradient_max", r.hypergradient_max}});
  }
  void operator()(const meta::TrainStepReport& r) const {
    write({{"kind", "train"}, {"epoch", r.epoch}, {"step", r.step}, {"fusion_loss", r.fusion_loss},
           {"task_loss", r.task_loss}});
  }
  void operator()(const meta::FusionStepReport& r) const {
    write({{"kind", "fusion"}, {"epoch", r.epoch}, {"step", r.step}, {"fusion_loss", r.fusion_loss}});
  }
  void operator()(const meta::EpochReport& r) const {
    write({{"kind", "epoch"}, {"epoch", r.epoch}, {"fusion_loss", r.fusion_loss}, {"task_loss", r.task_loss},
           {"learning_rate", r.learning_rate}});
  }
  void operator()(const meta::ValidationReport& r) const {
    write({{"kind", "validation"}, {"epoch", r.epoch}, {"samples", r.samples}, {"task_loss", r.task_loss},
           {"task_metrics", metrics::to_json(r.task.summary)}, {"task_metrics_per_class", metrics::to_json(r.task.per_class)},
           {"protocol", metrics::protocol_name(r.protocol)}, {"fusion_metrics", metrics::to_json(r.fusion)}});
  }

 private:
  void write(const nlohmann::json& record) const { *out_ << record.dump() << std::endl; }
  std::shared_ptr<std::ofstream> out_;
};

std::pair<int64_t, int64_t> parse_size(const std::string& text) {
  int64_t h = 0, w = 0;
  char x = 0;
  std::istringstream in(text);
  if (!(in >> h >> x >> w) || x != 'x' || h <= 0 || w <= 0 || !in.eof())
    throw CLI::ValidationError("--task-size", "expected HxW with positive sides, e.g. 240x320, got '" + text + "'");
  return {h, w};
}

/// Writes `text` to `path` atomically.
void write_text(const std::string& path, const std::string& text) { io::write_text_atomically(path, text); }

/// RUN/config.json: what `tdfusion eval --task-run RUN` needs to rebuild the task network.
void write_run_config(const TrainArgs& args) {
  const nlohmann::json config = {{"fusion", args.fusion}, {"loss", args.loss},      {"task", args.task},
                                 {"classes", args.classes}, {"task_size", args.task_size}, {"crop", args.crop},
                                 {"data", args.data},     {"labels", args.labels},  {"val_every", args.val_every},
                                 {"seed", args.seed},     {"fusion_data", args.fusion_data}};
  write_text((fs::path(args.out) / "config.json").string(), config.dump(2) + "\n");
}

template <class Fusion, class LossGenerator, class Task, class Dataset>
int train(const TrainArgs& args, const Dataset& dataset, const std::optional<Dataset>& validation) {
  const bool lead = args.rank == 0;  // only rank 0 writes files and reports
  if (lead) {
    fs::create_directories(args.out);
    write_run_config(args);
  }
  const std::string checkpoint = (fs::path(args.out) / "checkpoint.pt").string();
  const torch::Device device(args.device);
  const c10::DeviceGuard on_device(device);  // a process's own GPU is its current one (NCCL, allocations)
  auto options = meta::BilevelOptions()
                     .epochs(args.epochs).meta_steps_per_epoch(args.meta_steps).batch_pairs(args.batch)
                     .fusion_lr(args.fusion_lr).task_lr(args.task_lr).meta_lr(args.meta_lr).lr_step_epochs(args.lr_step)
                     .seed(args.seed).device(device).checkpoint_path(checkpoint);
  torch::manual_seed(args.seed);
  meta::BilevelOptimizer<Fusion, LossGenerator, Task> trainer(Fusion(), LossGenerator(), Task(typename Task::ContainedType::Options().num_classes(args.classes)), options);
  if (args.resume) {
    trainer.load(checkpoint);
    std::cout << "resuming " << checkpoint << " at epoch " << trainer.epoch() + 1 << '\n';
  }
  if (args.world_size > 1) {
    distributed::Rendezvous rendezvous;
    rendezvous.host = args.master_addr;
    rendezvous.port = args.master_port;
    rendezvous.rank = static_cast<int>(args.rank);
    rendezvous.world_size = static_cast<int>(args.world_size);
    rendezvous.device = device;
    trainer.set_communicator(distributed::ProcessGroupCommunicator::connect(rendezvous));
    std::cout << "process " << args.rank << " of " << args.world_size << " joined " << args.master_addr << ":"
              << args.master_port << '\n';
  }
  if (validation) trainer.set_validation(*validation);
  int64_t fusion_steps = 0;
  if (!args.fusion_data.empty()) {
    std::vector<data::PairedFolder> folders;
    for (const std::string& root : args.fusion_data)
      folders.emplace_back(root, data::PairedFolderOptions().crop_size(args.crop).seed(args.seed).ignore_labels(true));
    const data::ConcatDataset<data::PairedFolder> fusion_data(folders);
    fusion_steps = (static_cast<int64_t>(fusion_data.size()) + args.batch - 1) / args.batch;
    if (lead) std::cout << "phase B also fuses " << fusion_data.size() << " pairs without labels\n";
    trainer.set_fusion_data(fusion_data);
  }
  if (!lead) {
    trainer.fit(dataset);
    return 0;
  }
  const bool learns_loss = !trainer.loss_generator()->parameters().empty();
  const int64_t steps = (static_cast<int64_t>(dataset.size()) + args.batch - 1) / args.batch;
  trainer.fit(dataset, ProgressBar(args.epochs, learns_loss ? args.meta_steps : 0, steps, fusion_steps),
              JsonLinesLog((fs::path(args.out) / "log.jsonl").string()));
  const std::string weights = (fs::path(args.out) / "fusion.pth").string();
  io::write_torch_state_dict(weights, io::released_layout(*trainer.fusion()));
  std::cout << "fusion weights: " << weights << " (use with: tdfusion fuse --weights " << weights << ")\n";
  return 0;
}

template <class Task, class Dataset>
int pick_policies(const TrainArgs& args, const Dataset& dataset, const std::optional<Dataset>& validation) {
  const bool light = args.fusion == "light", fixed = args.loss == "fixed";
  if (light && fixed) return train<fusion::LightFusion, lossgen::FixedWeights, Task>(args, dataset, validation);
  if (light) return train<fusion::LightFusion, lossgen::Lpn, Task>(args, dataset, validation);
  if (fixed) return train<fusion::ReFusion, lossgen::FixedWeights, Task>(args, dataset, validation);
  return train<fusion::ReFusion, lossgen::Lpn, Task>(args, dataset, validation);
}

/// Builds the data set for the task's label type (folder or synthetic scenes) and trains.
template <class Target>
int train_on(TrainArgs args) {
  std::pair<int64_t, int64_t> task_size{0, 0};
  if (!args.task_size.empty()) task_size = parse_size(args.task_size);
  auto dispatch = [&args](const auto& dataset, const auto& validation) {
    if constexpr (data::kIsDetection<Target>) {
      if (args.task == "yolov8") return pick_policies<task::Yolov8Detector>(args, dataset, validation);
      return pick_policies<task::SmallDetector>(args, dataset, validation);
    } else {
      if (args.task == "segformer") return pick_policies<task::SegFormer>(args, dataset, validation);
      return pick_policies<task::SmallSegNet>(args, dataset, validation);
    }
  };
  if (args.data.empty()) {
    if (args.val_every > 0) throw CLI::ValidationError("--val-every", "needs --data (a folder to split)");
    args.classes = data::kIsDetection<Target> ? data::kSceneDetectionClasses : data::kSceneClasses;
    const int64_t s = args.scene_size;
    auto options = data::SyntheticScenesOptions().count(args.scenes).scene_height(s).scene_width(s)
                       .task_height(task_size.first > 0 ? task_size.first : s)
                       .task_width(task_size.second > 0 ? task_size.second : s)
                       .crop_size(args.crop).seed(args.seed);
    std::cout << "training on " << args.scenes << " synthetic scenes of " << s << "x" << s << '\n';
    return dispatch(data::SyntheticScenesFor<Target>(options), std::optional<data::SyntheticScenesFor<Target>>());
  }
  auto options = data::PairedFolderOptions().crop_size(args.crop).num_classes(args.classes).seed(args.seed)
                     .label_dir(args.labels).require_labels(true)
                     .task_height(task_size.first).task_width(task_size.second);
  const data::PairedFolderFor<Target> folder(args.data, options);
  if (args.val_every == 0) {
    std::cout << "training on " << folder.size() << " pairs in " << args.data << '\n';
    return dispatch(folder, std::optional<data::PairedFolderFor<Target>>());
  }
  const data::HoldoutSplit split = data::every_nth_holdout(folder.size(), static_cast<size_t>(args.val_every));
  std::cout << "training on " << split.train.size() << " pairs in " << args.data << ", validating on "
            << split.held_out.size() << " (every " << args.val_every << "-th pair in sorted order, from "
            << folder.pairs()[split.held_out.front()].stem << ")\n";
  const data::PairedFolderFor<Target> held_out(args.data, options.flip(false));
  return dispatch(folder.subset(split.train), std::make_optional(held_out.subset(split.held_out)));
}

int run_train(const TrainArgs& args, const std::vector<std::string>& command_line);

/// A TCP port on the loopback interface that was free a moment ago.
uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  TORCH_CHECK(fd >= 0, "tdfusion: cannot open a socket: ", std::strerror(errno));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  ::close(fd);
  TORCH_CHECK(ok, "tdfusion: cannot find a free port on 127.0.0.1: ", std::strerror(errno));
  return ntohs(address.sin_port);
}

/// The device of process `rank` of `nproc` on this machine. NCCL runs one process per GPU, so `cuda` becomes
/// `cuda:<rank>`, and the machine must have a GPU for each process.
std::string process_device(const std::string& device, int64_t rank, int64_t nproc) {
  const torch::Device requested(device);
  if (!requested.is_cuda()) return device;
  TORCH_CHECK(!requested.has_index(), "tdfusion: --nproc ", nproc, " takes --device cuda, not ", device,
              ": each process gets a GPU of its own (process r uses cuda:r)");
  const int64_t gpus = static_cast<int64_t>(torch::cuda::device_count());
  TORCH_CHECK(nproc <= gpus, "tdfusion: --nproc ", nproc, " with --device cuda needs ", nproc,
              " GPUs (NCCL runs one process per GPU), but this machine has ", gpus);
  return "cuda:" + std::to_string(rank);
}

/// `tdfusion train --nproc N`: this process becomes rank 0 of N on 127.0.0.1 and starts ranks 1 .. N-1 as
/// copies of itself (their standard output discarded); a failure of any process fails the run.
int launch(TrainArgs args, const std::vector<std::string>& command_line) {
  args.world_size = args.nproc;
  args.rank = 0;
  args.master_addr = "127.0.0.1";
  args.master_port = free_port();
  const std::string device = args.device;
  args.device = process_device(device, 0, args.nproc);
  std::vector<pid_t> children;
  auto stop_children = [&children] {
    for (const pid_t child : children) ::kill(child, SIGTERM);
    for (const pid_t child : children) ::waitpid(child, nullptr, 0);
  };
  for (int64_t rank = 1; rank < args.nproc; ++rank) {
    std::vector<std::string> words;
    for (size_t i = 0; i < command_line.size(); ++i) {
      const std::string& word = command_line[i];
      if (word == "--nproc" || word == "--device") {
        ++i;  // and its value
      } else if (word.rfind("--nproc=", 0) != 0 && word.rfind("--device=", 0) != 0) {
        words.push_back(word);
      }
    }
    for (const std::string& word : {std::string("--world-size"), std::to_string(args.nproc), std::string("--rank"),
                                    std::to_string(rank), std::string("--master-port"),
                                    std::to_string(args.master_port), std::string("--device"),
                                    process_device(device, rank, args.nproc)}) {
      words.push_back(word);
    }
    std::vector<char*> argv;
    for (auto& word : words) argv.push_back(word.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    pid_t child = 0;
    const int error = posix_spawn(&child, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (error != 0) {
      stop_children();
      TORCH_CHECK(false, "tdfusion: cannot start training process ", rank, ": ", std::strerror(error));
    }
    children.push_back(child);
  }
  int result = 1;
  try {
    result = run_train(args, command_line);
  } catch (...) {
    stop_children();
    throw;
  }
  for (const pid_t child : children) {
    int status = 0;
    ::waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) result = 1;
  }
  TORCH_CHECK(result == 0, "tdfusion: a training process failed (see its message above)");
  return result;
}

int run_train(const TrainArgs& args, const std::vector<std::string>& command_line) {
  if (args.nproc > 1 && args.world_size == 1) return launch(args, command_line);
  const bool detection = args.task == "yolov8" || args.task == "small-det";
  return detection ? train_on<task::DetectionTarget>(args) : train_on<torch::Tensor>(args);
}

// ---------------------------------------------------------------------------------------------- eval

struct EvalArgs {
  std::string ir, vi, protocol = "tdfusion", json, csv, markdown, chart, dataset, task_run, labels;
  std::vector<std::string> fused;  // DIR or LABEL=DIR
};

/// Adds the task metrics of the task network trained in `run` (its config.json and checkpoint.pt) to every table.
template <class Task>
void add_task_metrics(std::vector<metrics::EvaluationTable>& tables, const std::string& run, const nlohmann::json& config,
                      const std::string& labels) {
  Task task(typename Task::ContainedType::Options().num_classes(config.at("classes").get<int64_t>()));
  io::CheckpointState state;
  state.modules = {{"task", task.ptr()}};
  io::load_checkpoint((fs::path(run) / "checkpoint.pt").string(), state);
  const std::string size = config.at("task_size").get<std::string>();
  const auto [height, width] = size.empty() ? std::pair<int64_t, int64_t>{0, 0} : parse_size(size);
  for (auto& table : tables) {
    const metrics::TaskMetrics result = metrics::evaluate_task(task, table, labels, height, width);
    table.task = result.summary;
    table.task_per_class = result.per_class;
    table.task_description = config.at("task").get<std::string>() + " trained in " + run + " (input " +
                             (size.empty() ? std::string("each image's size") : size) + "), labels " + labels;
  }
}

/// The task metrics of `tdfusion eval --task-run RUN --labels DIR`.
void add_task_metrics(std::vector<metrics::EvaluationTable>& tables, const std::string& run, const std::string& labels) {
  const std::string config_path = (fs::path(run) / "config.json").string();
  std::ifstream in(config_path);
  TORCH_CHECK(in.good(), "tdfusion: cannot read ", config_path, " (--task-run expects a `tdfusion train` output folder)");
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(in);
    const std::string task = config.at("task").get<std::string>();
    if (task == "small-det") return add_task_metrics<task::SmallDetector>(tables, run, config, labels);
    if (task == "yolov8") return add_task_metrics<task::Yolov8Detector>(tables, run, config, labels);
    if (task == "small-seg") return add_task_metrics<task::SmallSegNet>(tables, run, config, labels);
    if (task == "segformer") return add_task_metrics<task::SegFormer>(tables, run, config, labels);
    TORCH_CHECK(false, "tdfusion: ", config_path, " names an unknown task '", task, "'");
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(false, "tdfusion: ", config_path, " is not a valid run configuration: ", error.what());
  }
}

int run_eval(const EvalArgs& args, int threads) {
  std::vector<std::pair<std::string, std::string>> methods;
  for (const std::string& entry : args.fused) {
    const auto eq = entry.find('=');
    if (eq != std::string::npos) {
      methods.emplace_back(entry.substr(0, eq), entry.substr(eq + 1));
      continue;
    }
    // peer_results/<method>/tno: a folder named after the data set is labelled by its parent.
    const fs::path path = fs::path(entry).lexically_normal();
    const fs::path name = path.filename().empty() ? path.parent_path().filename() : path.filename();
    const bool generic = name == "tno" || name == "msrs" || name == "roadscene" || name == "llvip" || name == "m3fd" ||
                         name == "fused";
    methods.emplace_back(generic ? path.parent_path().filename().string() : name.string(), entry);
  }
  const auto options = metrics::FolderEvaluationOptions().protocol(metrics::parse_protocol(args.protocol)).threads(threads);
  std::vector<metrics::EvaluationTable> tables = metrics::evaluate_methods(args.ir, args.vi, methods, options);
  if (!args.task_run.empty()) add_task_metrics(tables, args.task_run, args.labels);
  for (const auto& table : tables) std::cout << metrics::format_table(table) << '\n';
  const std::string markdown = metrics::format_markdown_comparison(tables, 4, args.dataset);
  if (tables.size() > 1) std::cout << markdown << '\n';
  if (!args.markdown.empty()) write_text(args.markdown, markdown);
  if (!args.json.empty()) {
    nlohmann::json all = nlohmann::json::array();
    for (const auto& table : tables) all.push_back(metrics::to_json(table));
    write_text(args.json, (tables.size() == 1 ? all[0] : all).dump(2) + "\n");
  }
  if (!args.csv.empty()) {
    std::string csv;
    for (size_t i = 0; i < tables.size(); ++i) {
      std::string part = metrics::format_csv(tables[i]);
      if (i > 0) part = part.substr(part.find('\n') + 1);  // one header line for all methods
      csv += part;
    }
    write_text(args.csv, csv);
  }
  if (!args.chart.empty()) metrics::write_comparison_chart(args.chart, tables);
  return 0;
}

// ---------------------------------------------------------------------------------------------- demo

int run_demo(const std::string& out_dir, const std::string& shared_dir, const std::string& weights) {
  fs::create_directories(out_dir);
  LoadedFusion net = load_fusion(weights, torch::kCPU);
  auto fuse_and_write = [&](const std::string& name, const torch::Tensor& ir, const torch::Tensor& vi) {
    const torch::Tensor fused = net.visit([&](auto& n) { return fusion::fuse_images(n, ir, vi); });
    for (const auto& [suffix, image] : {std::pair<std::string, torch::Tensor>{"_ir", ir}, {"_vi", vi}, {"_fused", fused}}) {
      const std::string path = (fs::path(out_dir) / (name + suffix + ".png")).string();
      io::write_image(path, image);
    }
    std::cout << "  " << (fs::path(out_dir) / (name + "_fused.png")).string() << '\n';
  };
  std::cout << "fusing a built-in synthetic pair:\n";
  const data::SyntheticScene scene = data::make_synthetic_scene(240, 320, 7);
  fuse_and_write("synthetic", scene.ir, scene.vi);
  if (shared_dir.empty() || !fs::is_directory(shared_dir)) {
    std::cout << "no shared data folder (" << (shared_dir.empty() ? "none given" : shared_dir)
              << "): skipping the real pairs\n";
    return 0;
  }
  for (const std::string set : {"tno", "msrs", "roadscene", "llvip", "m3fd"}) {
    const fs::path root = fs::path(shared_dir) / set;
    if (!fs::is_directory(root / "ir")) continue;
    std::cout << "fusing " << root.string() << ":\n";
    const auto pairs = data::match_pairs((root / "ir").string(), (root / "vi").string(), set);
    for (size_t i = 0; i < std::min<size_t>(2, pairs.size()); ++i)
      fuse_and_write(set + "_" + pairs[i].stem, io::read_image(pairs[i].ir), io::read_image(pairs[i].vi));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("tdfusion: task-driven infrared-visible image fusion with a learnable fusion loss");
  app.require_subcommand(1);
  int threads = 0;
  app.add_option("--threads", threads, "CPU threads (default: all cores)");

  FuseArgs fuse;
  CLI::App* fuse_cmd = app.add_subcommand("fuse", "fuse one pair or two folders of pairs");
  fuse_cmd->add_option("--ir", fuse.ir, "infrared image or folder")->required();
  fuse_cmd->add_option("--vi", fuse.vi, "visible image or folder")->required();
  fuse_cmd->add_option("--out", fuse.out, "output image (.png/.jpg/.bmp) or folder")->required();
  fuse_cmd->add_option("--weights", fuse.weights, "fusion state_dict (.pth; default: the built-in model)");
  fuse_cmd->add_option("--tile", fuse.tile, "fuse in tiles of this side (exact; bounds memory)")->check(CLI::NonNegativeNumber);
  fuse_cmd->add_flag("--parallel-tiles", fuse.parallel_tiles,
                     "with --tile: a tile per thread at a time (faster for tiles of about 128, memory of one tile each)");
  fuse_cmd->add_option("--device", fuse.device, "cpu or cuda")->capture_default_str();
  fuse_cmd->add_flag("--raw", fuse.raw, "keep the network's output range (no per-image min-max stretch)");

  TrainArgs train;
  CLI::App* train_cmd = app.add_subcommand("train", "bilevel training on a folder of pairs or on synthetic scenes");
  train_cmd->add_option("--data", train.data, "folder with ir/ and vi/ (default: synthetic scenes)");
  train_cmd->add_option("--out", train.out, "run folder: checkpoint.pt, log.jsonl, fusion.pth")->capture_default_str();
  train_cmd->add_option("--fusion", train.fusion)->check(CLI::IsMember({"refusion", "light"}))->capture_default_str();
  train_cmd->add_option("--loss", train.loss, "lpn (learned) or fixed (0.5/0.5)")->check(CLI::IsMember({"lpn", "fixed"}))->capture_default_str();
  train_cmd->add_option("--task", train.task, "segmentation (segformer, small-seg) or detection (yolov8, small-det)")
      ->check(CLI::IsMember({"segformer", "small-seg", "yolov8", "small-det"}))->capture_default_str();
  train_cmd->add_option("--fusion-data", train.fusion_data,
                        "extra folder(s) of pairs (ir/, vi/) without labels on which F also trains in phase B")
      ->check(CLI::ExistingDirectory);
  train_cmd->add_option("--labels", train.labels, "label folder: class-id PNGs or YOLO .txt (default: DATA/label)");
  train_cmd->add_option("--classes", train.classes, "classes (segmentation: background included)")->capture_default_str();
  train_cmd->add_option("--epochs", train.epochs)->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--meta-steps", train.meta_steps, "meta steps per epoch (release: 200)")->check(CLI::NonNegativeNumber)->capture_default_str();
  train_cmd->add_option("--fusion-lr", train.fusion_lr)->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--task-lr", train.task_lr)->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--lr-step", train.lr_step, "epochs between the tenfold learning-rate decays (StepLR)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--meta-lr", train.meta_lr, "loss-generator step (0: the fusion learning rate)")->capture_default_str();
  train_cmd->add_option("--crop", train.crop, "fusion crop side")->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--task-size", train.task_size, "task input HxW (default: the image size)");
  train_cmd->add_option("--scenes", train.scenes, "synthetic scenes (without --data)")->capture_default_str();
  train_cmd->add_option("--scene-size", train.scene_size, "synthetic scene side")->capture_default_str();
  train_cmd->add_option("--seed", train.seed)->capture_default_str();
  train_cmd->add_option("--device", train.device, "cpu or cuda")->capture_default_str();
  train_cmd->add_flag("--resume", train.resume, "continue from OUT/checkpoint.pt");
  train_cmd->add_option("--batch", train.batch, "pairs per step over all processes (each adds its modality swap)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--nproc", train.nproc, "data-parallel processes on this machine (Gloo on 127.0.0.1)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  train_cmd->add_option("--world-size", train.world_size, "processes over all machines (with --rank, --master-addr)")
      ->check(CLI::PositiveNumber);
  train_cmd->add_option("--rank", train.rank, "this process's rank, 0 .. world-size - 1")->check(CLI::NonNegativeNumber);
  train_cmd->add_option("--master-addr", train.master_addr, "host of rank 0 (the TCP store)");
  train_cmd->add_option("--master-port", train.master_port, "port of the TCP store on rank 0");
  train_cmd->add_option("--val-every", train.val_every,
                        "hold out every n-th pair (sorted by name) and validate on them after each epoch")
      ->check(CLI::Range(int64_t{2}, std::numeric_limits<int64_t>::max()));

  EvalArgs eval;
  CLI::App* eval_cmd = app.add_subcommand("eval", "fusion metrics of one or more fused folders (both community protocols)");
  eval_cmd->add_option("--ir", eval.ir, "infrared source folder")->required();
  eval_cmd->add_option("--vi", eval.vi, "visible source folder")->required();
  eval_cmd->add_option("--fused", eval.fused, "fused folder(s), DIR or LABEL=DIR; several give a comparison")->required();
  eval_cmd->add_option("--protocol", eval.protocol, "cddfuse (nine metrics, MI/VIF/SSIM summed) or tdfusion (the paper's)")
      ->check(CLI::IsMember({"cddfuse", "tdfusion"}))->capture_default_str();
  eval_cmd->add_option("--json", eval.json, "write the per-image results as JSON");
  eval_cmd->add_option("--csv", eval.csv, "write the per-image results as CSV");
  eval_cmd->add_option("--markdown", eval.markdown, "write the comparison as a Markdown table");
  eval_cmd->add_option("--chart", eval.chart, "write the comparison as a PNG bar chart");
  eval_cmd->add_option("--dataset", eval.dataset, "data set name for the Markdown caption");
  CLI::Option* task_run = eval_cmd->add_option("--task-run", eval.task_run,
                                               "a `tdfusion train` folder: add its task network's metrics (mIoU or AP)");
  eval_cmd->add_option("--labels", eval.labels, "the task labels of the images (YOLO .txt or class-id PNG), with --task-run")
      ->needs(task_run);
  task_run->needs(eval_cmd->get_option("--labels"));

  std::string demo_out = "tdfusion-demo", demo_weights, shared_dir = TDFUSION_SHARED_DIR "/data";
  CLI::App* demo_cmd = app.add_subcommand("demo", "fuse a built-in synthetic pair and the shared data pairs, if present");
  demo_cmd->add_option("--out", demo_out, "output folder")->capture_default_str();
  demo_cmd->add_option("--data", shared_dir, "folder with tno/, msrs/, ... pairs")->capture_default_str();
  demo_cmd->add_option("--weights", demo_weights, "fusion state_dict (default: the built-in model)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  reuse_freed_memory();
  use_cpu_threads(threads);
  try {
    if (*fuse_cmd) return run_fuse(fuse);
    if (*train_cmd) return run_train(train, std::vector<std::string>(argv, argv + argc));
    if (*demo_cmd) return run_demo(demo_out, shared_dir, demo_weights);
    if (*eval_cmd) return run_eval(eval, threads);
  } catch (const CLI::ValidationError& e) {
    std::cerr << "tdfusion: " << e.what() << '\n';
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << '\n';  // tdfusion's messages start with "tdfusion: "
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "tdfusion: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
