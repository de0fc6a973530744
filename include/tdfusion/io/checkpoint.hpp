#pragma once
// Checkpoints of a training run: named modules, named optimizers and integer counters (epoch, sample
// counter, ...) in one file, written atomically, so a run can be stopped and resumed bit for bit.
//
// Layout (a torch::serialize archive, the format of torch::save):
//   format "tdfusion-checkpoint", version 1
//   modules/<name>            what Module::save writes (parameters and buffers by their registered names)
//   optimizers/<name>/state   what Optimizer::save writes
//   optimizers/<name>/lr      the learning rate of every parameter group (LibTorch 1.13's Optimizer::load
//                             restores the per-parameter state but not the group options)
//   counters/<name>           int64 scalars
//
// Loading copies values into the existing parameters and buffers (same tensors, so optimizers and
// parameter dictionaries that refer to them stay valid; each keeps its device and dtype) after checking
// every entry's presence and shape. torch's own Module::load would instead rebind parameters to the
// archive's storage or device without a shape check.
//
// A checkpoint may be damaged or come from someone else. Before LibTorch reads it, our own pass over its zip
// records (io/zip_archive.hpp) checks their sizes against kMaxCheckpointBytes and their CRC-32s (LibTorch's
// reader allocates what the file declares and does not check CRCs), the nesting of its pickles (LibTorch's
// unpickler recurses over it) and that its TorchScript source only declares classes (LibTorch compiles it,
// and would run a method such as __setstate__ while loading). Weights, optimizer states and learning rates
// must be finite, and LibTorch's own errors are reported in words, naming the file.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/io/atomic_file.hpp"
#include "tdfusion/io/zip_archive.hpp"

#include <caffe2/serialize/versions.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tdfusion::io {

inline constexpr const char* kCheckpointFormat = "tdfusion-checkpoint";
inline constexpr int64_t kCheckpointVersion = 1;
/// Default bound on the uncompressed size of a checkpoint's records together: what LibTorch allocates to read
/// it. For scale: ReFusion + LPN + SegFormer-B0 with their Adam states take 45 MB.
inline constexpr uint64_t kMaxCheckpointBytes = uint64_t{1} << 30;
/// Bounds on the records LibTorch parses (its pickles and TorchScript source), checked before it does. For
/// scale: a checkpoint of ReFusion + LPN + SmallDetector with their Adam states has a 60 KB data.pkl whose
/// values nest 20 levels deep.
inline constexpr uint64_t kMaxCheckpointScriptBytes = uint64_t{4} << 20;  ///< each pickle or source record
inline constexpr uint32_t kMaxCheckpointNesting = 256;                    ///< nesting of a pickle's values

/// What a checkpoint holds. Names are the caller's choice (no '.' or '/'; each unique within its list).
/// The pointers are not owned and must outlive the save / load call.
struct CheckpointState {
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> modules;
  std::vector<std::pair<std::string, torch::optim::Optimizer*>> optimizers;
  std::map<std::string, int64_t> counters;
};

namespace detail {

inline void check_entry_name(const std::string& name, const std::string& what, const std::string& path) {
  TORCH_CHECK(!name.empty() && name.find('.') == std::string::npos && name.find('/') == std::string::npos,
              "tdfusion: checkpoint '", path, "': invalid ", what, " name '", name,
              "' (must be non-empty, without '.' or '/')");
}

/// tdfusion's own message of `error`, or `otherwise` for LibTorch's and the standard library's internals.
inline std::string error_text(const std::exception& error, const std::string& otherwise) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&error)) {
    const std::string text = torch_error->what_without_backtrace();
    if (text.rfind("tdfusion: ", 0) == 0) return text.substr(10);
  }
  return otherwise;
}

