#pragma once
// Image files in and out. Files are untrusted: the dimensions are read from the header first and checked
// against a pixel limit (ImageReadOptions::max_pixels) before anything is allocated for the pixels, and every
// error, running out of memory included, names the file and says what is wrong in words.
//
// PNG goes through libpng (8 and 16 bits, read and written row by row; a compressed stream is inflated only as
// far as the image it describes, and ancillary chunks are skipped unread). Binary PGM and PPM are read here
// (stb 2.27 gets their 16-bit byte order wrong and leaves truncated ones uninitialised). JPEG, BMP, GIF, PSD,
// TGA and PIC are decoded by Debian's compiled stb (libstb), so no stb implementation is compiled into the
// programs that include this; JPEG and BMP are written by stb_image_write. Decoding goes straight into the
// smallest tensor that holds the samples: uint8 for 8-bit files, float32 (exact integers) for 16-bit ones.

#include "tdfusion/io/atomic_file.hpp"

#include <torch/torch.h>

#include <fcntl.h>
#include <png.h>
#include <zlib.h>
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace tdfusion::io {

/// How raw sample values v become [0,1] intensities. Thermal cameras often store 14 significant bits in a
/// 16-bit file, or a narrow band of the full range, which full_range would render nearly black.
enum class Normalisation {
  full_range,  ///< v / 65535 (16-bit files), v / 255 (8-bit files)
  min_max,     ///< (v - min) / (max - min) over the whole image, all channels together; a constant image gives 0
  window,      ///< (v - window_low) / (window_high - window_low), clamped to [0,1]; bounds in the file's units
};

/// The default limit on an image's pixels: 64 Mi (8192 x 8192), eight times a 4K frame and far above any
/// thermal camera. At that size a colour image takes 192 MiB as 8-bit samples and 768 MiB as floats, so what
/// a file can make the reader allocate stays within a few GiB; larger images need a larger max_pixels.
inline constexpr int64_t kDefaultMaxPixels = int64_t{1} << 26;

struct ImageReadOptions {
  /// Applies to 16-bit files; 8-bit files are always v / 255 unless `normalise_8_bit` is set.
  TORCH_ARG(Normalisation, normalisation) = Normalisation::full_range;
  TORCH_ARG(double, window_low) = 0.0;       ///< raw value mapped to 0 by `window`
  TORCH_ARG(double, window_high) = 65535.0;  ///< raw value mapped to 1 by `window`
  TORCH_ARG(bool, normalise_8_bit) = false;  ///< also apply `normalisation` to 8-bit files
  /// Files whose header declares more pixels (width x height) are refused before decoding.
  TORCH_ARG(int64_t, max_pixels) = kDefaultMaxPixels;
};

/// What an image file's header says, as read_image will return it.
struct ImageInfo {
  std::string format;   ///< "PNG", "JPEG", "BMP", "GIF", "PSD", "PNM" or "TGA/PIC"
  int64_t width = 0;
  int64_t height = 0;
  int channels = 0;     ///< 1 (grey) or 3 (colour); alpha is dropped
  int bit_depth = 8;    ///< 8 or 16, the sample size after decoding (1-, 2- and 4-bit files become 8-bit)
};

namespace detail {

/// Lower-case extension with its dot ("" when there is none).
inline std::string lower_extension(const std::string& path) {
  std::string extension = std::filesystem::path(path).extension().string();
  std::transform(extension.begin(), extension.end(), extension.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return extension;
}

inline void check_read_options(const ImageReadOptions& options) {
  if (options.normalisation() == Normalisation::window) {
    TORCH_CHECK(std::isfinite(options.window_low()) && std::isfinite(options.window_high()) &&
                    options.window_high() > options.window_low(),
                "tdfusion: the normalisation window needs window_low < window_high, got [", options.window_low(), ", ",
                options.window_high(), "]");
  }
  TORCH_CHECK(options.max_pixels() > 0, "tdfusion: max_pixels must be positive, got ", options.max_pixels());
}

/// The largest file an image within `max_pixels` can need: 8 bytes a pixel (16-bit RGBA stored uncompressed)
/// and 64 MiB of metadata; never above what stb can address (INT_MAX bytes).
inline int64_t max_file_bytes(int64_t max_pixels) {
  const int64_t cap = INT_MAX;
  return max_pixels > (cap >> 3) ? cap : std::min(cap, 8 * max_pixels + (int64_t{64} << 20));
}

/// Allocates an uninitialised tensor for the pixels of `path`, turning an allocation failure into a sentence.
inline torch::Tensor allocate(torch::IntArrayRef sizes, torch::ScalarType type, const std::string& path) {
  try {
    return torch::empty(sizes, type);
  } catch (const std::exception&) {
    int64_t bytes = c10::elementSize(type);
    for (int64_t size : sizes) bytes *= size;
    TORCH_CHECK(false, "tdfusion: cannot read image '", path, "': not enough memory for its pixels (", bytes,
                " bytes)");
  }
  return {};
}

/// The first `limit` bytes of the file at `path` (all of it when it is shorter); `complete` tells whether that
/// is the whole file. Refuses directories, devices and pipes, and files above `max_bytes`.
inline std::string read_file_bytes(const std::string& path, int64_t limit, int64_t max_bytes, bool* complete) {
  TORCH_CHECK(!path.empty(), "tdfusion: cannot read an image from an empty path");
  // O_NONBLOCK: opening a named pipe must not wait for a writer.
  Descriptor file(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (file.get() < 0) {
    const int code = errno;
    TORCH_CHECK(false, "tdfusion: cannot open image '", path, "': ", std::strerror(code));
  }
  struct stat info {};
  TORCH_CHECK(::fstat(file.get(), &info) == 0, "tdfusion: cannot read image '", path, "': ", std::strerror(errno));
  TORCH_CHECK(!S_ISDIR(info.st_mode), "tdfusion: cannot read image '", path, "': it is a directory");
  TORCH_CHECK(S_ISREG(info.st_mode), "tdfusion: cannot read image '", path, "': it is not a regular file");
  TORCH_CHECK(info.st_size > 0, "tdfusion: cannot read image '", path, "': the file is empty");
  TORCH_CHECK(info.st_size <= max_bytes, "tdfusion: cannot read image '", path, "': the file has ", info.st_size,
              " bytes, more than an image within the pixel limit can need (", max_bytes, ")");
  const int64_t wanted = std::min<int64_t>(limit, info.st_size);
  std::string bytes;
  try {
    bytes.resize(static_cast<size_t>(wanted));
  } catch (const std::exception&) {
    TORCH_CHECK(false, "tdfusion: cannot read image '", path, "': not enough memory for its ", wanted, " bytes");
  }
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t got = ::read(file.get(), bytes.data() + done, bytes.size() - done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int code = errno;
      TORCH_CHECK(false, "tdfusion: cannot read image '", path, "': ", std::strerror(code));
    }
    if (got == 0) break;  // shrank meanwhile
    done += static_cast<size_t>(got);
  }
  bytes.resize(done);
  *complete = static_cast<int64_t>(done) == info.st_size;
  return bytes;
}

/// Bounds-checked big- and little-endian reads from a byte string; `truncated` records a read past the end.
class ByteReader {
 public:
  explicit ByteReader(std::string_view bytes) : bytes_(bytes) {}
  uint32_t byte(size_t at) {
    if (at >= bytes_.size()) {
      truncated = true;
      return 0;
    }
    return static_cast<unsigned char>(bytes_[at]);
  }
  uint32_t be16(size_t at) { return byte(at) << 8 | byte(at + 1); }
  uint32_t le16(size_t at) { return byte(at) | byte(at + 1) << 8; }
  uint32_t be32(size_t at) { return be16(at) << 16 | be16(at + 2); }
  uint32_t le32(size_t at) { return le16(at) | le16(at + 2) << 16; }
  bool starts_with(std::string_view magic) const { return bytes_.substr(0, magic.size()) == magic; }
  size_t size() const { return bytes_.size(); }
  bool truncated = false;

 private:
  std::string_view bytes_;
};

/// The next decimal field of a PNM header from `at`, after whitespace and # comments (as stb reads them); -1
/// when there is none or it has more than 9 digits. Reaching the end of the bytes sets `in.truncated`.
inline int64_t pnm_field(ByteReader& in, size_t& at) {
  for (uint32_t c = in.byte(at); !in.truncated; c = in.byte(at)) {
    if (c == '#') {
      while (!in.truncated && in.byte(at) != '\n' && in.byte(at) != '\r') ++at;
    } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') {
      ++at;
    } else {
      break;
    }
  }
  int64_t value = 0;
  int digits = 0;
  for (uint32_t c = in.byte(at); !in.truncated && c >= '0' && c <= '9'; c = in.byte(++at)) {
    if (++digits > 9) return -1;
    value = value * 10 + (c - '0');
  }
  return digits > 0 ? value : -1;
}

/// Parses the header of the formats tdfusion knows by their signature. Returns false when the bytes end
/// before the header does; `info.format` stays empty for other formats. A known format with an invalid header
/// is an error naming `name`.
inline bool parse_header(std::string_view bytes, const std::string& name, ImageInfo& info) {
  ByteReader in(bytes);
  auto invalid = [&](const std::string& what) {
    TORCH_CHECK(false, "tdfusion: cannot read image '", name, "': invalid ", info.format, " header (", what, ")");
  };
  if (in.starts_with("\x89PNG\r\n\x1a\n")) {
    info.format = "PNG";
    if (in.size() < 33) return false;
    if (in.be32(8) != 13 || bytes.substr(12, 4) != "IHDR") invalid("no IHDR chunk first");
    info.width = in.be32(16), info.height = in.be32(20);
    const uint32_t depth = in.byte(24), colour = in.byte(25);
    const bool valid = (colour == 0 && (depth == 1 || depth == 2 || depth == 4 || depth == 8 || depth == 16)) ||
                       (colour == 3 && (depth == 1 || depth == 2 || depth == 4 || depth == 8)) ||
                       ((colour == 2 || colour == 4 || colour == 6) && (depth == 8 || depth == 16));
    if (!valid) invalid("bit depth " + std::to_string(depth) + " with colour type " + std::to_string(colour));
    if (info.width > 0x7fffffff || info.height > 0x7fffffff) invalid("a side above 2^31 - 1");
    info.channels = colour == 0 || colour == 4 ? 1 : 3;
    info.bit_depth = depth == 16 ? 16 : 8;
  } else if (in.starts_with("\xff\xd8")) {
    info.format = "JPEG";
    size_t at = 2;
    for (;;) {  // walk the segments to the frame header (SOFn)
      if (in.byte(at) != 0xff) {
        if (in.truncated) return false;
        invalid("no marker at byte " + std::to_string(at));
      }
      while (in.byte(at) == 0xff) ++at;  // fill bytes
      const uint32_t marker = in.byte(at++);
      if (in.truncated) return false;
      if ((marker >= 0xd0 && marker <= 0xd7) || marker == 0x01) continue;  // no length
      if (marker == 0xd9 || marker == 0xda) invalid("no frame header before the image data");
      const uint32_t length = in.be16(at);
      if (in.truncated) return false;
      if (length < 2) invalid("a segment of length " + std::to_string(length));
      if (marker >= 0xc0 && marker <= 0xcf && marker != 0xc4 && marker != 0xc8 && marker != 0xcc) {
        info.bit_depth = static_cast<int>(in.byte(at + 2));
        info.height = in.be16(at + 3), info.width = in.be16(at + 5);
        const uint32_t components = in.byte(at + 7);
        if (in.truncated) return false;
        if (info.bit_depth != 8) invalid(std::to_string(info.bit_depth) + "-bit samples; only 8-bit JPEG is supported");
        if (components != 1 && components != 3 && components != 4) {
          invalid(std::to_string(components) + " components");
        }
        info.channels = components == 1 ? 1 : 3;
        break;
      }
      at += length;
    }
  } else if (in.starts_with("BM")) {
    info.format = "BMP";
    const uint32_t header = in.le32(14);
    const int64_t width = header == 12 ? int64_t{in.le16(18)} : int64_t{static_cast<int32_t>(in.le32(18))};
    const int64_t height = header == 12 ? int64_t{in.le16(20)} : int64_t{static_cast<int32_t>(in.le32(22))};
    if (in.truncated) return false;
    if (header != 12 && header < 40) invalid("header size " + std::to_string(header));
    if (width < 0) invalid("negative width");
    info.width = width, info.height = std::abs(height);  // negative: stored top-down
    info.channels = 3;
  } else if (in.starts_with("GIF87a") || in.starts_with("GIF89a")) {
    info.format = "GIF";
    info.width = in.le16(6), info.height = in.le16(8);
    if (in.truncated) return false;
    info.channels = 3;
  } else if (in.starts_with("8BPS")) {
    info.format = "PSD";
    info.height = in.be32(14), info.width = in.be32(18);
    const uint32_t depth = in.be16(22), mode = in.be16(24);
    if (in.truncated) return false;
    if (depth != 8 && depth != 16) invalid(std::to_string(depth) + "-bit channels");
    if (mode != 3) invalid("colour mode " + std::to_string(mode) + "; only RGB is supported");
    if (info.width > 0x7fffffff || info.height > 0x7fffffff) invalid("a side above 2^31 - 1");
    info.channels = 3;
    info.bit_depth = static_cast<int>(depth);
  } else if (in.starts_with("P5") || in.starts_with("P6")) {
    info.format = "PNM";
    size_t at = 2;
    info.width = pnm_field(in, at), info.height = pnm_field(in, at);
    const int64_t top = pnm_field(in, at);
    if (in.truncated) return false;
    if (info.width < 0 || info.height < 0 || top < 0) {
      invalid("width, height and maximum value must be decimal numbers below 10^9");
    }
    if (top < 1 || top > 65535) invalid("maximum value " + std::to_string(top));
    info.channels = bytes[1] == '5' ? 1 : 3;
    info.bit_depth = top > 255 ? 16 : 8;
  } else if (in.starts_with("#?RADIANCE") || in.starts_with("#?RGBE")) {
    TORCH_CHECK(false, "tdfusion: cannot read image '", name, "': Radiance HDR images are not supported");
  }
  return true;
}

/// The header of an image in memory (`complete`: all of the file, else a prefix of it); false when the prefix
/// is too short to tell. Checks the size against `options.max_pixels`.
inline bool scan_header(std::string_view bytes, bool complete, const std::string& name,
                        const ImageReadOptions& options, ImageInfo& info) {
  info = ImageInfo();
  if (!parse_header(bytes, name, info)) {
    TORCH_CHECK(!complete, "tdfusion: cannot read image '", name, "': the file ends inside its ", info.format,
                " header (truncated?)");
    return false;
  }
  if (info.format.empty()) {  // TGA and PIC have no reliable signature: ask stb
    int width = 0, height = 0, channels = 0;
    const int size = static_cast<int>(std::min<size_t>(bytes.size(), INT_MAX));
    const auto* data = reinterpret_cast<const stbi_uc*>(bytes.data());
    if (stbi_info_from_memory(data, size, &width, &height, &channels) == 0) {
      if (!complete) return false;
      TORCH_CHECK(false, "tdfusion: cannot read image '", name, "': not a readable image (",
                  stbi_failure_reason() != nullptr ? stbi_failure_reason() : "unknown format",
                  "); supported formats are PNG, JPEG, BMP, TGA, GIF, PSD and PNM");
    }
    info = {"TGA/PIC", width, height, channels >= 3 ? 3 : 1, 8};
  }
  TORCH_CHECK(info.width > 0 && info.height > 0, "tdfusion: cannot read image '", name, "': the image is empty (its ",
              info.format, " header gives width ", info.width, " and height ", info.height, ")");
  // Every format's sides are below 2^32, so their product fits in 64 unsigned bits.
  const uint64_t pixels = static_cast<uint64_t>(info.width) * static_cast<uint64_t>(info.height);
  TORCH_CHECK(pixels <= static_cast<uint64_t>(options.max_pixels()), "tdfusion: cannot read image '", name,
              "': it is too large: its ", info.format, " header gives width ", info.width, " and height ",
              info.height, ", ", pixels, " pixels, above the limit of ", options.max_pixels(), " (max_pixels)");
  return true;
}

/// Decoded samples: `levels` is C x H x W (C = 1 or 3, alpha dropped), uint8 for 8-bit files and float32
/// holding the integers 0..65535 for 16-bit ones; it may be a view of H x W x C memory (channels interleaved).
struct DecodedImage {
  torch::Tensor levels;
  int bit_depth = 8;
};

// ---- libpng reports errors by longjmp. The functions that call setjmp (png_call) own nothing with a
// ---- destructor, and the libpng structures are released by RAII holders outside them.

struct PngErrorMessage {
  char text[256] = "unknown libpng error";
};

inline void png_error_to_message(png_structp png, png_const_charp message) {
  auto* target = static_cast<PngErrorMessage*>(png_get_error_ptr(png));
  std::snprintf(target->text, sizeof(target->text), "%s", message != nullptr ? message : "unknown libpng error");
  png_longjmp(png, 1);
}

inline void png_ignore_warning(png_structp, png_const_charp) {}

/// Runs `step`, a sequence of libpng calls, under libpng's error handler; false when libpng reported an error
/// (its text is in the PngErrorMessage). `step` must not own objects with destructors: a longjmp skips them.
template <class Step>
bool png_call(png_structp png, const Step& step) {
  if (setjmp(png_jmpbuf(png))) return false;
  step();
  return true;
}

inline bool little_endian() {
  const uint16_t probe = 1;
  return *reinterpret_cast<const unsigned char*>(&probe) == 1;
}

struct PngMemory {
  std::string_view bytes;
  size_t offset = 0;
};

inline void png_read_from_memory(png_structp png, png_bytep out, size_t length) {
  auto* source = static_cast<PngMemory*>(png_get_io_ptr(png));
  if (length > source->bytes.size() - source->offset) png_error(png, "the file ends early");
  std::memcpy(out, source->bytes.data() + source->offset, length);
  source->offset += length;
}

/// libpng's read structures for one image in memory.
class PngReader {
 public:
  explicit PngReader(PngMemory* source) {
    png_ = png_create_read_struct(PNG_LIBPNG_VER_STRING, &error_, &png_error_to_message, &png_ignore_warning);
    if (png_ != nullptr) info_ = png_create_info_struct(png_);
    if (info_ != nullptr) png_set_read_fn(png_, source, &png_read_from_memory);
  }
  PngReader(const PngReader&) = delete;
  PngReader& operator=(const PngReader&) = delete;
  ~PngReader() { png_destroy_read_struct(&png_, &info_, nullptr); }
  bool ready() const { return info_ != nullptr; }
  png_structp png() const { return png_; }
  png_infop info() const { return info_; }
  const char* error() const { return error_.text; }

 private:
  png_structp png_ = nullptr;
  png_infop info_ = nullptr;
  PngErrorMessage error_;
};

inline DecodedImage decode_png(std::string_view bytes, const std::string& name, const ImageInfo& header) {
  PngMemory source{bytes, 0};
  PngReader reader(&source);
  TORCH_CHECK(reader.ready(), "tdfusion: cannot read image '", name, "': not enough memory to start libpng");
  png_structp png = reader.png();
  png_infop info = reader.info();
  png_uint_32 width = 0, height = 0;
  int depth = 0, passes = 0, channels = 0;
  const bool header_ok = png_call(png, [&] {
    png_set_user_limits(png, PNG_UINT_31_MAX, PNG_UINT_31_MAX);  // the pixel limit was checked already
    // Skip every ancillary chunk unread: compressed text or ICC profiles are not needed and could inflate.
    png_set_keep_unknown_chunks(png, PNG_HANDLE_CHUNK_NEVER, nullptr, -1);
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
    png_set_crc_action(png, PNG_CRC_QUIET_USE, PNG_CRC_QUIET_USE);  // lets the fuzzer's mutations past the CRCs
#endif
    png_read_info(png, info);
    width = png_get_image_width(png, info), height = png_get_image_height(png, info);
    depth = png_get_bit_depth(png, info);
    const int colour = png_get_color_type(png, info);
    if (colour == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (colour == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if ((colour & PNG_COLOR_MASK_ALPHA) != 0) png_set_strip_alpha(png);
    if (depth == 16 && little_endian()) png_set_swap(png);
    passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    channels = png_get_channels(png, info);
  });
  TORCH_CHECK(header_ok, "tdfusion: cannot decode image '", name, "': ", reader.error(), " (corrupt or truncated file?)");
  TORCH_CHECK(static_cast<int64_t>(width) == header.width && static_cast<int64_t>(height) == header.height &&
                  channels == header.channels,
              "tdfusion: cannot decode image '", name, "': libpng reads a different size from its header");

  // 16-bit samples are read into the first half of each float row and widened in place afterwards.
  const bool sixteen = depth == 16;
  const torch::Tensor levels = allocate({header.height, header.width, channels}, sixteen ? torch::kFloat : torch::kByte, name);
  auto* base = static_cast<unsigned char*>(levels.data_ptr());
  const size_t row_bytes = static_cast<size_t>(header.width) * channels * (sixteen ? 4 : 1);
  // Only the image's rows are inflated: what follows them (png_read_end) could be a stream of any length.
  const bool rows_ok = png_call(png, [&] {
    for (int pass = 0; pass < passes; ++pass) {
      for (png_uint_32 row = 0; row < height; ++row) png_read_row(png, base + row * row_bytes, nullptr);
    }
  });
  TORCH_CHECK(rows_ok, "tdfusion: cannot decode image '", name, "': ", reader.error(), " (corrupt or truncated file?)");
  if (sixteen) {
    const size_t samples = static_cast<size_t>(header.width) * channels;
    for (int64_t row = 0; row < header.height; ++row) {
      unsigned char* bytes_of_row = base + row * row_bytes;
      for (size_t i = samples; i-- > 0;) {  // from the end: sample i is read before bytes 4i.. are written
        uint16_t sample = 0;
        std::memcpy(&sample, bytes_of_row + 2 * i, 2);
        const float value = sample;
        std::memcpy(bytes_of_row + 4 * i, &value, 4);
      }
    }
  }
  return {levels.permute({2, 0, 1}), sixteen ? 16 : 8};
}

/// Decodes a binary PGM (P5) or PPM (P6): the header, one whitespace byte, then the samples, 8-bit or (maximum
/// value above 255) 16-bit big-endian. The values are kept as stored, not scaled by the maximum value.
inline DecodedImage decode_pnm(std::string_view bytes, const std::string& name, const ImageInfo& header) {
  ByteReader in(bytes);
  size_t at = 2;
  for (int field = 0; field < 3; ++field) pnm_field(in, at);
  const size_t sample_bytes = header.bit_depth == 16 ? 2 : 1;
  const size_t samples = static_cast<size_t>(header.width * header.height * header.channels);
  TORCH_CHECK(at + 1 + samples * sample_bytes <= bytes.size(), "tdfusion: cannot decode image '", name, "': its ",
              samples * sample_bytes, " bytes of samples are not all there (corrupt or truncated file?)");
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data()) + at + 1;
  const std::vector<int64_t> sizes = {header.height, header.width, header.channels};
  torch::Tensor levels;
  if (header.bit_depth == 8) {
    levels = allocate(sizes, torch::kByte, name);
    std::memcpy(levels.data_ptr(), data, samples);
  } else {
    levels = allocate(sizes, torch::kFloat, name);
    float* out = levels.data_ptr<float>();
    for (size_t i = 0; i < samples; ++i) out[i] = static_cast<float>(data[2 * i] << 8 | data[2 * i + 1]);
  }
  return {levels.permute({2, 0, 1}), header.bit_depth};
}

/// Decodes the other formats with stb after checking that stb reads the header as tdfusion did.
inline DecodedImage decode_with_stb(std::string_view bytes, const std::string& name, const ImageInfo& header) {
  const auto* data = reinterpret_cast<const stbi_uc*>(bytes.data());
  const int size = static_cast<int>(bytes.size());  // bounded by max_file_bytes
  int width = 0, height = 0, stored = 0;
  const bool same_header = stbi_info_from_memory(data, size, &width, &height, &stored) != 0 &&
                           width == header.width && height == header.height;
  TORCH_CHECK(same_header, "tdfusion: cannot decode image '", name, "': its ", header.format,
              " header is not read consistently (corrupt file?)");
  const bool sixteen = header.bit_depth == 16;
  stbi_set_flip_vertically_on_load_thread(0);  // whatever another user of stb set globally
  std::unique_ptr<void, void (*)(void*)> pixels(
      sixteen ? static_cast<void*>(stbi_load_16_from_memory(data, size, &width, &height, &stored, header.channels))
              : static_cast<void*>(stbi_load_from_memory(data, size, &width, &height, &stored, header.channels)),
      &stbi_image_free);
  if (pixels == nullptr) {
    const std::string reason = stbi_failure_reason() != nullptr ? stbi_failure_reason() : "unknown error";
    TORCH_CHECK(reason != "outofmem", "tdfusion: cannot decode image '", name, "': not enough memory for its ",
                header.width, " x ", header.height, " pixels");
    TORCH_CHECK(false, "tdfusion: cannot decode image '", name, "': ", reason, " (corrupt or truncated file?)");
  }
  TORCH_CHECK(width == header.width && height == header.height, "tdfusion: cannot decode image '", name,
              "': stb decoded a different size from its header");
  const std::vector<int64_t> sizes = {header.height, header.width, header.channels};
  if (!sixteen) {  // the tensor takes over stb's buffer
    torch::Tensor levels = torch::from_blob(pixels.get(), sizes, [](void* p) { stbi_image_free(p); }, torch::kByte);
    pixels.release();
    return {levels.permute({2, 0, 1}), 8};
  }
  const torch::Tensor levels = allocate(sizes, torch::kFloat, name);
  const auto* samples = static_cast<const uint16_t*>(pixels.get());
  std::copy(samples, samples + levels.numel(), levels.data_ptr<float>());
  return {levels.permute({2, 0, 1}), 16};
}

/// Decodes a whole image file held in memory; `name` names it in messages.
inline DecodedImage decode(std::string_view bytes, const std::string& name, const ImageReadOptions& options) {
  check_read_options(options);
  TORCH_CHECK(!bytes.empty(), "tdfusion: cannot read image '", name, "': the file is empty");
  TORCH_CHECK(static_cast<int64_t>(bytes.size()) <= max_file_bytes(options.max_pixels()), "tdfusion: cannot read image '",
              name, "': the file has ", bytes.size(), " bytes, more than an image within the pixel limit can need (",
              max_file_bytes(options.max_pixels()), ")");
  ImageInfo header;
  scan_header(bytes, /*complete=*/true, name, options, header);
  if (header.format == "PNG") return decode_png(bytes, name, header);
  if (header.format == "PNM") return decode_pnm(bytes, name, header);
  return decode_with_stb(bytes, name, header);
}

inline DecodedImage decode_file(const std::string& path, const ImageReadOptions& options) {
  check_read_options(options);
  bool complete = false;
  const int64_t most = max_file_bytes(options.max_pixels());
  return decode(read_file_bytes(path, most, most, &complete), path, options);
}

/// Sample values -> [0,1] floats, a contiguous C x H x W tensor (the levels themselves when they are float and
/// contiguous already), as `options` says.
inline torch::Tensor normalise(DecodedImage image, const ImageReadOptions& options, const std::string& name) {
  torch::Tensor values = image.levels.scalar_type() == torch::kFloat && image.levels.is_contiguous()
                             ? image.levels
                             : allocate(image.levels.sizes(), torch::kFloat, name).copy_(image.levels);
  const bool configurable = image.bit_depth == 16 || options.normalise_8_bit();
  switch (configurable ? options.normalisation() : Normalisation::full_range) {
    case Normalisation::full_range:
      return values.div_(image.bit_depth == 16 ? 65535.0 : 255.0);
    case Normalisation::min_max: {
      const double low = values.min().item<double>(), high = values.max().item<double>();
      return high > low ? values.sub_(low).div_(high - low) : values.zero_();
    }
    case Normalisation::window:
      return values.sub_(options.window_low()).div_(options.window_high() - options.window_low()).clamp_(0.0, 1.0);
  }
  TORCH_CHECK(false, "tdfusion: unknown normalisation mode ", static_cast<int>(options.normalisation()));
  return values;
}

// ---- Writing.

inline void png_write_to_sink(png_structp png, png_bytep data, size_t length) {
  if (static_cast<FileSink*>(png_get_io_ptr(png))->write(data, length) != length) png_error(png, "write failed");
}

inline void png_flush_nothing(png_structp) {}

/// libpng's write structures.
class PngWriter {
 public:
  PngWriter() {
    png_ = png_create_write_struct(PNG_LIBPNG_VER_STRING, &error_, &png_error_to_message, &png_ignore_warning);
    if (png_ != nullptr) info_ = png_create_info_struct(png_);
  }
  PngWriter(const PngWriter&) = delete;
  PngWriter& operator=(const PngWriter&) = delete;
  ~PngWriter() { png_destroy_write_struct(&png_, &info_); }
  bool ready() const { return info_ != nullptr; }
  png_structp png() const { return png_; }
  png_infop info() const { return info_; }
  const char* error() const { return error_.text; }

 private:
  png_structp png_ = nullptr;
  png_infop info_ = nullptr;
  PngErrorMessage error_;
};

/// Writes a PNG row by row to `sink`; `rows(y0, count)` gives rows [y0, y0 + count) as count x W x C levels,
/// uint8 (8-bit) or int32 (16-bit).
inline void write_png(FileSink& sink, int64_t width, int64_t height, int64_t channels, int bit_depth,
                      const std::function<torch::Tensor(int64_t, int64_t)>& rows) {
  PngWriter writer;
  TORCH_CHECK(writer.ready(), "not enough memory to start libpng");
  png_structp png = writer.png();
  png_infop info = writer.info();
  bool ok = png_call(png, [&] {
    png_set_write_fn(png, &sink, &png_write_to_sink, &png_flush_nothing);
    // The Paeth filter on every row and zlib's run-length strategy: a fused 640x480 colour image is encoded in
    // 0.018 s, against 0.086 s with libpng's defaults (a filter chosen per row, zlib level 6) and 0.024 s at
    // level 2, and comes out about as small as at level 6 (3 % larger in colour, 9 % smaller in grey; measured
    // on this project's EPYC machine).
    png_set_filter(png, PNG_FILTER_TYPE_BASE, PNG_FILTER_PAETH);
    png_set_compression_strategy(png, Z_RLE);
    png_set_IHDR(png, info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), bit_depth,
                 channels == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    if (bit_depth == 16 && little_endian()) png_set_swap(png);  // PNG stores big-endian
  });
  const int64_t samples = width * channels;
  std::vector<uint16_t> wide(bit_depth == 16 ? static_cast<size_t>(samples) : 0);
  const int64_t band = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(samples, 1));
  for (int64_t y0 = 0; ok && y0 < height; y0 += band) {
    const torch::Tensor levels = rows(y0, std::min(band, height - y0));
    for (int64_t r = 0; ok && r < levels.size(0); ++r) {
      const void* row = static_cast<const unsigned char*>(levels.data_ptr()) + r * samples * levels.element_size();
      if (bit_depth == 16) {
        const auto* values = static_cast<const int32_t*>(row);
        std::copy(values, values + samples, wide.begin());
        row = wide.data();
      }
      ok = png_call(png, [&] { png_write_row(png, static_cast<png_const_bytep>(row)); });
    }
  }
  ok = ok && png_call(png, [&] { png_write_end(png, nullptr); });
  TORCH_CHECK(ok, "libpng failed: ", writer.error());
}

inline void write_to_sink(void* sink, void* data, int size) {
  static_cast<FileSink*>(sink)->write(data, static_cast<size_t>(size));
}

}  // namespace detail

/// The header of the image at `path` (format, size, channels and bit depth as read_image returns them), read
/// without decoding the pixels. Fails, naming the file, for what read_image would refuse up front: unreadable,
/// empty or unknown files and images above `options.max_pixels`.
inline ImageInfo read_image_info(const std::string& path, const ImageReadOptions& options = {}) {
  detail::check_read_options(options);
  const int64_t most = detail::max_file_bytes(options.max_pixels());
  bool complete = false;
  ImageInfo info;
  const std::string prefix = detail::read_file_bytes(path, int64_t{1} << 16, most, &complete);
  if (detail::scan_header(prefix, complete, path, options, info)) return info;
  detail::scan_header(detail::read_file_bytes(path, most, most, &complete), /*complete=*/true, path, options, info);
  return info;
}

/// Decodes an image file held in memory as read_image does; `name` stands for the file in messages.
inline torch::Tensor decode_image(std::string_view bytes, const std::string& name, const ImageReadOptions& options = {}) {
  return detail::normalise(detail::decode(bytes, name, options), options, name);
}

/// Reads an image as a C x H x W float32 tensor in [0,1]: C = 1 for grey files, C = 3 for colour ones.
/// Alpha is dropped (grey + alpha -> 1 channel, RGBA -> 3). 8- and 16-bit files; see `Normalisation`.
/// A grey image stored as RGB (as TNO's are) stays 3 channels here; `read_grey` collapses it exactly.
inline torch::Tensor read_image(const std::string& path, const ImageReadOptions& options = {}) {
  return detail::normalise(detail::decode_file(path, options), options, path);
}

/// As read_image, but an 8-bit file under the default normalisation comes back as its uint8 levels 0..255
/// (a quarter of the memory; level / 255 is read_image's value), possibly as a view of channel-interleaved
/// memory. fusion::fuse_images takes either form and converts uint8 images tile by tile.
inline torch::Tensor read_image_compact(const std::string& path, const ImageReadOptions& options = {}) {
  detail::DecodedImage image = detail::decode_file(path, options);
  if (image.bit_depth == 8 && !options.normalise_8_bit()) return image.levels;
  return detail::normalise(std::move(image), options, path);
}

/// Reads an image as 1 x H x W luminance in [0,1], the networks' input. Grey files and colour files whose
/// channels are all equal are returned exactly; other colour files become 0.299 R + 0.587 G + 0.114 B (the
/// BT.601 luma, the Y of `rgb_to_ycbcr`). The metrics' 8-bit rounding (spec section 8) is not applied.
inline torch::Tensor read_grey(const std::string& path, const ImageReadOptions& options = {}) {
  const torch::Tensor image = read_image(path, options);
  if (image.size(0) == 1) return image;
  if (torch::equal(image[0], image[1]) && torch::equal(image[1], image[2])) return image.narrow(0, 0, 1).clone();
  return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0);
}

