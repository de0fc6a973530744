#pragma once
// PyTorch state_dict files (`torch.save(model.state_dict(), path)`, the zip format of PyTorch >= 1.6).
//
// LibTorch's own `torch::pickle_load` rejects them: a state_dict is a collections.OrderedDict carrying a
// `_metadata` attribute, which that unpickler cannot BUILD. The archive is a zip holding `data.pkl` (a
// protocol-2 pickle) and one record per storage under `data/`; this file reads and writes exactly the pickle
// subset that torch.save emits for a state_dict: an OrderedDict of `torch._utils._rebuild_tensor_v2` calls on
// persistent storage ids.

#include "tdfusion/core/param_view.hpp"
#include "tdfusion/io/atomic_file.hpp"

#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>

#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace tdfusion::io {

namespace detail {

/// A value on the unpickler's stack; only the kinds a state_dict pickle produces.
struct PickleValue {
  enum class Kind { none, boolean, integer, string, tuple, dict, global, storage, tensor, mark };
  Kind kind = Kind::none;
  int64_t integer = 0;
  std::string text;                                  // string, or "module.name" of a global
  std::vector<std::shared_ptr<PickleValue>> items;   // tuple items, or dict keys and values interleaved
  torch::Tensor tensor;                              // storage (flat) or tensor
};
using PickleValuePtr = std::shared_ptr<PickleValue>;

inline PickleValuePtr make_value(PickleValue::Kind kind) {
  auto v = std::make_shared<PickleValue>();
  v->kind = kind;
  return v;
}

inline torch::Dtype storage_dtype(const std::string& global, const std::string& file) {
  static const std::map<std::string, torch::Dtype> dtypes = {
      {"torch.FloatStorage", torch::kFloat32}, {"torch.DoubleStorage", torch::kFloat64},
      {"torch.HalfStorage", torch::kFloat16},  {"torch.BFloat16Storage", torch::kBFloat16},
      {"torch.LongStorage", torch::kInt64},    {"torch.IntStorage", torch::kInt32},
      {"torch.ShortStorage", torch::kInt16},   {"torch.CharStorage", torch::kInt8},
      {"torch.ByteStorage", torch::kUInt8},    {"torch.BoolStorage", torch::kBool}};
  const auto found = dtypes.find(global);
  TORCH_CHECK(found != dtypes.end(), "tdfusion: ", file, ": unsupported storage type ", global);
  return found->second;
}

/// Executes the pickle in `bytes`; storages are read from `archive`.
class StateDictUnpickler {
 public:
  StateDictUnpickler(const std::string& bytes, caffe2::serialize::PyTorchStreamReader& archive, std::string file)
      : bytes_(bytes), archive_(archive), file_(std::move(file)) {}

