#pragma once
// Starting the processes of a data-parallel run on one machine: this process becomes rank 0 and starts
// ranks 1 .. N-1 as copies of its own program (posix_spawn of /proc/self/exe), each told its rank and the
// rendezvous port on its command line. POSIX (Linux) only.

#include <torch/torch.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

extern char** environ;

namespace tdfusion::distributed {

/// A TCP port on the loopback interface that was free a moment ago (for the rendezvous of local ranks).
inline uint16_t free_port() {
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

/// The device of local rank `rank` of `nproc` for a requested device: NCCL runs one process per GPU, so
/// `cuda` becomes `cuda:<rank>`, and the machine must have a GPU for each process. Other devices are kept.
inline torch::Device local_rank_device(const torch::Device& requested, int64_t rank, int64_t nproc) {
  if (!requested.is_cuda()) return requested;
  TORCH_CHECK(!requested.has_index(), "tdfusion: ", nproc, " processes take the device cuda, not ", requested.str(),
              ": each process gets a GPU of its own (process r uses cuda:r)");
  const auto gpus = static_cast<int64_t>(torch::cuda::device_count());
  TORCH_CHECK(nproc <= gpus, "tdfusion: ", nproc, " processes on cuda need ", nproc,
              " GPUs (NCCL runs one process per GPU), but this machine has ", gpus);
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(rank));
}

/// The child processes of rank 0 on this machine. Starts ranks 1 .. nproc-1 with the command lines that
/// `command_of(rank)` gives (argv[0] included; the program is this process's own), their standard output
/// discarded. If starting one fails, or the object is destroyed before wait(), the children are stopped.
class LocalRanks {
 public:
  LocalRanks(int64_t nproc, const std::function<std::vector<std::string>(int64_t rank)>& command_of) {
    for (int64_t rank = 1; rank < nproc; ++rank) {
      std::vector<std::string> words = command_of(rank);
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
        stop();
        TORCH_CHECK(false, "tdfusion: cannot start training process ", rank, ": ", std::strerror(error));
      }
      children_.push_back(child);
    }
  }
  LocalRanks(const LocalRanks&) = delete;
  LocalRanks& operator=(const LocalRanks&) = delete;
  ~LocalRanks() { stop(); }

  /// Waits for every child; true when all exited with status 0.
  bool wait() {
    bool ok = true;
    for (const pid_t child : children_) {
      int status = 0;
      ::waitpid(child, &status, 0);
      ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    children_.clear();
    return ok;
  }

 private:
  void stop() {
    for (const pid_t child : children_) ::kill(child, SIGTERM);
    for (const pid_t child : children_) ::waitpid(child, nullptr, 0);
    children_.clear();
  }

  std::vector<pid_t> children_;
};

}  // namespace tdfusion::distributed