/// Reads a segmentation label map: an H x W int64 tensor of class ids, the pixel values of a single-channel
/// 8- or 16-bit lossless image (PNG in practice). Multi-channel files are accepted only when their colour
/// channels agree everywhere (alpha is ignored); palette and colour-coded labels are rejected. Every value
/// must be below `num_classes` or equal to `ignore_value` (-1: none), which passes through unchanged.
inline torch::Tensor read_label(const std::string& path, int64_t num_classes, int64_t ignore_value = -1) {
  TORCH_CHECK(num_classes > 0, "tdfusion: read_label needs num_classes > 0, got ", num_classes);
  const std::string extension = detail::lower_extension(path);
  TORCH_CHECK(extension != ".jpg" && extension != ".jpeg", "tdfusion: label map '", path,
              "' is a JPEG; lossy compression corrupts class ids, use PNG");
  const torch::Tensor raw = detail::decode_file(path, ImageReadOptions()).levels;
  for (int64_t c = 1; c < raw.size(0); ++c) {
    const torch::Tensor differs = raw[c] != raw[0];
    if (differs.any().item<bool>()) {
      const torch::Tensor at = differs.nonzero()[0];
      TORCH_CHECK(false, "tdfusion: label map '", path, "' has ", raw.size(0),
                  " colour channels that differ, first at pixel (row ", at[0].item<int64_t>(), ", col ",
                  at[1].item<int64_t>(),
                  "); labels must be single-channel class ids (palette and colour-coded "
                  "labels are not supported)");
    }
  }
  const torch::Tensor labels = raw[0].to(torch::kLong);
  const torch::Tensor bad = (labels >= num_classes).logical_and_(labels != ignore_value);
  if (bad.any().item<bool>()) {
    const torch::Tensor at = bad.nonzero()[0];
    const int64_t row = at[0].item<int64_t>(), col = at[1].item<int64_t>();
    TORCH_CHECK(false, "tdfusion: label map '", path, "' has class id ", labels[row][col].item<int64_t>(),
                " at pixel (row ", row, ", col ", col, "), but there are only ", num_classes, " classes",
                ignore_value >= 0 ? " (ignore value " + std::to_string(ignore_value) + ")" : std::string());
  }
  return labels.contiguous();
}

