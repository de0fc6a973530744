#pragma once
// A training run on disk, as `tdfusion train` keeps it: RUN/config.json (what was trained: networks, data,
// sampling and learning rates), RUN/checkpoint.pt, RUN/log.jsonl, RUN/fusion.pth. One process at a time may
// use a run folder (an advisory lock), and a run is resumed only with the configuration it was trained with,
// checked before anything is written. Needs nlohmann/json.

#include "tdfusion/io/atomic_file.hpp"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace tdfusion::meta {

/// What a run trains. Everything here is fixed for the life of the run: a resumed run must ask for the same
/// (only the number of epochs may grow). Sizes are "HxW" text, "" for each image's own size.
struct RunConfig {
  std::string fusion, loss, task;
  int64_t classes = 0;
  std::string task_size;
  int64_t crop = 0;
  std::string data, labels;              ///< "" data: synthetic scenes
  std::vector<std::string> fusion_data;  ///< pair folders without labels for F's phase-B steps
  int64_t scenes = 0, scene_size = 0;    ///< synthetic scenes (without data)
  int64_t val_every = 0, batch = 1, meta_steps = 0, lr_step = 0;
  double fusion_lr = 0.0, task_lr = 0.0, meta_lr = 0.0;
  uint64_t seed = 0;
};

inline nlohmann::json to_json(const RunConfig& c) {
  return {{"fusion", c.fusion},       {"loss", c.loss},           {"task", c.task},
          {"classes", c.classes},     {"task_size", c.task_size}, {"crop", c.crop},
          {"data", c.data},           {"labels", c.labels},       {"fusion_data", c.fusion_data},
          {"scenes", c.scenes},       {"scene_size", c.scene_size}, {"val_every", c.val_every},
          {"batch", c.batch},         {"meta_steps", c.meta_steps}, {"lr_step", c.lr_step},
          {"fusion_lr", c.fusion_lr}, {"task_lr", c.task_lr},     {"meta_lr", c.meta_lr},
          {"seed", c.seed}};
}

namespace detail {

/// The value of `key` in the object `json` as T; the error names the file and the key.
template <class T>
T config_value(const nlohmann::json& json, const char* key, const std::string& path) {
  const auto found = json.find(key);
  TORCH_CHECK(found != json.end(), "tdfusion: ", path, " has no \"", key, "\" (not a tdfusion run configuration)");
  // nlohmann converts numbers between kinds with a plain cast (undefined when out of range): check the kind.
  bool number_fits = true;
  if constexpr (std::is_unsigned_v<T>) {
    number_fits = found->is_number_unsigned();
  } else if constexpr (std::is_integral_v<T>) {
    number_fits = found->is_number_integer() &&
                  !(found->is_number_unsigned() &&
                    found->template get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<T>::max()));
  } else if constexpr (std::is_floating_point_v<T>) {
    number_fits = found->is_number();
  }
  TORCH_CHECK(number_fits, "tdfusion: ", path, ": \"", key, "\" is not a number of the right kind (",
              found->is_number() ? found->dump() : std::string(found->type_name()), ")");
  try {
    return found->template get<T>();
  } catch (const nlohmann::json::exception&) {
    TORCH_CHECK(false, "tdfusion: ", path, ": \"", key, "\" has the wrong type (", found->type_name(), ")");
  }
}

}  // namespace detail