  PickleValuePtr run() {
    while (true) {
      const auto op = static_cast<unsigned char>(read_bytes(1)[0]);
      switch (op) {
        case 0x80: read_bytes(1); break;                                          // PROTO
        case 0x95: read_bytes(8); break;                                          // FRAME
        case '(': push(make_value(PickleValue::Kind::mark)); break;               // MARK
        case ')': push(make_value(PickleValue::Kind::tuple)); break;              // EMPTY_TUPLE
        case '}': push(make_value(PickleValue::Kind::dict)); break;               // EMPTY_DICT
        case 'N': push(make_value(PickleValue::Kind::none)); break;               // NONE
        case 0x88: case 0x89: {                                                   // NEWTRUE, NEWFALSE
          auto v = make_value(PickleValue::Kind::boolean);
          v->integer = op == 0x88;
          push(v);
          break;
        }
        case 'K': push_integer(read_uint(1)); break;                              // BININT1
        case 'M': push_integer(read_uint(2)); break;                              // BININT2
        case 'J': push_integer(static_cast<int32_t>(read_uint(4))); break;        // BININT
        case 0x8a: {                                                              // LONG1
          const auto n = read_uint(1);
          TORCH_CHECK(n <= 8, "tdfusion: ", file_, ": integer too large in data.pkl");
          const std::string raw = read_bytes(n);
          int64_t value = 0;
          for (size_t i = 0; i < n; ++i) value |= static_cast<int64_t>(static_cast<unsigned char>(raw[i])) << (8 * i);
          if (n > 0 && n < 8 && (static_cast<unsigned char>(raw[n - 1]) & 0x80)) value -= int64_t{1} << (8 * n);
          push_integer(value);
          break;
        }
        case 'X': push_string(read_bytes(read_uint(4))); break;                   // BINUNICODE
        case 0x8c: push_string(read_bytes(read_uint(1))); break;                  // SHORT_BINUNICODE
        case 'c': {                                                               // GLOBAL
          auto v = make_value(PickleValue::Kind::global);
          const std::string module = read_line();
          v->text = module + "." + read_line();
          push(v);
          break;
        }
        case 'q': memo_[read_uint(1)] = top(); break;                             // BINPUT
        case 'r': memo_[read_uint(4)] = top(); break;                             // LONG_BINPUT
        case 'h': push(memo(read_uint(1))); break;                                // BINGET
        case 'j': push(memo(read_uint(4))); break;                                // LONG_BINGET
        case 't': {                                                               // TUPLE
          auto v = make_value(PickleValue::Kind::tuple);
          v->items = pop_to_mark();
          push(v);
          break;
        }
        case 0x85: case 0x86: case 0x87: {                                        // TUPLE1..3
          auto v = make_value(PickleValue::Kind::tuple);
          v->items.resize(op - 0x84);
          for (auto it = v->items.rbegin(); it != v->items.rend(); ++it) *it = pop();
          push(v);
          break;
        }
        case 's': {                                                               // SETITEM
          auto value = pop(), key = pop();
          dict_top()->items.insert(dict_top()->items.end(), {key, value});
          break;
        }
        case 'u': {                                                               // SETITEMS
          auto entries = pop_to_mark();
          auto& items = dict_top()->items;
          items.insert(items.end(), entries.begin(), entries.end());
          break;
        }
        case 'Q': push(load_storage(pop())); break;                               // BINPERSID
        case 'R': {                                                               // REDUCE
          auto args = pop(), callable = pop();
          push(reduce(callable, args));
          break;
        }
        case 'b': pop(); break;  // BUILD: the OrderedDict's `_metadata` (per-module versions) is not needed
        case '.': return pop();                                                   // STOP
        default:
          TORCH_CHECK(false, "tdfusion: ", file_, ": unsupported pickle opcode 0x", std::hex, int(op),
                      " in data.pkl (not a plain state_dict?)");
      }
    }
  }