/// Writes a C x H x W (C = 1 or 3) or H x W float image with values in [0,1] (clamped, then rounded to the
/// nearest level). The format follows the extension: .png (8 or 16 bits), .jpg / .jpeg (8 bits, quality 95),
/// .bmp (8 bits; stored as 24-bit, so grey reads back as three equal channels). The file is replaced
/// atomically (see write_file_atomically): a failed write leaves the previous file, if any, untouched. PNG is
/// converted and written in bands of rows, so it needs no full-size copy of the image; JPEG and BMP need one
/// 8-bit copy.
inline void write_image(const std::string& path, const torch::Tensor& image, int bit_depth = 8) {
  TORCH_CHECK(bit_depth == 8 || bit_depth == 16, "tdfusion: cannot write '", path, "': bit depth must be 8 or 16, got ",
              bit_depth);
  const std::string extension = detail::lower_extension(path);
  const bool png = extension == ".png", jpeg = extension == ".jpg" || extension == ".jpeg", bmp = extension == ".bmp";
  TORCH_CHECK(png || jpeg || bmp, "tdfusion: cannot write '", path, "': unknown image format '", extension,
              "' (use .png, .jpg, .jpeg or .bmp)");
  TORCH_CHECK(bit_depth == 8 || png, "tdfusion: cannot write '", path, "': 16-bit output needs PNG");
  TORCH_CHECK(image.defined(), "tdfusion: cannot write '", path, "': the image is undefined");
  TORCH_CHECK(image.dim() == 2 || (image.dim() == 3 && (image.size(0) == 1 || image.size(0) == 3)),
              "tdfusion: cannot write '", path, "': expected a C x H x W image with C = 1 or 3 (or H x W), got shape ",
              image.sizes());
  TORCH_CHECK(image.is_floating_point(), "tdfusion: cannot write '", path,
              "': expected floating-point values in [0,1], got ", image.dtype());
  const torch::Tensor chw = (image.dim() == 2 ? image.unsqueeze(0) : image).detach().to(torch::kCPU);
  const int64_t channels = chw.size(0), height = chw.size(1), width = chw.size(2);
  TORCH_CHECK(height > 0 && width > 0 && height <= 65535 && width <= 65535, "tdfusion: cannot write '", path,
              "': unsupported image size ", height, " x ", width);
  const int64_t band = std::max<int64_t>(1, (int64_t{1} << 20) / width);
  for (int64_t y0 = 0; y0 < height; y0 += band) {
    TORCH_CHECK(torch::isfinite(chw.narrow(1, y0, std::min(band, height - y0))).all().item<bool>(),
                "tdfusion: cannot write '", path, "': the image contains NaN or infinite values");
  }
  const double top = bit_depth == 16 ? 65535.0 : 255.0;
  // Rows [y0, y0 + count) as count x W x C levels, rounded in double (a copy: the caller's image is untouched).
  auto rows = [&](int64_t y0, int64_t count) {
    return chw.narrow(1, y0, count)
        .to(torch::kDouble, /*non_blocking=*/false, /*copy=*/true)
        .clamp_(0.0, 1.0)
        .mul_(top)
        .round_()
        .to(bit_depth == 16 ? torch::kInt : torch::kByte)
        .permute({1, 2, 0})
        .contiguous();
  };
  const int w = static_cast<int>(width), h = static_cast<int>(height), c = static_cast<int>(channels);
  write_file_atomically(path, [&](FileSink& sink) {
    if (png) {
      detail::write_png(sink, width, height, channels, bit_depth, rows);
    } else {
      const torch::Tensor levels = rows(0, height);
      const int ok = jpeg ? stbi_write_jpg_to_func(&detail::write_to_sink, &sink, w, h, c, levels.data_ptr(), 95)
                          : stbi_write_bmp_to_func(&detail::write_to_sink, &sink, w, h, c, levels.data_ptr());
      TORCH_CHECK(ok != 0, "stb_image_write failed");
    }
  });
}

}  // namespace tdfusion::io
