#pragma once
// Crash-safe file replacement that cannot be redirected. A training run killed mid-save must never leave a
// truncated checkpoint where the last good one was, and in a directory other users can write to, nobody may
// make tdfusion write through a planted symlink. So the content goes to a fresh temporary file in the target's
// directory (same file system, so the rename is atomic), created under an unpredictable name with O_CREAT |
// O_EXCL | O_NOFOLLOW and mode 0600 (as mkstemp does), written through that descriptor only (never reopened by
// name), given the mode a newly created file would get, flushed to disk, renamed over the target, and the
// directory entry is flushed too. Every step works on one descriptor of the directory, so a path that changes
// meanwhile cannot send the file elsewhere. POSIX only.
//
// A process killed while writing leaves its temporary behind: `<target name>.tdfusion-tmp-<16 hex digits>`.
// remove_stale_temporaries and remove_stale_temporaries_of delete those (and the `<name>.tmp-<pid>-<n>` files of
// earlier versions) when no writer can be active, e.g. under a lock of the folder.

#include <torch/torch.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace tdfusion::io {

inline constexpr std::string_view kTemporaryMarker = ".tdfusion-tmp-";

namespace detail {

inline std::string errno_text(int error) { return std::string(std::strerror(error)); }

/// Closes a descriptor at scope exit (errors of close on a file being written are checked where it matters).
class Descriptor {
 public:
  explicit Descriptor(int fd = -1) : fd_(fd) {}
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  ~Descriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  void reset(int fd) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }
  /// Closes now and returns close's result (-1 with errno set on failure).
  int close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd);
  }

 private:
  int fd_;
};

/// The process's file-creation mask. Linux publishes it in /proc/self/status; elsewhere it can only be read by
/// setting it, which is done under a lock (other threads creating files at that instant would see 0).
inline mode_t current_umask() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Umask:", 0) == 0) return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8));
  }
  static std::mutex lock;
  const std::lock_guard<std::mutex> guard(lock);
  const mode_t mask = ::umask(0);
  ::umask(mask);
  return mask;
}

/// A temporary's name for the target file `name`: a random 64-bit suffix (not the pid or a counter, which
/// another user could predict and plant a link under).
inline std::string temporary_name(const std::string& name) {
  static std::mutex lock;  // std::random_device is not guaranteed to be thread-safe
  uint64_t bits = 0;
  {
    const std::lock_guard<std::mutex> guard(lock);
    static std::random_device device;
    bits = (static_cast<uint64_t>(device()) << 32) ^ device();
  }
  char suffix[17];
  std::snprintf(suffix, sizeof(suffix), "%016llx", static_cast<unsigned long long>(bits));
  return name + std::string(kTemporaryMarker) + suffix;
}

inline bool all_of(std::string_view text, int (*predicate)(int)) {
  for (char c : text) {
    if (predicate(static_cast<unsigned char>(c)) == 0) return false;
  }
  return !text.empty();
}

/// The target name of a temporary `name` (".tdfusion-tmp-" and 16 hex digits, or the earlier versions'
/// ".tmp-<pid>-<counter>"), or "" when `name` is not one.
inline std::string target_of_temporary(const std::string& name) {
  const size_t marker = name.rfind(kTemporaryMarker);
  if (marker != std::string::npos && marker > 0) {
    const std::string_view suffix = std::string_view(name).substr(marker + kTemporaryMarker.size());
    if (suffix.size() == 16 && all_of(suffix, &::isxdigit)) return name.substr(0, marker);
  }
  const size_t legacy = name.rfind(".tmp-");
  if (legacy != std::string::npos && legacy > 0) {
    const std::string_view suffix = std::string_view(name).substr(legacy + 5);
    const size_t dash = suffix.find('-');
    if (dash != std::string_view::npos && all_of(suffix.substr(0, dash), &::isdigit) &&
        all_of(suffix.substr(dash + 1), &::isdigit)) {
      return name.substr(0, legacy);
    }
  }
  return "";
}