 private:
  std::string read_bytes(size_t n) {
    TORCH_CHECK(pos_ + n <= bytes_.size(), "tdfusion: ", file_, ": data.pkl is truncated");
    std::string out = bytes_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  uint64_t read_uint(size_t n) {
    const std::string raw = read_bytes(n);
    uint64_t value = 0;
    for (size_t i = 0; i < n; ++i) value |= static_cast<uint64_t>(static_cast<unsigned char>(raw[i])) << (8 * i);
    return value;
  }
  std::string read_line() {
    const size_t end = bytes_.find('\n', pos_);
    TORCH_CHECK(end != std::string::npos, "tdfusion: ", file_, ": data.pkl is truncated");
    std::string line = bytes_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return line;
  }
  void push(PickleValuePtr v) { stack_.push_back(std::move(v)); }
  void push_integer(int64_t value) {
    auto v = make_value(PickleValue::Kind::integer);
    v->integer = value;
    push(v);
  }
  void push_string(std::string text) {
    auto v = make_value(PickleValue::Kind::string);
    v->text = std::move(text);
    push(v);
  }
  PickleValuePtr top() const {
    TORCH_CHECK(!stack_.empty(), "tdfusion: ", file_, ": malformed data.pkl (empty stack)");
    return stack_.back();
  }
  PickleValuePtr pop() {
    PickleValuePtr v = top();
    stack_.pop_back();
    return v;
  }
  PickleValuePtr dict_top() const {
    PickleValuePtr d = top();
    TORCH_CHECK(d->kind == PickleValue::Kind::dict, "tdfusion: ", file_, ": malformed data.pkl (SETITEM on a non-dict)");
    return d;
  }
  PickleValuePtr memo(uint64_t key) const {
    const auto found = memo_.find(key);
    TORCH_CHECK(found != memo_.end(), "tdfusion: ", file_, ": malformed data.pkl (unknown memo ", key, ")");
    return found->second;
  }
  std::vector<PickleValuePtr> pop_to_mark() {
    std::vector<PickleValuePtr> items;
    while (top()->kind != PickleValue::Kind::mark) items.insert(items.begin(), pop());
    pop();
    return items;
  }

  PickleValuePtr load_storage(const PickleValuePtr& pid) {
    // ('storage', <storage type global>, key, location, numel)
    TORCH_CHECK(pid->kind == PickleValue::Kind::tuple && pid->items.size() == 5 && pid->items[0]->text == "storage",
                "tdfusion: ", file_, ": unsupported persistent id in data.pkl");
    const std::string& key = pid->items[2]->text;
    auto cached = storages_.find(key);
    if (cached == storages_.end()) {
      const torch::Dtype dtype = storage_dtype(pid->items[1]->text, file_);
      const int64_t numel = pid->items[4]->integer;
      const std::string record = "data/" + key;
      TORCH_CHECK(archive_.hasRecord(record), "tdfusion: ", file_, ": storage record ", record, " is missing");
      auto [data, size] = archive_.getRecord(record);
      const auto element = torch::elementSize(dtype);
      TORCH_CHECK(size == static_cast<size_t>(numel) * element, "tdfusion: ", file_, ": storage ", record, " holds ",
                  size, " bytes, expected ", numel * element);
      torch::Tensor flat = torch::empty({numel}, torch::TensorOptions().dtype(dtype));
      if (size > 0) std::memcpy(flat.data_ptr(), data.get(), size);  // little-endian, as torch.save writes
      cached = storages_.emplace(key, flat).first;
    }
    auto v = make_value(PickleValue::Kind::storage);
    v->tensor = cached->second;
    return v;
  }

  static std::vector<int64_t> integers(const PickleValuePtr& tuple) {
    std::vector<int64_t> out;
    for (const auto& item : tuple->items) out.push_back(item->integer);
    return out;
  }

  PickleValuePtr reduce(const PickleValuePtr& callable, const PickleValuePtr& args) {
    TORCH_CHECK(callable->kind == PickleValue::Kind::global, "tdfusion: ", file_, ": malformed data.pkl (REDUCE)");
    if (callable->text == "collections.OrderedDict") return make_value(PickleValue::Kind::dict);
    if (callable->text == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      TORCH_CHECK(args->items.size() >= 4 && args->items[0]->kind == PickleValue::Kind::storage, "tdfusion: ", file_,
                  ": malformed tensor in data.pkl");
      auto v = make_value(PickleValue::Kind::tensor);
      v->tensor = args->items[0]->tensor.as_strided(integers(args->items[2]), integers(args->items[3]),
                                                    args->items[1]->integer);
      return v;
    }
    if (callable->text == "torch._utils._rebuild_parameter") return args->items.at(0);  // (tensor, grad, hooks)
    TORCH_CHECK(false, "tdfusion: ", file_, ": data.pkl calls ", callable->text,
                ", which a plain state_dict does not (only tensors are supported)");
  }

  const std::string& bytes_;
  caffe2::serialize::PyTorchStreamReader& archive_;
  std::string file_;
  size_t pos_ = 0;
  std::vector<PickleValuePtr> stack_;
  std::map<uint64_t, PickleValuePtr> memo_;
  std::map<std::string, torch::Tensor> storages_;
};

}  // namespace detail

/// Reads a state_dict saved by `torch.save` (zip format) from a stream; `name` names it in messages.
/// Tensors that shared a storage in Python share it here too (e.g. the released `<name>.weight` /
/// `<name>.conv.weight` pairs).
inline ParamDict read_torch_state_dict(std::istream& in, const std::string& name) {
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> archive;
  try {
    archive = std::make_unique<caffe2::serialize::PyTorchStreamReader>(&in);
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "tdfusion: ", name, " is not a PyTorch zip archive (torch.save with the default zip format "
                "is required; legacy pre-1.6 files are not supported)");
  }
  TORCH_CHECK(archive->hasRecord("data.pkl"), "tdfusion: ", name, " has no data.pkl: not a torch.save file");
  auto [data, size] = archive->getRecord("data.pkl");
  const std::string bytes(static_cast<const char*>(data.get()), size);
  const detail::PickleValuePtr root = detail::StateDictUnpickler(bytes, *archive, name).run();
  TORCH_CHECK(root->kind == detail::PickleValue::Kind::dict, "tdfusion: ", name, " does not hold a dictionary");
  ParamDict dict;
  for (size_t i = 0; i + 1 < root->items.size(); i += 2) {
    const auto& key = root->items[i];
    const auto& value = root->items[i + 1];
    TORCH_CHECK(key->kind == detail::PickleValue::Kind::string && value->kind == detail::PickleValue::Kind::tensor,
                "tdfusion: ", name, ": entry ", i / 2, " is not a name -> tensor pair");
    dict.insert(key->text, value->tensor);
  }
  return dict;
}

