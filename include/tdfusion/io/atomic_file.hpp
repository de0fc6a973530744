#pragma once
// Crash-safe file replacement: a training run killed mid-save must never leave a truncated checkpoint where
// the last good one was. The content goes to a temporary file in the target's directory (same file system,
// so the rename is atomic), which is flushed to disk, renamed over the target, and the directory entry is
// flushed too. POSIX only.

#include <torch/torch.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>

namespace tdfusion::io {

namespace detail {

inline std::string errno_text(int error) { return std::string(std::strerror(error)); }

/// Directory holding `path` ("." for a bare file name).
inline std::string parent_directory(const std::string& path) {
  const std::string parent = std::filesystem::path(path).parent_path().string();
  return parent.empty() ? std::string(".") : parent;
}

/// Flushes a file or directory to stable storage. Directories on some file systems reject fsync with
/// EINVAL; there is nothing better to do there, so that case is accepted.
inline void fsync_path(const std::string& path, bool is_directory, const std::string& target) {
  const int fd = ::open(path.c_str(), is_directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  TORCH_CHECK(fd >= 0, "tdfusion: cannot open '", path, "' to flush it while writing '", target,
              "': ", errno_text(errno));
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  TORCH_CHECK(rc == 0 || (is_directory && (error == EINVAL || error == ENOTSUP)), "tdfusion: cannot flush '",
              path, "' while writing '", target, "': ", errno_text(error));
}

/// Unique per process and call, so concurrent writers (threads or processes) never share a temp file.
inline std::string temp_path_for(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  return path + ".tmp-" + std::to_string(static_cast<long long>(::getpid())) + "-" +
         std::to_string(counter.fetch_add(1));
}

}  // namespace detail

/// Replaces the file at `path` with what `writer` writes to the temporary path it is given. Either the
/// old content or the complete new content is at `path` afterwards, never a partial file. If the writer (or
/// any step after it) throws, the temporary file is removed and a c10::Error naming `path` is thrown.
inline void write_file_atomically(const std::string& path,
                                  const std::function<void(const std::string& temp_path)>& writer) {
  TORCH_CHECK(!path.empty(), "tdfusion: cannot write a file with an empty path");
  const std::string directory = detail::parent_directory(path);
  struct stat info {};
  if (::stat(directory.c_str(), &info) != 0) {
    TORCH_CHECK(false, "tdfusion: cannot write '", path, "': directory '", directory,
                "' is not accessible: ", detail::errno_text(errno));
  }
  TORCH_CHECK(S_ISDIR(info.st_mode), "tdfusion: cannot write '", path, "': '", directory,
              "' is not a directory");
  if (::access(directory.c_str(), W_OK | X_OK) != 0) {
    TORCH_CHECK(false, "tdfusion: cannot write '", path, "': directory '", directory,
                "' is not writable: ", detail::errno_text(errno));
  }

  const std::string temp = detail::temp_path_for(path);
  bool failed = false;
  std::string failure;
  try {
    writer(temp);
    TORCH_CHECK(::access(temp.c_str(), F_OK) == 0, "the writer did not create the temporary file '", temp,
                "'");
    detail::fsync_path(temp, /*is_directory=*/false, path);
    if (::rename(temp.c_str(), path.c_str()) != 0) {
      TORCH_CHECK(false, "cannot rename '", temp, "' to it: ", detail::errno_text(errno));
    }
  } catch (const c10::Error& error) {
    failed = true;
    failure = error.what_without_backtrace();
  } catch (const std::exception& error) {
    failed = true;
    failure = error.what();
  } catch (...) {
    ::unlink(temp.c_str());
    throw;
  }
  if (failed) {
    ::unlink(temp.c_str());  // may not exist; nothing to report then
    TORCH_CHECK(false, "tdfusion: failed to write '", path, "' (previous content, if any, is unchanged): ",
                failure);
  }
  // The new content is in place; flushing the directory makes the rename itself durable.
  detail::fsync_path(directory, /*is_directory=*/true, path);
}

}  // namespace tdfusion::io