/// Removes the temporaries in `folder` (of the target `target_name` only, unless it is empty) that are regular
/// files owned by this user; returns their paths. Links and other users' files under such names are left alone.
inline std::vector<std::string> remove_temporaries(const std::string& folder, const std::string& target_name) {
  std::vector<std::string> removed;
  Descriptor directory(::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  TORCH_CHECK(directory.get() >= 0, "tdfusion: cannot look for stale temporary files in '", folder,
              "': ", errno_text(errno));
  std::vector<std::string> names;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(folder, error)) {
    names.push_back(entry.path().filename().string());
  }
  TORCH_CHECK(!error, "tdfusion: cannot list '", folder, "': ", error.message());
  for (const std::string& name : names) {
    const std::string target = target_of_temporary(name);
    if (target.empty() || (!target_name.empty() && target != target_name)) continue;
    struct stat info {};
    if (::fstatat(directory.get(), name.c_str(), &info, AT_SYMLINK_NOFOLLOW) != 0) continue;  // gone meanwhile
    if (!S_ISREG(info.st_mode) || info.st_uid != ::geteuid()) continue;
    const std::string path = (std::filesystem::path(folder) / name).string();
    TORCH_CHECK(::unlinkat(directory.get(), name.c_str(), 0) == 0 || errno == ENOENT,
                "tdfusion: cannot remove the stale temporary file '", path, "': ", errno_text(errno));
    removed.push_back(path);
  }
  return removed;
}

}  // namespace detail

/// Where the writer of write_file_atomically puts the content: the open temporary file, written through its
/// descriptor with a buffer. `write` never throws (C libraries call it from callbacks): the first failure is
/// kept, later writes are ignored, and write_file_atomically reports it.
class FileSink {
 public:
  explicit FileSink(int fd) : fd_(fd) { buffer_.reserve(kBufferSize); }

  /// Appends `size` bytes; returns `size`, or 0 once writing has failed (the convention of torch's writer
  /// functions, e.g. OutputArchive::save_to).
  size_t write(const void* data, size_t size) noexcept {
    if (error_ != 0) return 0;
    const char* bytes = static_cast<const char*>(data);
    if (buffer_.size() + size > kBufferSize) flush();
    if (error_ == 0 && size >= kBufferSize) {
      write_all(bytes, size);
    } else if (error_ == 0) {
      buffer_.insert(buffer_.end(), bytes, bytes + size);
    }
    return error_ == 0 ? size : 0;
  }
  size_t write(std::string_view text) noexcept { return write(text.data(), text.size()); }

  /// Writes out the buffer; the errno of the first failure so far (0: none).
  int flush() noexcept {
    if (error_ == 0 && !buffer_.empty()) write_all(buffer_.data(), buffer_.size());
    buffer_.clear();
    return error_;
  }
  int error() const { return error_; }

 private:
  static constexpr size_t kBufferSize = size_t{1} << 16;

  void write_all(const char* bytes, size_t size) noexcept {
    while (size > 0) {
      const ssize_t written = ::write(fd_, bytes, size);
      if (written < 0 && errno == EINTR) continue;
      if (written <= 0) {
        error_ = written < 0 ? errno : EIO;
        return;
      }
      bytes += written;
      size -= static_cast<size_t>(written);
    }
  }

  int fd_;
  int error_ = 0;
  std::vector<char> buffer_;
};