/// Reads a state_dict file saved by `torch.save` (zip format).
inline ParamDict read_torch_state_dict(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file.good(), "tdfusion: cannot open ", path, ": ", std::strerror(errno));
  return read_torch_state_dict(file, path);
}

namespace detail {

/// Appends the protocol-2 pickle of a state_dict: an OrderedDict of _rebuild_tensor_v2 calls on persistent
/// storages, the layout torch.save writes (without the optional `_metadata` attribute).
class StateDictPickler {
 public:
  void global(const std::string& module, const std::string& name) { out_ += 'c' + module + '\n' + name + '\n'; }
  void string(const std::string& text) {
    out_ += 'X';
    uint32(static_cast<uint32_t>(text.size()));
    out_ += text;
  }
  void integer(int64_t value) {
    TORCH_CHECK(value >= INT32_MIN && value <= INT32_MAX, "tdfusion: tensor dimension too large to save: ", value);
    out_ += 'J';
    uint32(static_cast<uint32_t>(static_cast<int32_t>(value)));
  }
  void integers(torch::IntArrayRef values) {
    out_ += '(';
    for (const int64_t v : values) integer(v);
    out_ += 't';
  }
  void raw(char opcode) { out_ += opcode; }
  const std::string& bytes() const { return out_; }

 private:
  void uint32(uint32_t value) {
    for (int i = 0; i < 4; ++i) out_ += static_cast<char>((value >> (8 * i)) & 0xff);
  }
  std::string out_ = "\x80\x02";  // PROTO 2
};

inline std::string storage_type(torch::Dtype dtype) {
  switch (dtype) {
    case torch::kFloat32: return "FloatStorage";
    case torch::kFloat64: return "DoubleStorage";
    case torch::kFloat16: return "HalfStorage";
    case torch::kBFloat16: return "BFloat16Storage";
    case torch::kInt64: return "LongStorage";
    case torch::kInt32: return "IntStorage";
    case torch::kUInt8: return "ByteStorage";
    case torch::kBool: return "BoolStorage";
    default: TORCH_CHECK(false, "tdfusion: cannot save tensors of type ", dtype);
  }
}

}  // namespace detail

