#pragma once
// Image files in and out. Decoding goes through Debian's compiled stb (libstb: PNG, JPEG, BMP, TGA, GIF, PSD,
// PNM; 8 and 16 bits per channel), so no stb implementation is compiled into the programs that include this.
// PNG is written by libpng (8 and 16 bits, row by row: stb_image_write has no 16-bit encoder and needs the
// whole image in 8 bits), JPEG and BMP by stb_image_write, all through the sink of write_file_atomically.
// Every error names the file and what is wrong with it.

#include "tdfusion/io/atomic_file.hpp"

#include <torch/torch.h>

#include <png.h>
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <csetjmp>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace tdfusion::io {

/// How raw sample values v become [0,1] intensities. Thermal cameras often store 14 significant bits in a
/// 16-bit file, or a narrow band of the full range, which full_range would render nearly black.
enum class Normalisation {
  full_range,  ///< v / 65535 (16-bit files), v / 255 (8-bit files)
  min_max,     ///< (v - min) / (max - min) over the whole image, all channels together; a constant image gives 0
  window,      ///< (v - window_low) / (window_high - window_low), clamped to [0,1]; bounds in the file's units
};

struct ImageReadOptions {
  /// Applies to 16-bit files; 8-bit files are always v / 255 unless `normalise_8_bit` is set.
  TORCH_ARG(Normalisation, normalisation) = Normalisation::full_range;
  TORCH_ARG(double, window_low) = 0.0;       ///< raw value mapped to 0 by `window`
  TORCH_ARG(double, window_high) = 65535.0;  ///< raw value mapped to 1 by `window`
  TORCH_ARG(bool, normalise_8_bit) = false;  ///< also apply `normalisation` to 8-bit files
};

namespace detail {

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};
using FileHandle = std::unique_ptr<std::FILE, FileCloser>;

struct StbFree {
  void operator()(void* pixels) const { stbi_image_free(pixels); }
};

inline std::string stb_reason() {
  const char* reason = stbi_failure_reason();
  return reason != nullptr ? std::string(reason) : std::string("unknown error");
}

/// Lower-case extension with its dot ("" when there is none).
inline std::string lower_extension(const std::string& path) {
  std::string extension = std::filesystem::path(path).extension().string();
  std::transform(extension.begin(), extension.end(), extension.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return extension;
}

inline FileHandle open_image(const std::string& path) {
  TORCH_CHECK(!path.empty(), "tdfusion: cannot read an image from an empty path");
  std::error_code error;
  TORCH_CHECK(!std::filesystem::is_directory(path, error), "tdfusion: cannot read image '", path,
              "': it is a directory");
  FileHandle file(std::fopen(path.c_str(), "rb"));
  if (!file) {
    const int code = errno;
    TORCH_CHECK(false, "tdfusion: cannot open image '", path, "': ", std::strerror(code));
  }
  return file;
}

/// A decoded image: raw sample values (0..255 or 0..65535) as a C x H x W int32 tensor.
struct DecodedImage {
  torch::Tensor raw;
  int bit_depth = 8;
  int file_channels = 0;  ///< as stored: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA
};

/// Interleaved H x W x C samples -> planar C x H x W.
template <class Sample>
void deinterleave(const Sample* in, int32_t* out, int64_t plane, int channels) {
  for (int64_t i = 0; i < plane; ++i) {
    for (int c = 0; c < channels; ++c) out[c * plane + i] = in[i * channels + c];
  }
}

/// Decodes `path`. With `keep_channels` the stored channels are returned as they are; otherwise alpha is
/// dropped (grey + alpha -> 1 channel, RGBA -> 3).
inline DecodedImage decode_image(const std::string& path, bool keep_channels) {
  FileHandle file = open_image(path);
  int width = 0, height = 0, channels = 0;
  if (stbi_info_from_file(file.get(), &width, &height, &channels) == 0) {
    std::error_code error;
    TORCH_CHECK(std::filesystem::file_size(path, error) != 0 || error, "tdfusion: cannot read image '", path,
                "': the file is empty");
    TORCH_CHECK(false, "tdfusion: cannot read image '", path, "': not a readable image (", stb_reason(),
                "); supported formats are PNG, JPEG, BMP, TGA, GIF, PSD and PNM");
  }
  TORCH_CHECK(stbi_is_hdr_from_file(file.get()) == 0, "tdfusion: cannot read image '", path,
              "': Radiance HDR images are not supported");
  const bool sixteen_bit = stbi_is_16_bit_from_file(file.get()) != 0;
  const int wanted = keep_channels ? channels : (channels >= 3 ? 3 : 1);

  stbi_set_flip_vertically_on_load_thread(0);  // whatever another user of stb set globally
  int stored = 0;
  std::unique_ptr<void, StbFree> pixels(
      sixteen_bit ? static_cast<void*>(stbi_load_from_file_16(file.get(), &width, &height, &stored, wanted))
                  : static_cast<void*>(stbi_load_from_file(file.get(), &width, &height, &stored, wanted)));
  TORCH_CHECK(pixels != nullptr, "tdfusion: cannot decode image '", path, "': ", stb_reason(),
              " (corrupt or truncated file?)");

  torch::Tensor raw = torch::empty({wanted, height, width}, torch::kInt);
  const int64_t plane = static_cast<int64_t>(height) * width;
  if (sixteen_bit) {
    deinterleave(static_cast<const uint16_t*>(pixels.get()), raw.data_ptr<int32_t>(), plane, wanted);
  } else {
    deinterleave(static_cast<const uint8_t*>(pixels.get()), raw.data_ptr<int32_t>(), plane, wanted);
  }
  return {raw, sixteen_bit ? 16 : 8, stored};
}

inline void check_read_options(const ImageReadOptions& options) {
  if (options.normalisation() == Normalisation::window) {
    TORCH_CHECK(std::isfinite(options.window_low()) && std::isfinite(options.window_high()) &&
                    options.window_high() > options.window_low(),
                "tdfusion: the normalisation window needs window_low < window_high, got [", options.window_low(), ", ",
                options.window_high(), "]");
  }
}

inline torch::Tensor normalise(const torch::Tensor& raw, int bit_depth, const ImageReadOptions& options) {
  torch::Tensor values = raw.to(torch::kFloat);
  const bool configurable = bit_depth == 16 || options.normalise_8_bit();
  switch (configurable ? options.normalisation() : Normalisation::full_range) {
    case Normalisation::full_range:
      return values.div_(bit_depth == 16 ? 65535.0 : 255.0);
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

/// Reads an image as a C x H x W float32 tensor in [0,1]: C = 1 for grey files, C = 3 for colour ones.
/// Alpha is dropped (grey + alpha -> 1 channel, RGBA -> 3). 8- and 16-bit files; see `Normalisation`.
/// A grey image stored as RGB (as TNO's are) stays 3 channels here; `read_grey` collapses it exactly.
inline torch::Tensor read_image(const std::string& path, const ImageReadOptions& options = {}) {
  detail::check_read_options(options);
  const detail::DecodedImage decoded = detail::decode_image(path, /*keep_channels=*/false);
  return detail::normalise(decoded.raw, decoded.bit_depth, options);
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
  const detail::DecodedImage decoded = detail::decode_image(path, /*keep_channels=*/true);
  const int colour_channels = decoded.file_channels >= 3 ? 3 : 1;
  const torch::Tensor raw = decoded.raw;
  for (int c = 1; c < colour_channels; ++c) {
    const torch::Tensor differs = raw[c] != raw[0];
    if (differs.any().item<bool>()) {
      const torch::Tensor at = differs.nonzero()[0];
      TORCH_CHECK(false, "tdfusion: label map '", path, "' has ", colour_channels,
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