/// Checks a pickle record of a checkpoint before LibTorch's unpickler, which recurses over the nesting (as does
/// the destruction of what it builds), sees it: known opcodes only, at most kMaxCheckpointNesting levels, and
/// no container changed once a second reference to it exists (the only way to build a cycle). The depth of
/// every value is tracked, not the values.
inline void check_pickle(const std::string& bytes, const std::string& where) {
  struct Value {
    uint32_t depth;
    bool shared;  // referenced twice (memo get, DUP): frozen, so the depths of its containers stay exact
  };
  std::vector<Value> values;
  std::vector<uint32_t> stack, marks;
  std::unordered_map<uint64_t, uint32_t> memo;
  size_t pos = 0;
  const auto take = [&](uint64_t n) {
    TORCH_CHECK(n <= bytes.size() - pos, "tdfusion: ", where, " is truncated");
    const size_t at = pos;
    pos += static_cast<size_t>(n);
    return at;
  };
  const auto number = [&](size_t width) {
    const size_t at = take(width);
    uint64_t value = 0;
    for (size_t i = 0; i < width; ++i) value |= uint64_t{static_cast<unsigned char>(bytes[at + i])} << (8 * i);
    return value;
  };
  const auto floor = [&] { return marks.empty() ? size_t{0} : size_t{marks.back()}; };
  const auto top = [&] {
    TORCH_CHECK(stack.size() > floor(), "tdfusion: ", where, " is malformed (stack underflow)");
    return stack.back();
  };
  const auto pop = [&] {
    const uint32_t v = top();
    stack.pop_back();
    return v;
  };
  // LibTorch's unpickler keeps its memo in an array as long as the largest key (LibTorch's pickler numbers
  // them from 0), so a large key would make it allocate 16 bytes per number below it.
  const auto memo_key = [&](uint64_t key) {
    TORCH_CHECK(key < bytes.size(), "tdfusion: ", where, " is malformed (memo key ", key, " beyond its size)");
    return key;
  };
  const auto recall = [&](uint64_t key) {
    const auto found = memo.find(key);
    TORCH_CHECK(found != memo.end(), "tdfusion: ", where, " is malformed (unknown memo ", key, ")");
    return found->second;
  };
  const auto push = [&](uint32_t depth) {
    TORCH_CHECK(depth <= kMaxCheckpointNesting, "tdfusion: ", where, " nests deeper than ", kMaxCheckpointNesting,
                " levels");
    values.push_back({depth, false});
    stack.push_back(static_cast<uint32_t>(values.size() - 1));
  };
  const auto pop_to_mark = [&] {  // the depth of the deepest item above the innermost MARK, which is removed
    TORCH_CHECK(!marks.empty(), "tdfusion: ", where, " is malformed (no MARK)");
    uint32_t deepest = 0;
    for (size_t i = marks.back(); i < stack.size(); ++i) deepest = std::max(deepest, values[stack[i]].depth);
    stack.resize(marks.back());
    marks.pop_back();
    return deepest;
  };
  const auto grow = [&](uint32_t item_depth) {  // the value on top receives an item
    Value& container = values[top()];
    TORCH_CHECK(!container.shared, "tdfusion: ", where, " changes a value it already refers to twice (a cycle?)");
    container.depth = std::max(container.depth, item_depth + 1);
    TORCH_CHECK(container.depth <= kMaxCheckpointNesting, "tdfusion: ", where, " nests deeper than ",
                kMaxCheckpointNesting, " levels");
  };
  const auto share = [&](uint32_t v) {
    values[v].shared = true;
    stack.push_back(v);
  };
  while (true) {
    const auto op = static_cast<unsigned char>(bytes[take(1)]);
    switch (op) {
      case 0x80: take(1); break;                                                 // PROTO
      case 0x95: take(8); break;                                                 // FRAME
      case '(': marks.push_back(static_cast<uint32_t>(stack.size())); break;     // MARK
      case 'N': case 0x88: case 0x89: push(0); break;                            // NONE, NEWTRUE, NEWFALSE
      case 'K': take(1); push(0); break;                                         // BININT1
      case 'M': take(2); push(0); break;                                         // BININT2
      case 'J': take(4); push(0); break;                                         // BININT
      case 'G': take(8); push(0); break;                                         // BINFLOAT
      case 0x8a: take(number(1)); push(0); break;                                // LONG1
      case 0x8b: take(number(4)); push(0); break;                                // LONG4
      case 'C': case 'U': case 0x8c: take(number(1)); push(0); break;            // short bytes / strings
      case 'B': case 'T': case 'X': take(number(4)); push(0); break;             // bytes / strings
      case 0x8d: case 0x8e: take(number(8)); push(0); break;                     // BINUNICODE8, BINBYTES8
      case 'c': {                                                                // GLOBAL: two lines
        for (int line = 0; line < 2; ++line) {
          const size_t end = bytes.find('\n', pos);
          TORCH_CHECK(end != std::string::npos, "tdfusion: ", where, " is truncated");
          pos = end + 1;
        }
        push(0);
        break;
      }
      case 0x93: pop(); pop(); push(0); break;                                   // STACK_GLOBAL
      case ')': case ']': case '}': push(1); break;                              // empty tuple, list, dict
      case 't': case 'l': case 'd': push(pop_to_mark() + 1); break;              // TUPLE, LIST, DICT
      case 0x85: case 0x86: case 0x87: {                                         // TUPLE1..3
        uint32_t deepest = 0;
        for (int i = 0; i < op - 0x84; ++i) deepest = std::max(deepest, values[pop()].depth);
        push(deepest + 1);
        break;
      }
      case 'a': grow(values[pop()].depth); break;                                // APPEND
      case 's': {                                                                // SETITEM
        const uint32_t value = pop(), key = pop();
        grow(std::max(values[value].depth, values[key].depth));
        break;
      }
      case 'e': case 'u': grow(pop_to_mark()); break;                            // APPENDS, SETITEMS
      case 'b': grow(values[pop()].depth); break;                                // BUILD
      case 'Q': push(values[pop()].depth + 1); break;                            // BINPERSID
      case 'R': case 0x81: {                                                     // REDUCE, NEWOBJ
        const uint32_t args = pop(), callable = pop();
        push(std::max(values[args].depth, values[callable].depth) + 1);
        break;
      }
      case 'q': memo[number(1)] = top(); break;                                  // BINPUT
      case 'r': memo[memo_key(number(4))] = top(); break;                        // LONG_BINPUT
      case 0x94: memo[memo.size()] = top(); break;                               // MEMOIZE
      case 'h': share(recall(number(1))); break;                                 // BINGET
      case 'j': share(recall(number(4))); break;                                 // LONG_BINGET
      case '2': share(top()); break;                                             // DUP
      case '0': pop(); break;                                                    // POP
      case '1': pop_to_mark(); break;                                            // POP_MARK
      case '.': return;                                                          // STOP
      default:
        TORCH_CHECK(false, "tdfusion: ", where, " holds pickle opcode 0x", std::hex, int(op),
                    ", which LibTorch's archives do not use");
    }
  }
}
/// A TorchScript type annotation: dotted names, brackets (at most 8 deep), commas and spaces.
inline bool is_type_annotation(const std::string& text) {
  int depth = 0;
  for (const char c : text) {
    if (c == '[' && ++depth > 8) return false;
    if (c == ']' && --depth < 0) return false;
    if (!std::isalnum(static_cast<unsigned char>(c)) && std::string("_.,[] ").find(c) == std::string::npos)
      return false;
  }
  return depth == 0 && !text.empty();
}