/// Parses a run configuration; every error names `path` and the key.
inline RunConfig parse_run_config(const std::string& text, const std::string& path) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);  // iterative parser: nesting depth costs no stack
  } catch (const nlohmann::json::exception& error) {
    const std::string what = error.what();  // "[json.exception.parse_error.101] parse error at line 1, ..."
    TORCH_CHECK(false, "tdfusion: ", path, " is not valid JSON: ", what.substr(what.find(']') + 2));
  }
  TORCH_CHECK(json.is_object(), "tdfusion: ", path, " is not a JSON object (not a tdfusion run configuration)");
  RunConfig c;
  c.fusion = detail::config_value<std::string>(json, "fusion", path);
  c.loss = detail::config_value<std::string>(json, "loss", path);
  c.task = detail::config_value<std::string>(json, "task", path);
  c.classes = detail::config_value<int64_t>(json, "classes", path);
  c.task_size = detail::config_value<std::string>(json, "task_size", path);
  c.crop = detail::config_value<int64_t>(json, "crop", path);
  c.data = detail::config_value<std::string>(json, "data", path);
  c.labels = detail::config_value<std::string>(json, "labels", path);
  c.fusion_data = detail::config_value<std::vector<std::string>>(json, "fusion_data", path);
  c.scenes = detail::config_value<int64_t>(json, "scenes", path);
  c.scene_size = detail::config_value<int64_t>(json, "scene_size", path);
  c.val_every = detail::config_value<int64_t>(json, "val_every", path);
  c.batch = detail::config_value<int64_t>(json, "batch", path);
  c.meta_steps = detail::config_value<int64_t>(json, "meta_steps", path);
  c.lr_step = detail::config_value<int64_t>(json, "lr_step", path);
  c.fusion_lr = detail::config_value<double>(json, "fusion_lr", path);
  c.task_lr = detail::config_value<double>(json, "task_lr", path);
  c.meta_lr = detail::config_value<double>(json, "meta_lr", path);
  c.seed = detail::config_value<uint64_t>(json, "seed", path);
  TORCH_CHECK(c.classes > 0 && c.classes <= 65536, "tdfusion: ", path, ": \"classes\" must be in 1 .. 65536, got ",
              c.classes);
  TORCH_CHECK(c.crop > 0 && c.batch > 0, "tdfusion: ", path, ": \"crop\" and \"batch\" must be positive");
  return c;
}

/// The settings in which `requested` differs from `trained`, as "--name VALUE (the run was trained with
/// VALUE)" phrases joined by "; ", or "" when it may resume the run.
inline std::string config_differences(const RunConfig& trained, const RunConfig& requested) {
  const nlohmann::json a = to_json(trained), b = to_json(requested);
  std::string out;
  for (const auto& [key, value] : a.items()) {
    if (b.at(key) == value) continue;
    std::string option = key;
    for (char& ch : option) ch = ch == '_' ? '-' : ch;
    out += (out.empty() ? "" : "; ") + ("--" + option + " " + b.at(key).dump() + " (the run was trained with " +
                                        value.dump() + ")");
  }
  return out;
}

/// A run folder held by this process: created if missing and locked until destruction (a second process on
/// the same folder fails at once); temporaries that a killed run left in it are removed.
class RunFolder {
 public:
  explicit RunFolder(std::string dir) : dir_(std::move(dir)) {
    std::error_code error;
    std::filesystem::create_directories(dir_, error);
    TORCH_CHECK(!error, "tdfusion: cannot create the run folder ", dir_, ": ", error.message());
    const std::string lock = path("lock");
    lock_fd_ = ::open(lock.c_str(), O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    TORCH_CHECK(lock_fd_ >= 0, "tdfusion: cannot open ", lock, ": ", std::strerror(errno));
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(lock_fd_);
      TORCH_CHECK(false, "tdfusion: the run folder ", dir_, " is in use by another tdfusion process (", lock,
                  " is locked)");
    }
    // Under the lock no one else writes here: temporaries left by a killed run are stale.
    io::remove_stale_temporaries(dir_);
  }
  RunFolder(const RunFolder&) = delete;
  RunFolder& operator=(const RunFolder&) = delete;
  ~RunFolder() { ::close(lock_fd_); }

  std::string path(const std::string& name) const { return (std::filesystem::path(dir_) / name).string(); }
  std::string config() const { return path("config.json"); }
  std::string checkpoint() const { return path("checkpoint.pt"); }

 private:
  std::string dir_;
  int lock_fd_ = -1;
};

/// Reads RUN/config.json (bounded: a configuration is a few hundred bytes).
inline RunConfig read_run_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in.good(), "tdfusion: cannot read ", path, ": ", std::strerror(errno));
  constexpr std::streamsize kLimit = 1 << 20;
  std::string text(static_cast<size_t>(kLimit) + 1, '\0');
  in.read(text.data(), kLimit + 1);
  TORCH_CHECK(in.gcount() <= kLimit, "tdfusion: ", path, " is larger than 1 MiB: not a run configuration");
  text.resize(static_cast<size_t>(in.gcount()));
  return parse_run_config(text, path);
}

}  // namespace tdfusion::meta
