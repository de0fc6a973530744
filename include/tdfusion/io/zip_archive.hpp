#pragma once
// Reading the zip container of `torch.save` files and of LibTorch checkpoints when its bytes may come from
// anyone. Every offset and size in the directory is checked against the file before it is used, a record's
// declared size against what its compressed bytes can plausibly hold (the caller checks it against its own
// budget before reading), a deflated record never inflates past its declared size, and every record read is
// checked against its CRC-32. LibTorch's reader, by contrast, allocates whatever the directory declares and,
// in Debian's build, skips the CRC.
//
// Supported: stored and deflated records, zip64 directories (PyTorch writes them), no encryption, one disk.

#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <functional>
#include <istream>
#include <map>
#include <new>
#include <string>
#include <vector>

namespace tdfusion::io {

namespace detail {

/// Runs `read`, turning any error that is not already one of tdfusion's sentences (LibTorch's or the
/// standard library's internals) into a sentence naming `file`.
template <class Read>
auto in_plain_words(const std::string& file, Read&& read) -> decltype(read()) {
  try {
    return read();
  } catch (const c10::Error& error) {
    if (std::string(error.what_without_backtrace()).rfind("tdfusion: ", 0) == 0) throw;
    TORCH_CHECK(false, "tdfusion: ", file, ": cannot be read (damaged, or not in a supported format)");
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, "tdfusion: ", file, ": not enough memory to read it");
  } catch (const std::exception&) {
    TORCH_CHECK(false, "tdfusion: ", file, ": cannot be read (damaged, or not in a supported format)");
  }
}

}  // namespace detail

/// Whether the stream starts with a zip record's header, as torch.save files and checkpoints do (reads 4 bytes).
inline bool starts_as_zip(std::istream& in) {
  char magic[4] = {};
  in.read(magic, 4);
  return in.gcount() == 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0;
}

/// One record of a zip archive, as its central directory describes it.
struct ZipEntry {
  std::string name;
  uint16_t flags = 0;
  uint16_t method = 0;  ///< 0 stored, 8 deflated
  uint32_t crc32 = 0;
  uint64_t compressed_size = 0;
  uint64_t size = 0;  ///< uncompressed
  uint64_t header_offset = 0;
};

/// The records of a zip archive read from a seekable stream; `file` names the archive in error messages.
class ZipArchive {
 public:
  /// Deflate cannot expand one compressed byte to more than 1032 bytes; a record declaring more is damaged.
  static constexpr uint64_t kMaxDeflateRatio = 1032;

  ZipArchive(std::istream& in, std::string file) : in_(in), file_(std::move(file)) {
    in_.seekg(0, std::ios::end);
    const std::streamoff end = in_.tellg();
    TORCH_CHECK(in_.good() && end >= 0, "tdfusion: ", file_, ": cannot be read");
    file_size_ = static_cast<uint64_t>(end);
    read_directory();
  }

  const std::vector<ZipEntry>& entries() const { return entries_; }

  /// The folder that torch.save and LibTorch put every record in, named by the first record ("archive/"), or ""
  /// when there is no record or the first is not in a folder.
  std::string folder() const {
    const size_t slash = entries_.empty() ? std::string::npos : entries_.front().name.find('/');
    return slash == std::string::npos ? "" : entries_.front().name.substr(0, slash + 1);
  }

  /// The record called `name`, ignoring case as LibTorch's reader (miniz) does, or nullptr.
  const ZipEntry* find(const std::string& name) const {
    const auto found = index_.find(lower_case(name));
    return found == index_.end() ? nullptr : &entries_[found->second];
  }