/// `"name", "name", ` (what LibTorch writes between the brackets of a name list), names without quotes or
/// backslashes.
inline bool is_name_list(const std::string& text) {
  for (size_t at = 0; at < text.size();) {
    const size_t end = text.find('"', at + 1);
    if (text[at] != '"' || end == std::string::npos ||
        std::find(text.begin() + at, text.begin() + end, '\\') != text.begin() + end ||
        text.compare(end + 1, 2, ", ") != 0)
      return false;
    at = end + 3;
  }
  return true;
}

inline bool is_identifier(const std::string& text) {
  return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
  });
}

/// One line of a class declaration as LibTorch writes an archive's modules: the class line, the parameter and
/// buffer name lists, and attribute annotations.
inline bool is_declaration_line(const std::string& line) {
  const auto starts = [&](const std::string& prefix) { return line.compare(0, prefix.size(), prefix) == 0; };
  const auto ends = [&](const std::string& suffix) {
    return line.size() >= suffix.size() && line.compare(line.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (line.find_first_not_of(' ') == std::string::npos) return true;
  const std::string class_line = "class ", base = "(Module):";
  if (starts(class_line)) {
    return ends(base) && line.size() > class_line.size() + base.size() &&
           is_identifier(line.substr(class_line.size(), line.size() - class_line.size() - base.size()));
  }
  for (const std::string list : {"  __parameters__ = [", "  __buffers__ = ["}) {
    if (starts(list)) return ends("]") && is_name_list(line.substr(list.size(), line.size() - list.size() - 1));
  }
  if (line == "  __annotations__ = []") return true;
  const std::string annotation = "  __annotations__[";
  if (starts(annotation)) {
    const size_t end = line.find("] = ");
    return end != std::string::npos && is_name_list(line.substr(annotation.size(), end - annotation.size()) + ", ") &&
           is_type_annotation(line.substr(end + 4));
  }
  const size_t colon = line.find(" : ");
  return starts("  ") && colon != std::string::npos && is_identifier(line.substr(2, colon - 2)) &&
         is_type_annotation(line.substr(colon + 3));
}

/// Checks a TorchScript source record of a checkpoint before LibTorch compiles it: tdfusion's checkpoints hold
/// class declarations only, so a method (code that loading would run) or anything else is refused.
inline void check_declarations(const std::string& text, const std::string& where) {
  size_t line_number = 1;
  for (size_t at = 0; at <= text.size(); ++line_number) {
    const size_t end = std::min(text.find('\n', at), text.size());
    TORCH_CHECK(is_declaration_line(text.substr(at, end - at)), "tdfusion: ", where, " line ", line_number,
                " is not a declaration (tdfusion checkpoints hold no code)");
    at = end + 1;
  }
}

/// Checks a checkpoint's version record: LibTorch's reader throws from its constructor, leaking its zip state,
/// unless it holds a format version that this LibTorch reads.
inline void check_version(const std::string& text, const std::string& where) {
  const std::string digits = text.substr(0, text.find_last_not_of(" \t\r\n") + 1);
  TORCH_CHECK(!digits.empty() && digits.size() <= 18 &&
                  std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }),
              "tdfusion: ", where, " is not a format version");
  const uint64_t version = std::stoull(digits);
  TORCH_CHECK(version >= caffe2::serialize::kMinSupportedFileFormatVersion &&
                  version <= caffe2::serialize::kMaxSupportedFileFormatVersion,
              "tdfusion: ", where, " says format version ", version, ", which this LibTorch does not read (",
              caffe2::serialize::kMinSupportedFileFormatVersion, " to ",
              caffe2::serialize::kMaxSupportedFileFormatVersion, ")");
}