/// Replaces the file at `path` with what `writer` writes to the sink it is given. Either the old content or
/// the complete new content is at `path` afterwards, never a partial file, and nothing but `path` (a link
/// there is replaced, not followed) and a temporary of its own can be created or changed. The new file gets
/// the permissions of any newly created file (0666 less the umask). If the writer (or any step after it)
/// fails, the temporary is removed and a c10::Error naming `path` is thrown.
inline void write_file_atomically(const std::string& path, const std::function<void(FileSink&)>& writer) {
  namespace fs = std::filesystem;
  TORCH_CHECK(!path.empty(), "tdfusion: cannot write a file with an empty path");
  const std::string name = fs::path(path).filename().string();
  TORCH_CHECK(!name.empty() && name != "." && name != "..", "tdfusion: cannot write '", path,
              "': it names a directory, not a file");
  const std::string parent = fs::path(path).parent_path().string();
  const std::string directory_path = parent.empty() ? std::string(".") : parent;
  detail::Descriptor directory(::open(directory_path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (directory.get() < 0) {
    const int error = errno;
    TORCH_CHECK(false, "tdfusion: cannot write '", path, "': directory '", directory_path, "' ",
                error == ENOTDIR ? "is not a directory" : "is not accessible: " + detail::errno_text(error));
  }

  std::string temp;
  detail::Descriptor file;
  for (int attempt = 0; attempt < 100 && file.get() < 0; ++attempt) {
    temp = detail::temporary_name(name);
    file.reset(::openat(directory.get(), temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (file.get() < 0 && errno != EEXIST) {
      TORCH_CHECK(false, "tdfusion: cannot write '", path, "': cannot create a file in directory '",
                  directory_path, "': ", detail::errno_text(errno));
    }
  }
  TORCH_CHECK(file.get() >= 0, "tdfusion: cannot write '", path, "': no free temporary name in '",
              directory_path, "'");

  FileSink sink(file.get());
  bool failed = true;
  std::string failure;
  try {
    writer(sink);
    // The mode first, so that fsync makes it durable with the content.
    int error = sink.flush();
    if (error == 0 && ::fchmod(file.get(), 0666 & ~detail::current_umask()) != 0) error = errno;
    if (error == 0 && ::fsync(file.get()) != 0) error = errno;
    if (error == 0 && file.close() != 0) error = errno;
    TORCH_CHECK(error == 0, detail::errno_text(error));
    TORCH_CHECK(::renameat(directory.get(), temp.c_str(), directory.get(), name.c_str()) == 0,
                "cannot move the new file into place: ", detail::errno_text(errno));
    failed = false;
  } catch (const c10::Error& error) {
    failure = error.what_without_backtrace();
  } catch (const std::exception& error) {
    failure = error.what();
  } catch (...) {
    ::unlinkat(directory.get(), temp.c_str(), 0);
    throw;
  }
  if (failed) {
    // A failed write (a full disk, say) is the cause of whatever the writer made of it.
    if (sink.error() != 0) failure = detail::errno_text(sink.error());
    ::unlinkat(directory.get(), temp.c_str(), 0);
    TORCH_CHECK(false, "tdfusion: failed to write '", path, "' (previous content, if any, is unchanged): ",
                failure);
  }
  // The new content is in place; flushing the directory makes the rename itself durable. Some file systems
  // reject fsync on directories (EINVAL); there is nothing better to do there.
  if (::fsync(directory.get()) != 0) {
    const int error = errno;
    TORCH_CHECK(error == EINVAL || error == ENOTSUP, "tdfusion: wrote '", path,
                "' but cannot flush its directory: ", detail::errno_text(error));
  }
}

/// Replaces the file at `path` with `text` atomically (JSON, CSV, Markdown, ...), as write_file_atomically.
inline void write_text_atomically(const std::string& path, std::string_view text) {
  write_file_atomically(path, [&](FileSink& sink) { sink.write(text); });
}

/// Removes the temporaries that interrupted writes left in `folder` (every target's), if they are regular files
/// owned by this user; returns their paths. Only safe when nothing is writing into `folder` (e.g. under a lock
/// of it): a live writer's temporary looks the same.
inline std::vector<std::string> remove_stale_temporaries(const std::string& folder) {
  return detail::remove_temporaries(folder, "");
}

/// As remove_stale_temporaries, for the temporaries of the one target file `path`.
inline std::vector<std::string> remove_stale_temporaries_of(const std::string& path) {
  namespace fs = std::filesystem;
  const std::string parent = fs::path(path).parent_path().string();
  return detail::remove_temporaries(parent.empty() ? std::string(".") : parent, fs::path(path).filename().string());
}

}  // namespace tdfusion::io
