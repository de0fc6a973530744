#pragma once
// PyTorch state_dict files (`torch.save(model.state_dict(), path)`, the zip format of PyTorch >= 1.6).
//
// LibTorch's own `torch::pickle_load` rejects them: a state_dict is a collections.OrderedDict carrying a
// `_metadata` attribute, which that unpickler cannot BUILD. The archive is a zip holding `data.pkl` (a
// protocol-2 pickle) and one record per storage under `data/`; this file reads and writes exactly the pickle
// subset that torch.save emits for a state_dict: an OrderedDict of `torch._utils._rebuild_tensor_v2` calls on
// persistent storage ids.

#include "tdfusion/core/checks.hpp"
#include "tdfusion/core/param_view.hpp"
#include "tdfusion/io/atomic_file.hpp"
#include "tdfusion/io/zip_archive.hpp"

#include <caffe2/serialize/inline_container.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace tdfusion::io {

/// What reading a state_dict may allocate. The sizes a file declares are checked against these bounds (and
/// every tensor against its storage) before anything is inflated or allocated. For scale: ReFusion's state_dict
/// has 0.24 MB of tensors and a 23 KB pickle (160 bytes per entry); parsing takes up to about 100 bytes of
/// memory per byte of pickle.
inline constexpr uint64_t kMaxStateDictPickleBytes = uint64_t{1} << 20;  ///< data.pkl
inline constexpr uint64_t kMaxStateDictBytes = uint64_t{512} << 20;      ///< all storages (default of max_bytes)

namespace detail {

/// A value of the state_dict pickle. Values live in one arena and refer to each other by index, so neither
/// building nor destroying them recurses, however deeply a file nests them, and cyclic ones cannot leak.
struct PickleValue {
  enum class Kind { none, boolean, integer, string, tuple, dict, global, storage, tensor };
  Kind kind = Kind::none;
  int64_t integer = 0;                 // integer or boolean; a storage's element count
  std::string text;                    // string; "module.name" of a global; a storage's record key
  torch::Dtype dtype = torch::kFloat;  // storage
  std::vector<size_t> items;           // tuple items; dict keys and values interleaved;
                                       // a tensor's (storage, offset, sizes, strides)
};

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

/// Executes the pickle in `bytes` (data.pkl) into an arena of values. Time and memory are linear in its
/// size; tensors are only described here (storage, offset, sizes, strides) and checked once their names
/// are known.
class StateDictUnpickler {
 public:
  using Kind = PickleValue::Kind;

  StateDictUnpickler(const std::string& bytes, std::string file) : bytes_(bytes), file_(std::move(file)) {
    // Immutable values are made once and shared: a file of a million NONEs costs a million stack slots.
    none_ = make(Kind::none);
    true_ = make(Kind::boolean);
    values_[true_].integer = 1;
    false_ = make(Kind::boolean);
    empty_tuple_ = make(Kind::tuple);
  }