/// Checks every zip record of the file at `path` before LibTorch reads it: sizes within `max_bytes` together,
/// CRC-32s, and the records LibTorch parses (pickles, TorchScript source) as check_pickle and
/// check_declarations say.
inline void verify_archive(const std::string& path, uint64_t max_bytes) {
  TORCH_CHECK(std::filesystem::is_regular_file(path), "tdfusion: checkpoint '", path, "' is not a regular file");
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file.good(), "tdfusion: cannot open checkpoint '", path, "': ", std::strerror(errno));
  TORCH_CHECK(starts_as_zip(file), "tdfusion: '", path, "' is not a readable checkpoint (not a zip archive)");
  ZipArchive archive(file, "checkpoint '" + path + "'");
  const std::string folder = archive.folder();
  TORCH_CHECK(!folder.empty(), "tdfusion: '", path, "' is not a readable checkpoint (its records are not in a folder)");
  const ZipEntry* version = archive.find(folder + ".data/version");  // where LibTorch looks first
  if (version == nullptr) version = archive.find(folder + "version");
  TORCH_CHECK(version != nullptr, "tdfusion: '", path, "' is not a readable checkpoint (it has no version record)");
  check_version(archive.read_string(*version, 64), "checkpoint '" + path + "': record " + version->name);
  uint64_t total = 0;
  for (const ZipEntry& entry : archive.entries()) {
    TORCH_CHECK(entry.size <= max_bytes - total, "tdfusion: checkpoint '", path, "' declares more than ",
                max_bytes, " bytes of records (", entry.name, " takes ", entry.size, "); raise the limit "
                "(max_bytes) for checkpoints this large");
    total += entry.size;
  }
  const auto ends = [](const std::string& name, const std::string& suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  for (const ZipEntry& entry : archive.entries()) {
    const std::string where = "checkpoint '" + path + "': record " + entry.name;
    const std::string name = ZipArchive::lower_case(entry.name);  // LibTorch finds records ignoring case
    if (ends(name, "pkl")) {  // data.pkl, constants.pkl, *.debug_pkl
      check_pickle(archive.read_string(entry, kMaxCheckpointScriptBytes), where);
    } else if (ends(name, ".py")) {
      check_declarations(archive.read_string(entry, kMaxCheckpointScriptBytes), where);
    } else {
      archive.read(entry, [](const char*, size_t) {});
    }
  }
}