/// Writes `state` as `torch.save(state_dict)` would (zip format, readable by torch.load), atomically.
/// Entries that are the same tensor share one storage, as aliased parameters do in PyTorch.
inline void write_torch_state_dict(const std::string& path, const ParamDict& state) {
  detail::StateDictPickler pickle;
  std::vector<std::pair<std::string, torch::Tensor>> storages;  // record key -> contiguous CPU data
  pickle.global("collections", "OrderedDict");
  pickle.raw(')');
  pickle.raw('R');
  pickle.raw('(');
  for (const auto& item : state) {
    const torch::Tensor& tensor = item.value();
    std::string key;
    for (size_t i = 0; i < storages.size() && key.empty(); ++i)
      if (state[i].value().is_same(tensor)) key = storages[i].first;
    if (key.empty()) key = std::to_string(storages.size());
    storages.emplace_back(key, tensor.detach().to(torch::kCPU).contiguous());
    pickle.string(item.key());
    pickle.global("torch._utils", "_rebuild_tensor_v2");
    pickle.raw('(');
    pickle.raw('(');
    pickle.string("storage");
    pickle.global("torch", detail::storage_type(tensor.scalar_type()));
    pickle.string(key);
    pickle.string("cpu");
    pickle.integer(tensor.numel());
    pickle.raw('t');
    pickle.raw('Q');                      // BINPERSID
    pickle.integer(0);                    // storage offset
    pickle.integers(tensor.sizes());
    pickle.integers(storages.back().second.strides());
    pickle.raw('\x89');                  // requires_grad = False
    pickle.global("collections", "OrderedDict");
    pickle.raw(')');
    pickle.raw('R');                      // backward hooks: an empty OrderedDict
    pickle.raw('t');
    pickle.raw('R');
  }
  pickle.raw('u');
  pickle.raw('.');

  write_file_atomically(path, [&](FileSink& sink) {
    caffe2::serialize::PyTorchStreamWriter writer(
        [&sink](const void* data, size_t size) { return sink.write(data, size); });
    writer.writeRecord("data.pkl", pickle.bytes().data(), pickle.bytes().size());
    std::set<std::string> written;
    for (const auto& [key, data] : storages)
      if (written.insert(key).second)
        writer.writeRecord("data/" + key, data.data_ptr(), data.numel() * data.element_size());
    writer.writeEndOfFile();
  });
}

/// Copies a state_dict into `module`'s parameters and buffers, checking every name and shape. Accepts the
/// released TDFusion layout, in which every convolution weight also appears as `<name>.conv.weight` (the two
/// must then be equal). `source` names the file in error messages.
inline void load_state_dict(torch::nn::Module& module, const ParamDict& state, const std::string& source) {
  const std::string alias = ".conv.weight";
  std::map<std::string, torch::Tensor> entries;
  for (const auto& item : state) {
    std::string name = item.key();
    if (name.size() > alias.size() && name.compare(name.size() - alias.size(), alias.size(), alias) == 0)
      name = name.substr(0, name.size() - alias.size()) + ".weight";
    const auto [it, inserted] = entries.emplace(name, item.value());
    TORCH_CHECK(inserted || torch::equal(it->second, item.value()), "tdfusion: ", source, ": ", item.key(),
                " differs from its twin ", name);
  }
  ParamDict targets = module.named_parameters();
  for (const auto& b : module.named_buffers()) targets.insert(b.key(), b.value());
  torch::NoGradGuard no_grad;
  for (const auto& target : targets) {
    const auto found = entries.find(target.key());
    TORCH_CHECK(found != entries.end(), "tdfusion: ", source, " has no entry '", target.key(), "'");
    TORCH_CHECK(found->second.sizes() == target.value().sizes(), "tdfusion: ", source, ": '", target.key(),
                "' has shape ", found->second.sizes(), ", the network expects ", target.value().sizes());
    target.value().copy_(found->second);
    entries.erase(found);
  }
  if (!entries.empty()) {
    std::string unknown;
    for (const auto& e : entries) unknown += (unknown.empty() ? "" : ", ") + e.first;
    TORCH_CHECK(false, "tdfusion: ", source, " has entries the network does not know: ", unknown);
  }
}

/// The module's parameters and buffers in the released layout: every 4-D `<name>.weight` (a convolution)
/// also appears as `<name>.conv.weight`, sharing the tensor.
inline ParamDict released_layout(const torch::nn::Module& module) {
  ParamDict out;
  for (const auto& p : module.named_parameters()) {
    out.insert(p.key(), p.value());
    const std::string suffix = ".weight";
    const std::string& name = p.key();
    if (p.value().dim() == 4 && name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      out.insert(name.substr(0, name.size() - suffix.size()) + ".conv.weight", p.value());
  }
  for (const auto& b : module.named_buffers()) out.insert(b.key(), b.value());
  return out;
}

/// Loads a `torch.save`d state_dict file into `module` (see load_state_dict).
inline void load_torch_state_dict(torch::nn::Module& module, const std::string& path) {
  load_state_dict(module, read_torch_state_dict(path), path);
}

}  // namespace tdfusion::io