  /// Runs the pickle to its STOP and returns the index of the result.
  size_t run() {
    while (true) {
      const auto op = static_cast<unsigned char>(read_bytes(1)[0]);
      switch (op) {
        case 0x80: read_bytes(1); break;                                          // PROTO
        case 0x95: read_bytes(8); break;                                          // FRAME
        case '(': marks_.push_back(stack_.size()); break;                         // MARK
        case ')': push(empty_tuple_); break;                                      // EMPTY_TUPLE
        case '}': push(make(Kind::dict)); break;                                  // EMPTY_DICT
        case 'N': push(none_); break;                                             // NONE
        case 0x88: push(true_); break;                                            // NEWTRUE
        case 0x89: push(false_); break;                                           // NEWFALSE
        case 'K': push_integer(read_uint(1)); break;                              // BININT1
        case 'M': push_integer(read_uint(2)); break;                              // BININT2
        case 'J': push_integer(static_cast<int32_t>(read_uint(4))); break;        // BININT
        case 0x8a: {                                                              // LONG1
          const auto n = read_uint(1);
          TORCH_CHECK(n <= 8, "tdfusion: ", file_, ": integer too large in data.pkl");
          const uint64_t raw = read_uint(n);
          const bool negative = n > 0 && n < 8 && (raw >> (8 * n - 1)) & 1;
          push_integer(static_cast<int64_t>(negative ? raw | (~uint64_t{0} << (8 * n)) : raw));
          break;
        }
        case 'X': push_string(read_bytes(read_uint(4))); break;                   // BINUNICODE
        case 0x8c: push_string(read_bytes(read_uint(1))); break;                  // SHORT_BINUNICODE
        case 'c': {                                                               // GLOBAL
          const size_t v = make(Kind::global);
          const std::string module = read_line();
          values_[v].text = module + "." + read_line();
          push(v);
          break;
        }
        case 'q': memo_[read_uint(1)] = top(); break;                             // BINPUT
        case 'r': memo_[read_uint(4)] = top(); break;                             // LONG_BINPUT
        case 'h': push(memo(read_uint(1))); break;                                // BINGET
        case 'j': push(memo(read_uint(4))); break;                                // LONG_BINGET
        case 't': {                                                               // TUPLE
          std::vector<size_t> items = pop_to_mark();
          const size_t v = make(Kind::tuple);
          values_[v].items = std::move(items);
          push(v);
          break;
        }
        case 0x85: case 0x86: case 0x87: {                                        // TUPLE1..3
          std::vector<size_t> items(op - 0x84);
          for (auto it = items.rbegin(); it != items.rend(); ++it) *it = pop();
          const size_t v = make(Kind::tuple);
          values_[v].items = std::move(items);
          push(v);
          break;
        }
        case 's': {                                                               // SETITEM
          const size_t value = pop(), key = pop();
          auto& items = values_[dict_top()].items;
          items.push_back(key);
          items.push_back(value);
          break;
        }
        case 'u': {                                                               // SETITEMS
          const std::vector<size_t> entries = pop_to_mark();
          TORCH_CHECK(entries.size() % 2 == 0, "tdfusion: ", file_, ": malformed data.pkl (SETITEMS of an odd count)");
          auto& items = values_[dict_top()].items;
          items.insert(items.end(), entries.begin(), entries.end());
          break;
        }
        case 'Q': push(storage(pop())); break;                                    // BINPERSID
        case 'R': {                                                               // REDUCE
          const size_t args = pop(), callable = pop();
          push(reduce(callable, args));
          break;
        }
        case 'b': pop(); top(); break;  // BUILD: the OrderedDict's `_metadata` (per-module versions) is not needed
        case '.': return pop();                                                   // STOP
        default:
          TORCH_CHECK(false, "tdfusion: ", file_, ": unsupported pickle opcode 0x", std::hex, int(op),
                      " in data.pkl (not a plain state_dict?)");
      }
    }
  }

  const PickleValue& operator[](size_t index) const { return values_[index]; }