/// Checks that every tensor and floating-point value in `archive` (and the archives below it) is finite;
/// `where` names the archive in messages. Iterative: the nesting comes from the file.
inline void check_archive_finite(torch::serialize::InputArchive archive, const std::string& where,
                                 const std::string& path) {
  struct Named {
    torch::serialize::InputArchive archive;
    std::string name;
  };
  std::vector<Named> pending;
  pending.push_back({std::move(archive), where});
  while (!pending.empty()) {
    Named current = std::move(pending.back());
    pending.pop_back();
    for (const std::string& key : current.archive.keys()) {
      const std::string name = current.name + "." + key;
      c10::IValue value;
      torch::serialize::InputArchive child;
      if (current.archive.try_read(key, child)) {
        pending.push_back({std::move(child), name});
      } else if (current.archive.try_read(key, value) && value.isTensor()) {
        const torch::Tensor tensor = value.toTensor();
        // A view of more elements than its storage holds (stride 0) would make the check below allocate them.
        TORCH_CHECK(tensor.numel() <= static_cast<int64_t>(tensor.storage().nbytes()) / tensor.element_size(),
                    "tdfusion: checkpoint '", path, "': ", name, " has more elements than its storage holds");
        check_finite(tensor, "checkpoint '" + path + "': " + name);
      } else {
        TORCH_CHECK(!value.isDouble() || std::isfinite(value.toDouble()), "tdfusion: checkpoint '", path, "': ",
                    name, " is not a finite number");
      }
    }
  }
}

/// The learning rate of every group, or an empty list when the optimizer's options do not expose one.
inline std::vector<double> group_learning_rates(const torch::optim::Optimizer& optimizer) {
  std::vector<double> rates;
  try {
    for (const auto& group : optimizer.param_groups()) rates.push_back(group.options().get_lr());
  } catch (const c10::Error&) {
    rates.clear();  // a custom optimizer without get_lr(): its options are then not part of the checkpoint
  }
  return rates;
}

inline torch::Device optimizer_device(const torch::optim::Optimizer& optimizer) {
  for (const auto& group : optimizer.param_groups()) {
    if (!group.params().empty()) return group.params().front().device();
  }
  return torch::kCPU;
}

/// A value read from the file, waiting to be copied into `destination` once everything has been checked.
struct PendingCopy {
  torch::Tensor destination, source;
};

/// Reads the entries Module::save wrote for `module` (recursively, under the same names) and checks that
/// each exists and has the module's shape. `where` is the entry's name in messages.
inline void stage_module(torch::serialize::InputArchive& archive, const torch::nn::Module& module,
                         const std::string& where, const std::string& path, std::vector<PendingCopy>& pending) {
  auto stage = [&](const std::string& key, const torch::Tensor& destination, bool is_buffer) {
    if (!destination.defined()) return;
    torch::Tensor source;
    bool found = false;
    try {
      found = archive.try_read(key, source, is_buffer);
    } catch (const std::exception& error) {
      TORCH_CHECK(false, "tdfusion: checkpoint '", path, "': cannot read ", where, ".", key, ": ",
                  error_text(error, "it is damaged"));
    }
    TORCH_CHECK(found && source.defined(), "tdfusion: checkpoint '", path, "' has no ",
                is_buffer ? "buffer " : "parameter ", where, ".", key);
    TORCH_CHECK(source.sizes() == destination.sizes(), "tdfusion: checkpoint '", path, "': ", where, ".", key,
                " has shape ", source.sizes(), " but the module expects ", destination.sizes());
    check_finite(source, "checkpoint '" + path + "': " + where + "." + key);
    pending.push_back({destination, source});
  };
  for (const auto& parameter : module.named_parameters(/*recurse=*/false)) {
    stage(parameter.key(), parameter.value(), /*is_buffer=*/false);
  }
  for (const auto& buffer : module.named_buffers(/*recurse=*/false)) {
    stage(buffer.key(), buffer.value(), /*is_buffer=*/true);
  }
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::InputArchive child_archive;
    TORCH_CHECK(archive.try_read(child.key(), child_archive), "tdfusion: checkpoint '", path,
                "' has no submodule ", where, ".", child.key());
    stage_module(child_archive, *child.value(), where + "." + child.key(), path, pending);
  }
}