  static std::string lower_case(std::string text) {
    for (char& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return text;
  }

  /// Streams the record's uncompressed bytes to `sink` in chunks, then checks their count and CRC-32.
  void read(const ZipEntry& entry, const std::function<void(const char* data, size_t size)>& sink) {
    TORCH_CHECK(!(entry.flags & 1), "tdfusion: ", file_, ": record ", entry.name, " is encrypted");
    TORCH_CHECK(entry.method == 0 || entry.method == 8, "tdfusion: ", file_, ": record ", entry.name,
                " uses compression method ", entry.method, " (only stored and deflated records are supported)");
    seek(data_offset(entry));
    uLong crc = ::crc32(0L, Z_NULL, 0);
    uint64_t produced = 0;
    const auto deliver = [&](const char* data, size_t size) {
      if (size == 0) return;
      TORCH_CHECK(size <= entry.size - produced, "tdfusion: ", file_, ": record ", entry.name,
                  " inflates to more than its declared ", entry.size, " bytes (damaged)");
      crc = ::crc32(crc, reinterpret_cast<const Bytef*>(data), static_cast<uInt>(size));
      produced += size;
      sink(data, size);
    };
    if (entry.method == 0) {
      for (uint64_t left = entry.compressed_size; left > 0;) {
        const size_t chunk = static_cast<size_t>(std::min<uint64_t>(left, kChunk));
        read_exact(buffer_.data(), chunk, entry.name);
        deliver(buffer_.data(), chunk);
        left -= chunk;
      }
    } else {
      inflate_record(entry, deliver);
    }
    TORCH_CHECK(produced == entry.size, "tdfusion: ", file_, ": record ", entry.name, " holds ", produced,
                " bytes, its directory entry says ", entry.size, " (damaged)");
#ifndef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION  // fuzzers define it so that mutated records reach the parsers
    TORCH_CHECK(crc == entry.crc32, "tdfusion: ", file_, ": record ", entry.name,
                " is damaged (its CRC-32 does not match)");
#endif
  }

  /// Reads the record into `destination`, which holds `entry.size` bytes.
  void read_into(const ZipEntry& entry, void* destination) {
    char* out = static_cast<char*>(destination);
    read(entry, [&out](const char* data, size_t size) {
      std::memcpy(out, data, size);
      out += size;
    });
  }

  /// Reads the record as a string of at most `limit` bytes (checked before reading).
  std::string read_string(const ZipEntry& entry, uint64_t limit) {
    TORCH_CHECK(entry.size <= limit, "tdfusion: ", file_, ": record ", entry.name, " declares ", entry.size,
                " bytes, more than the ", limit, " allowed");
    std::string text(static_cast<size_t>(entry.size), '\0');
    read_into(entry, text.data());
    return text;
  }

 private:
  static constexpr size_t kChunk = size_t{1} << 16;

  void seek(uint64_t offset) {
    in_.clear();
    in_.seekg(static_cast<std::streamoff>(offset));
    TORCH_CHECK(in_.good(), "tdfusion: ", file_, ": cannot seek to byte ", offset);
  }
  void read_exact(char* out, size_t size, const std::string& what) {
    in_.read(out, static_cast<std::streamsize>(size));
    TORCH_CHECK(in_.gcount() == static_cast<std::streamsize>(size), "tdfusion: ", file_, ": ", what,
                " is truncated");
  }
  /// `size` bytes at `offset`, which must lie inside the file.
  std::string bytes_at(uint64_t offset, uint64_t size, const std::string& what) {
    TORCH_CHECK(offset <= file_size_ && size <= file_size_ - offset, "tdfusion: ", file_, ": ", what,
                " lies beyond the end of the file (truncated or damaged)");
    std::string out(static_cast<size_t>(size), '\0');
    seek(offset);
    read_exact(out.data(), out.size(), what);
    return out;
  }
  static uint64_t le(const std::string& bytes, size_t at, size_t width) {
    uint64_t value = 0;
    for (size_t i = 0; i < width; ++i) value |= uint64_t{static_cast<unsigned char>(bytes[at + i])} << (8 * i);
    return value;
  }

  void read_directory() {
    // The end-of-central-directory record: 22 bytes and a comment of up to 65535, at the end of the file.
    const uint64_t tail_size = std::min<uint64_t>(file_size_, 22 + 0xffff);
    const std::string tail = bytes_at(file_size_ - tail_size, tail_size, "the end of the archive");
    size_t eocd = std::string::npos;
    for (size_t at = tail.size() >= 22 ? tail.size() - 22 + 1 : 0; at-- > 0;) {
      if (le(tail, at, 4) == 0x06054b50 && at + 22 + le(tail, at + 20, 2) <= tail.size()) {
        eocd = at;
        break;
      }
    }
    TORCH_CHECK(eocd != std::string::npos, "tdfusion: ", file_, " is not a zip archive (no end-of-directory record)");
    TORCH_CHECK(le(tail, eocd + 4, 2) == 0 && le(tail, eocd + 6, 2) == 0, "tdfusion: ", file_,
                " spans several disks, which is not supported");
    uint64_t count = le(tail, eocd + 10, 2), directory_size = le(tail, eocd + 12, 4),
             directory_offset = le(tail, eocd + 16, 4);
    // Zip64 (PyTorch always writes it): a locator just before that record points to the zip64 end-of-directory
    // record, whose values count, as they do for LibTorch's reader.
    const uint64_t eocd_offset = file_size_ - tail_size + eocd;
    const std::string locator = eocd_offset >= 20 ? bytes_at(eocd_offset - 20, 20, "the zip64 locator") : "";
    if (!locator.empty() && le(locator, 0, 4) == 0x07064b50) {
      const std::string record = bytes_at(le(locator, 8, 8), 56, "the zip64 end-of-directory record");
      TORCH_CHECK(le(record, 0, 4) == 0x06064b50, "tdfusion: ", file_, ": zip64 end-of-directory record missing");
      count = le(record, 32, 8);
      directory_size = le(record, 40, 8);
      directory_offset = le(record, 48, 8);
    } else {
      TORCH_CHECK(count != 0xffff && directory_size != 0xffffffff && directory_offset != 0xffffffff, "tdfusion: ",
                  file_, ": zip64 locator missing (damaged)");
    }
    // Each entry takes at least 46 bytes, so the count is checked before anything is reserved for it.
    TORCH_CHECK(count <= directory_size / 46, "tdfusion: ", file_, ": the central directory declares ", count,
                " records in ", directory_size, " bytes (damaged)");
    const std::string directory = bytes_at(directory_offset, directory_size, "the central directory");
    entries_.reserve(static_cast<size_t>(count));
    size_t at = 0;
    for (uint64_t i = 0; i < count; ++i) {
      TORCH_CHECK(directory.size() - at >= 46 && le(directory, at, 4) == 0x02014b50, "tdfusion: ", file_,
                  ": central directory entry ", i, " is damaged");
      ZipEntry entry;
      entry.flags = static_cast<uint16_t>(le(directory, at + 8, 2));
      entry.method = static_cast<uint16_t>(le(directory, at + 10, 2));
      entry.crc32 = static_cast<uint32_t>(le(directory, at + 16, 4));
      entry.compressed_size = le(directory, at + 20, 4);
      entry.size = le(directory, at + 24, 4);
      entry.header_offset = le(directory, at + 42, 4);
      const size_t name_size = le(directory, at + 28, 2), extra_size = le(directory, at + 30, 2),
                   comment_size = le(directory, at + 32, 2);
      TORCH_CHECK(directory.size() - at - 46 >= name_size + extra_size + comment_size, "tdfusion: ", file_,
                  ": central directory entry ", i, " is damaged");
      entry.name = directory.substr(at + 46, name_size);
      read_zip64_sizes(directory.substr(at + 46 + name_size, extra_size), entry);
      at += 46 + name_size + extra_size + comment_size;
      TORCH_CHECK(entry.header_offset < file_size_ && entry.compressed_size <= file_size_ - entry.header_offset,
                  "tdfusion: ", file_, ": record ", entry.name, " lies beyond the end of the file (truncated?)");
      TORCH_CHECK(entry.method == 0 ? entry.size == entry.compressed_size
                                    : entry.size / kMaxDeflateRatio <= entry.compressed_size,
                  "tdfusion: ", file_, ": record ", entry.name, " declares ", entry.size, " bytes, which its ",
                  entry.compressed_size, " stored bytes cannot hold (damaged or a decompression bomb)");
      TORCH_CHECK(index_.emplace(lower_case(entry.name), entries_.size()).second, "tdfusion: ", file_, ": record ",
                  entry.name, " appears twice (names are compared ignoring case)");
      entries_.push_back(std::move(entry));
    }
  }

  /// Fields saturated at 0xffffffff in a directory entry are in its zip64 extra field, in this order.
  void read_zip64_sizes(const std::string& extra, ZipEntry& entry) const {
    std::vector<uint64_t*> wanted;
    for (uint64_t* field : {&entry.size, &entry.compressed_size, &entry.header_offset})
      if (*field == 0xffffffff) wanted.push_back(field);
    if (wanted.empty()) return;
    for (size_t at = 0; extra.size() - at >= 4;) {
      const size_t id = le(extra, at, 2), size = le(extra, at + 2, 2);
      if (id == 1 && size >= 8 * wanted.size() && extra.size() - at - 4 >= size) {
        for (size_t k = 0; k < wanted.size(); ++k) *wanted[k] = le(extra, at + 4 + 8 * k, 8);
        return;
      }
      at += 4 + std::min(size, extra.size() - at - 4);
    }
    TORCH_CHECK(false, "tdfusion: ", file_, ": record ", entry.name, " lacks its zip64 sizes (damaged)");
  }

  /// Where the record's bytes start: after its local header, whose name must match the directory's.
  uint64_t data_offset(const ZipEntry& entry) {
    const std::string header = bytes_at(entry.header_offset, 30, "the local header of " + entry.name);
    const uint64_t name_size = le(header, 26, 2), extra_size = le(header, 28, 2);
    TORCH_CHECK(le(header, 0, 4) == 0x04034b50 &&
                    bytes_at(entry.header_offset + 30, name_size, "the local header of " + entry.name) == entry.name,
                "tdfusion: ", file_, ": the local header of record ", entry.name, " is damaged");
    const uint64_t offset = entry.header_offset + 30 + name_size + extra_size;
    TORCH_CHECK(offset <= file_size_ && entry.compressed_size <= file_size_ - offset, "tdfusion: ", file_,
                ": record ", entry.name, " lies beyond the end of the file (truncated?)");
    return offset;
  }

  void inflate_record(const ZipEntry& entry, const std::function<void(const char*, size_t)>& deliver) {
    z_stream stream{};
    TORCH_CHECK(inflateInit2(&stream, -MAX_WBITS) == Z_OK, "tdfusion: ", file_, ": cannot start inflating ",
                entry.name);
    struct End {
      z_stream* s;
      ~End() { inflateEnd(s); }
    } end{&stream};
    std::vector<char> output(kChunk);
    uint64_t left = entry.compressed_size;
    int status = Z_OK;
    while (status != Z_STREAM_END) {
      if (stream.avail_in == 0) {
        TORCH_CHECK(left > 0, "tdfusion: ", file_, ": record ", entry.name, " is truncated (damaged)");
        const size_t chunk = static_cast<size_t>(std::min<uint64_t>(left, kChunk));
        read_exact(buffer_.data(), chunk, entry.name);
        left -= chunk;
        stream.next_in = reinterpret_cast<Bytef*>(buffer_.data());
        stream.avail_in = static_cast<uInt>(chunk);
      }
      stream.next_out = reinterpret_cast<Bytef*>(output.data());
      stream.avail_out = static_cast<uInt>(output.size());
      const uInt input_before = stream.avail_in;
      status = inflate(&stream, Z_NO_FLUSH);
      const size_t produced = output.size() - stream.avail_out;
      TORCH_CHECK(status == Z_STREAM_END || (status == Z_OK && (produced > 0 || stream.avail_in < input_before)),
                  "tdfusion: ", file_, ": record ", entry.name, " is damaged (invalid compressed data)");
      deliver(output.data(), produced);
    }
  }

  std::istream& in_;
  std::string file_;
  uint64_t file_size_ = 0;
  std::vector<ZipEntry> entries_;
  std::map<std::string, size_t> index_;  // lower-case name -> entry
  std::vector<char> buffer_ = std::vector<char>(kChunk);
};

}  // namespace tdfusion::io