 private:
  std::string read_bytes(uint64_t n) {
    TORCH_CHECK(n <= bytes_.size() - pos_, "tdfusion: ", file_, ": data.pkl is truncated");
    std::string out = bytes_.substr(pos_, n);
    pos_ += n;
    return out;
  }
  uint64_t read_uint(uint64_t n) {
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
  size_t make(Kind kind) {
    values_.emplace_back();
    values_.back().kind = kind;
    return values_.size() - 1;
  }
  void push(size_t v) { stack_.push_back(v); }
  void push_integer(int64_t value) {
    const size_t v = make(Kind::integer);
    values_[v].integer = value;
    push(v);
  }
  void push_string(std::string text) {
    const size_t v = make(Kind::string);
    values_[v].text = std::move(text);
    push(v);
  }
  /// The stack above the innermost MARK is all an opcode may take from.
  size_t top() const {
    TORCH_CHECK(stack_.size() > (marks_.empty() ? 0 : marks_.back()), "tdfusion: ", file_,
                ": malformed data.pkl (stack underflow)");
    return stack_.back();
  }
  size_t pop() {
    const size_t v = top();
    stack_.pop_back();
    return v;
  }
  std::vector<size_t> pop_to_mark() {
    TORCH_CHECK(!marks_.empty(), "tdfusion: ", file_, ": malformed data.pkl (no MARK)");
    const auto begin = stack_.begin() + static_cast<std::ptrdiff_t>(marks_.back());
    std::vector<size_t> items(begin, stack_.end());
    stack_.erase(begin, stack_.end());
    marks_.pop_back();
    return items;
  }
  size_t dict_top() const {
    const size_t d = top();
    TORCH_CHECK(values_[d].kind == Kind::dict, "tdfusion: ", file_, ": malformed data.pkl (SETITEM on a non-dict)");
    return d;
  }
  size_t memo(uint64_t key) const {
    const auto found = memo_.find(key);
    TORCH_CHECK(found != memo_.end(), "tdfusion: ", file_, ": malformed data.pkl (unknown memo ", key, ")");
    return found->second;
  }
  bool is(size_t v, Kind kind) const { return values_[v].kind == kind; }

  /// A persistent id ('storage', <storage type>, key, location, numel) becomes a storage description; its
  /// record is read only once everything that refers to it has been checked.
  size_t storage(size_t pid) {
    const auto& items = values_[pid].items;
    TORCH_CHECK(is(pid, Kind::tuple) && items.size() == 5 && is(items[0], Kind::string) &&
                    values_[items[0]].text == "storage" && is(items[1], Kind::global) && is(items[2], Kind::string) &&
                    is(items[4], Kind::integer) && values_[items[4]].integer >= 0,
                "tdfusion: ", file_, ": unsupported persistent id in data.pkl");
    const torch::Dtype dtype = storage_dtype(values_[items[1]].text, file_);
    const std::string key = values_[items[2]].text;
    const int64_t numel = values_[items[4]].integer;
    const size_t v = make(Kind::storage);
    values_[v].dtype = dtype;
    values_[v].text = key;
    values_[v].integer = numel;
    return v;
  }

  size_t reduce(size_t callable, size_t args) {
    TORCH_CHECK(is(callable, Kind::global) && is(args, Kind::tuple), "tdfusion: ", file_,
                ": malformed data.pkl (REDUCE)");
    const std::string name = values_[callable].text;
    const std::vector<size_t> items = values_[args].items;
    if (name == "collections.OrderedDict") return make(Kind::dict);
    if (name == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      TORCH_CHECK(items.size() >= 4 && is(items[0], Kind::storage), "tdfusion: ", file_,
                  ": malformed tensor in data.pkl");
      const size_t v = make(Kind::tensor);
      values_[v].items.assign(items.begin(), items.begin() + 4);
      return v;
    }
    if (name == "torch._utils._rebuild_parameter") {  // (tensor, requires_grad, backward_hooks)
      TORCH_CHECK(!items.empty() && is(items[0], Kind::tensor), "tdfusion: ", file_,
                  ": malformed parameter in data.pkl");
      return items[0];
    }
    TORCH_CHECK(false, "tdfusion: ", file_, ": data.pkl calls ", name,
                ", which a plain state_dict does not (only tensors are supported)");
  }

  const std::string& bytes_;
  std::string file_;
  size_t pos_ = 0;
  std::vector<PickleValue> values_;
  std::vector<size_t> stack_;
  std::vector<size_t> marks_;  // stack sizes at each open MARK
  std::unordered_map<uint64_t, size_t> memo_;
  size_t none_, true_, false_, empty_tuple_;
};

/// One tensor of the state_dict, checked against its storage but not yet read.
struct TensorPlan {
  std::string key;
  std::string storage, record;  // the storage's key, and its record "data/<key>"
  int64_t offset = 0;
  std::vector<int64_t> sizes, strides;
};

/// The integers of a tuple value, each >= 0; `what` names them in messages.
inline std::vector<int64_t> non_negative_integers(const StateDictUnpickler& pickle, size_t tuple,
                                                  const std::string& what) {
  using Kind = PickleValue::Kind;
  TORCH_CHECK(pickle[tuple].kind == Kind::tuple && pickle[tuple].items.size() <= 64, what,
              " is not a tuple of at most 64 integers");
  std::vector<int64_t> out;
  for (const size_t item : pickle[tuple].items) {
    TORCH_CHECK(pickle[item].kind == Kind::integer && pickle[item].integer >= 0, what,
                " holds something other than a non-negative integer");
    out.push_back(pickle[item].integer);
  }
  return out;
}

/// Checks that the tensor `key` (sizes, strides, offset) addresses only elements 0 .. storage_numel - 1 and no
/// more elements than the storage holds (a stride-0 tensor would otherwise make a large tensor of a few bytes).
inline void check_tensor_fits(const std::string& file, const std::string& key, const TensorPlan& plan,
                              int64_t storage_numel) {
  const std::string where = "tdfusion: " + file + ": '" + key + "'";
  int64_t numel = 1;
  if (std::find(plan.sizes.begin(), plan.sizes.end(), 0) != plan.sizes.end()) {
    numel = 0;
  } else {
    for (const int64_t size : plan.sizes) {
      TORCH_CHECK(!__builtin_mul_overflow(numel, size, &numel) && numel <= storage_numel, where, " has shape ",
                  c10::IntArrayRef(plan.sizes), ", more elements than its storage ", plan.record, " holds (",
                  storage_numel, ")");
    }
  }
  if (numel == 0) {
    TORCH_CHECK(plan.offset <= storage_numel, where, " starts at element ", plan.offset, " of its storage ",
                plan.record, ", which holds ", storage_numel);
    return;
  }
  int64_t last = plan.offset;  // the highest element the tensor addresses
  for (size_t d = 0; d < plan.sizes.size(); ++d) {
    int64_t reach = 0;
    TORCH_CHECK(!__builtin_mul_overflow(plan.sizes[d] - 1, plan.strides[d], &reach) &&
                    !__builtin_add_overflow(last, reach, &last) && last < storage_numel,
                where, " (shape ", c10::IntArrayRef(plan.sizes), ", strides ", c10::IntArrayRef(plan.strides),
                ", offset ", plan.offset, ") reaches beyond its storage ", plan.record, ", which holds ",
                storage_numel, " elements");
  }
}

inline ParamDict read_state_dict_archive(std::istream& in, const std::string& name, uint64_t max_bytes) {
  using Kind = PickleValue::Kind;
  ZipArchive archive(in, name);
  const std::string folder = archive.folder();
  TORCH_CHECK(!folder.empty(), "tdfusion: ", name, " is not a torch.save file (its records are not in a folder)");

  const ZipEntry* pickle_entry = archive.find(folder + "data.pkl");
  TORCH_CHECK(pickle_entry != nullptr, "tdfusion: ", name, " has no data.pkl: not a torch.save file");
  if (const ZipEntry* order = archive.find(folder + "byteorder")) {
    TORCH_CHECK(archive.read_string(*order, 16) == "little", "tdfusion: ", name,
                " was saved big-endian, which is not supported");
  }
  const std::string bytes = archive.read_string(*pickle_entry, kMaxStateDictPickleBytes);
  StateDictUnpickler pickle(bytes, name);
  const size_t root = pickle.run();
  TORCH_CHECK(pickle[root].kind == Kind::dict, "tdfusion: ", name, " does not hold a dictionary");

  // 1. Check every entry against its storage's declared size, and the storages against the budget.
  struct Storage {
    const ZipEntry* entry;
    torch::Dtype dtype;
    int64_t numel;
  };
  std::map<std::string, Storage> storages;
  std::vector<TensorPlan> plans;
  std::set<std::string> keys;
  uint64_t total_bytes = 0;
  const auto& items = pickle[root].items;
  for (size_t i = 0; i + 1 < items.size(); i += 2) {
    const PickleValue& key = pickle[items[i]];
    const PickleValue& value = pickle[items[i + 1]];
    TORCH_CHECK(key.kind == Kind::string && value.kind == Kind::tensor, "tdfusion: ", name, ": entry ", i / 2,
                " is not a name -> tensor pair");
    TORCH_CHECK(keys.insert(key.text).second, "tdfusion: ", name, ": '", key.text, "' appears twice");
    const std::string where = "tdfusion: " + name + ": '" + key.text + "'";
    const PickleValue& storage = pickle[value.items[0]];
    const PickleValue& offset = pickle[value.items[1]];
    TensorPlan plan;
    plan.key = key.text;
    plan.storage = storage.text;
    plan.record = "data/" + storage.text;
    TORCH_CHECK(offset.kind == Kind::integer && offset.integer >= 0, where, " has an invalid storage offset");
    plan.offset = offset.integer;
    plan.sizes = non_negative_integers(pickle, value.items[2], where + ": its shape");
    plan.strides = non_negative_integers(pickle, value.items[3], where + ": its strides");
    TORCH_CHECK(plan.sizes.size() == plan.strides.size(), where, " has ", plan.sizes.size(), " sizes but ",
                plan.strides.size(), " strides");

    auto known = storages.find(storage.text);
    if (known == storages.end()) {
      const ZipEntry* entry = archive.find(folder + plan.record);
      TORCH_CHECK(entry != nullptr, "tdfusion: ", name, ": storage record ", plan.record, " of '", key.text,
                  "' is missing");
      const uint64_t element = torch::elementSize(storage.dtype);
      const uint64_t numel = static_cast<uint64_t>(storage.integer);
      TORCH_CHECK(numel <= (max_bytes - total_bytes) / element, "tdfusion: ", name, ": the tensors need more than ",
                  max_bytes, " bytes (storage ", plan.record, " of '", key.text, "' declares ", numel,
                  " elements); raise the limit (max_bytes) for files this large");
      TORCH_CHECK(entry->size == numel * element, "tdfusion: ", name, ": storage ", plan.record, " holds ",
                  entry->size, " bytes, expected ", numel * element, " (", numel, " elements of ", element,
                  " bytes)");
      total_bytes += numel * element;
      known = storages.emplace(storage.text, Storage{entry, storage.dtype, storage.integer}).first;
    }
    TORCH_CHECK(known->second.dtype == storage.dtype && known->second.numel == storage.integer, where,
                " describes its storage ", plan.record, " differently from an earlier entry");
    check_tensor_fits(name, key.text, plan, storage.integer);
    plans.push_back(std::move(plan));
  }

  // 2. Read the storages (each checked against its CRC) and make the tensors.
  std::map<std::string, torch::Tensor> flat;
  for (const auto& [key, storage] : storages) {
    torch::Tensor data = torch::empty({storage.numel}, torch::TensorOptions().dtype(storage.dtype));
    archive.read_into(*storage.entry, data.data_ptr());  // little-endian, as torch.save writes
    flat.emplace(key, data);
  }
  ParamDict dict;
  for (const TensorPlan& plan : plans) {
    dict.insert(plan.key, flat.at(plan.storage).as_strided(plan.sizes, plan.strides, plan.offset));
  }
  return dict;
}

}  // namespace detail

/// Reads a state_dict saved by `torch.save` (zip format) from a stream; `name` names it in messages.
/// Tensors that shared a storage in Python share it here too (e.g. the released `<name>.weight` /
/// `<name>.conv.weight` pairs). The file may come from anyone: it is refused, with a message naming it and
/// the problem, when a record fails its CRC-32, data.pkl exceeds kMaxStateDictPickleBytes, the storages
/// together exceed `max_bytes`, or a tensor addresses more than its storage holds; nothing is allocated for
/// the tensors before all of that is checked.
inline ParamDict read_torch_state_dict(std::istream& in, const std::string& name,
                                       uint64_t max_bytes = kMaxStateDictBytes) {
  return detail::in_plain_words(name, [&] {
    TORCH_CHECK(starts_as_zip(in), "tdfusion: ", name,
                " is not a PyTorch zip archive (torch.save with the default zip format is required; legacy "
                "pre-1.6 files are not supported)");
    return detail::read_state_dict_archive(in, name, max_bytes);
  });
}

/// Reads a state_dict file saved by `torch.save` (zip format); see the stream overload.
inline ParamDict read_torch_state_dict(const std::string& path, uint64_t max_bytes = kMaxStateDictBytes) {
  TORCH_CHECK(!std::filesystem::is_directory(path), "tdfusion: ", path, " is a directory, not a state_dict file");
  std::ifstream file(path, std::ios::binary);
  TORCH_CHECK(file.good(), "tdfusion: cannot open ", path, ": ", std::strerror(errno));
  return read_torch_state_dict(file, path, max_bytes);
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

/// Copies a state_dict into `module`'s parameters and buffers, checking every name and shape and that every
/// value is finite. Accepts the released TDFusion layout, in which every convolution weight also appears as
/// `<name>.conv.weight` (the two must then be equal). `source` names the file in error messages.
inline void load_state_dict(torch::nn::Module& module, const ParamDict& state, const std::string& source) {
  const std::string alias = ".conv.weight";
  std::map<std::string, torch::Tensor> entries;
  for (const auto& item : state) {
    const torch::Tensor& value = item.value();
    check_finite(value, source + ": '" + item.key() + "'");
    std::string name = item.key();
    if (name.size() > alias.size() && name.compare(name.size() - alias.size(), alias.size(), alias) == 0)
      name = name.substr(0, name.size() - alias.size()) + ".weight";
    const auto [it, inserted] = entries.emplace(name, value);
    TORCH_CHECK(inserted || (it->second.sizes() == value.sizes() && it->second.dtype() == value.dtype() &&
                             torch::equal(it->second, value)),
                "tdfusion: ", source, ": ", item.key(), " differs from its twin ", name);
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