inline torch::serialize::InputArchive open_checkpoint(const std::string& path, const torch::Device& device) {
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path, device);
  } catch (const std::exception& error) {
    TORCH_CHECK(false, "tdfusion: '", path, "' is not a readable checkpoint: ",
                error_text(error, "LibTorch cannot load its archive (not a checkpoint, or damaged)"));
  }
  c10::IValue format, version;
  TORCH_CHECK(archive.try_read("format", format) && format.isString() &&
                  format.toStringRef() == kCheckpointFormat,
              "tdfusion: '", path, "' is not a tdfusion checkpoint (no format tag)");
  TORCH_CHECK(archive.try_read("version", version) && version.isInt() &&
                  version.toInt() == kCheckpointVersion,
              "tdfusion: checkpoint '", path, "' has an unsupported version (expected ", kCheckpointVersion, ")");
  return archive;
}

inline torch::serialize::InputArchive sub_archive(torch::serialize::InputArchive& archive, const std::string& key,
                                                  const std::string& what, const std::string& path) {
  torch::serialize::InputArchive sub;
  TORCH_CHECK(archive.try_read(key, sub), "tdfusion: checkpoint '", path, "' has no ", what);
  return sub;
}

/// load_checkpoint's work, once the file is known to exist.
inline void restore_checkpoint(const std::string& path, CheckpointState& state, uint64_t max_bytes) {
  verify_archive(path, max_bytes);
  torch::serialize::InputArchive root = open_checkpoint(path, torch::kCPU);

  // 1. Read and check everything before changing anything.
  std::vector<PendingCopy> pending;
  torch::serialize::InputArchive modules = sub_archive(root, "modules", "module section", path);
  for (const auto& [name, module] : state.modules) {
    TORCH_CHECK(module != nullptr, "tdfusion: checkpoint '", path, "': module '", name, "' is null");
    torch::serialize::InputArchive archive;
    TORCH_CHECK(modules.try_read(name, archive), "tdfusion: checkpoint '", path, "' has no module '", name, "'");
    stage_module(archive, *module, name, path, pending);
  }

  torch::serialize::InputArchive counters = sub_archive(root, "counters", "counter section", path);
  std::map<std::string, int64_t> loaded_counters;
  for (const std::string& key : counters.keys()) {
    torch::Tensor value;
    if (counters.try_read(key, value) && value.defined()) {
      TORCH_CHECK(value.numel() == 1 && value.scalar_type() == torch::kLong, "tdfusion: checkpoint '", path,
                  "': counter '", key, "' is not an integer");
      loaded_counters[key] = value.item<int64_t>();
    }
  }
  for (const auto& counter : state.counters) {
    TORCH_CHECK(loaded_counters.count(counter.first) == 1, "tdfusion: checkpoint '", path, "' has no counter '",
                counter.first, "'");
  }

  torch::serialize::InputArchive optimizers = sub_archive(root, "optimizers", "optimizer section", path);
  for (const auto& [name, optimizer] : state.optimizers) {
    TORCH_CHECK(optimizer != nullptr, "tdfusion: checkpoint '", path, "': optimizer '", name, "' is null");
    torch::serialize::InputArchive archive;
    TORCH_CHECK(optimizers.try_read(name, archive), "tdfusion: checkpoint '", path, "' has no optimizer '", name,
                "'");
    check_archive_finite(std::move(archive), "optimizers." + name, path);
  }

  // 2. Optimizers: their state tensors must live where their parameters are, so the file is mapped to each
  // optimizer's device (read again only for a device other than the CPU).
  for (const auto& [name, optimizer] : state.optimizers) {
    const torch::Device device = optimizer_device(*optimizer);
    torch::serialize::InputArchive device_root;
    torch::serialize::InputArchive* source = &root;
    if (!device.is_cpu()) {
      device_root = open_checkpoint(path, device);
      source = &device_root;
    }
    torch::serialize::InputArchive section = sub_archive(*source, "optimizers", "optimizer section", path);
    torch::serialize::InputArchive archive = sub_archive(section, name, "optimizer '" + name + "'", path);
    try {
      torch::serialize::InputArchive optimizer_state;
      archive.read("state", optimizer_state);
      optimizer->load(optimizer_state);
      torch::Tensor rates;
      if (archive.try_read("lr", rates)) {
        auto& groups = optimizer->param_groups();
        TORCH_CHECK(rates.numel() == static_cast<int64_t>(groups.size()), "tdfusion: it has ", rates.numel(),
                    " parameter groups, the optimizer ", groups.size());
        for (size_t i = 0; i < groups.size(); ++i) {
          groups[i].options().set_lr(rates[static_cast<int64_t>(i)].item<double>());
        }
      }
    } catch (const std::exception& error) {
      TORCH_CHECK(false, "tdfusion: checkpoint '", path, "': cannot load optimizer '", name, "': ",
                  error_text(error, "its state does not fit this optimizer (other parameters or another type)"));
    }
  }

  // 3. Modules and counters.
  {
    torch::NoGradGuard no_grad;
    for (auto& copy : pending) copy.destination.copy_(copy.source);
  }
  for (const auto& [key, value] : loaded_counters) state.counters[key] = value;
}

}  // namespace detail

/// Writes `state` to `path` atomically (an existing file is replaced only once the new one is complete).
inline void save_checkpoint(const std::string& path, const CheckpointState& state) {
  for (const auto& [name, module] : state.modules) {
    detail::check_entry_name(name, "module", path);
    TORCH_CHECK(module != nullptr, "tdfusion: checkpoint '", path, "': module '", name, "' is null");
  }
  for (const auto& [name, optimizer] : state.optimizers) {
    detail::check_entry_name(name, "optimizer", path);
    TORCH_CHECK(optimizer != nullptr, "tdfusion: checkpoint '", path, "': optimizer '", name, "' is null");
  }
  for (const auto& counter : state.counters) detail::check_entry_name(counter.first, "counter", path);

  write_file_atomically(path, [&](FileSink& sink) {
    torch::serialize::OutputArchive root;
    root.write("format", c10::IValue(std::string(kCheckpointFormat)));
    root.write("version", c10::IValue(kCheckpointVersion));

    torch::serialize::OutputArchive modules(root.compilation_unit());
    for (const auto& [name, module] : state.modules) {
      torch::serialize::OutputArchive archive(root.compilation_unit());
      module->save(archive);
      modules.write(name, archive);
    }
    root.write("modules", modules);

    torch::serialize::OutputArchive optimizers(root.compilation_unit());
    for (const auto& [name, optimizer] : state.optimizers) {
      torch::serialize::OutputArchive archive(root.compilation_unit());
      torch::serialize::OutputArchive optimizer_state(root.compilation_unit());
      optimizer->save(optimizer_state);
      archive.write("state", optimizer_state);
      const std::vector<double> rates = detail::group_learning_rates(*optimizer);
      if (!rates.empty()) archive.write("lr", torch::tensor(rates, torch::kDouble));
      optimizers.write(name, archive);
    }
    root.write("optimizers", optimizers);

    torch::serialize::OutputArchive counters(root.compilation_unit());
    for (const auto& [name, value] : state.counters) {
      counters.write(name, torch::tensor(value, torch::kLong));
    }
    root.write("counters", counters);

    root.save_to([&](const void* data, size_t size) { return sink.write(data, size); });
  });
}

/// Restores `state` from `path`: every listed module, optimizer and counter must be in the file (counters
/// in the file but not in `state.counters` are added to it). Modules and counters change only if the whole
/// file checks out; optimizers are loaded after that check, each with its state on its parameters' device.
/// The file's records may take `max_bytes` uncompressed, together.
inline void load_checkpoint(const std::string& path, CheckpointState& state,
                            uint64_t max_bytes = kMaxCheckpointBytes) {
  TORCH_CHECK(std::filesystem::exists(path), "tdfusion: checkpoint '", path, "' does not exist");
  detail::in_plain_words("checkpoint '" + path + "'", [&] { detail::restore_checkpoint(path, state, max_bytes); });
}

}  // namespace tdfusion::io
