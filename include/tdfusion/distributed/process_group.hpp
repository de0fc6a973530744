#pragma once
// Multi-process data-parallel training on LibTorch's c10d: a TCP store for the rendezvous (so the processes may
// run on several machines) and a Gloo process group for CPU tensors, or NCCL for CUDA tensors when LibTorch was
// built with it (USE_C10D_NCCL). Include this header only where processes are wired up (it pulls in c10d and
// Gloo's headers); the optimiser sees the meta::Communicator interface.
//
//   auto comm = distributed::ProcessGroupCommunicator::connect({"127.0.0.1", 29500, rank, world_size});
//   trainer.set_communicator(comm);

#include "tdfusion/meta/communicator.hpp"

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace tdfusion::distributed {

struct Rendezvous {
  std::string host = "127.0.0.1";  ///< where rank 0 serves the TCP store
  uint16_t port = 29500;
  int rank = 0;
  int world_size = 1;
  std::chrono::milliseconds timeout = std::chrono::minutes(5);  ///< for the rendezvous and every collective
  torch::Device device = torch::kCPU;                           ///< CUDA: NCCL (when built with it)
};

namespace detail {
// LibTorch 2.4 and later start the TCP store on libuv by default, which not every build has (Debian's has not:
// "use_libuv was requested but PyTorch was build without libuv support"). The socket backend is in every build
// and ample for a few processes; LibTorch 1.x has only that one and no option to choose.
template <class Options>
auto use_socket_store(Options& options, int) -> decltype(options.useLibUV = false, void()) {
  options.useLibUV = false;
}
template <class Options>
void use_socket_store(Options&, long) {}
}  // namespace detail

/// meta::Communicator over a c10d process group. Tensors are flattened into one buffer per call, so a whole
/// network's gradients cost one collective.
class ProcessGroupCommunicator : public meta::Communicator {
 public:
  static std::shared_ptr<ProcessGroupCommunicator> connect(const Rendezvous& r) {
    TORCH_CHECK(r.world_size >= 1 && r.rank >= 0 && r.rank < r.world_size, "tdfusion: rank ", r.rank,
                " is outside a world of ", r.world_size, " processes");
    c10d::TCPStoreOptions store_options;
    store_options.port = r.port;
    store_options.isServer = r.rank == 0;
    store_options.numWorkers = static_cast<size_t>(r.world_size);
    store_options.timeout = r.timeout;
    detail::use_socket_store(store_options, 0);
    auto store = c10::make_intrusive<c10d::TCPStore>(r.host, store_options);
    auto comm = std::shared_ptr<ProcessGroupCommunicator>(new ProcessGroupCommunicator(r));
    if (r.device.is_cuda()) {
#ifdef USE_C10D_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = r.timeout;
      comm->nccl_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, r.rank, r.world_size, options);
#else
      TORCH_CHECK(false, "tdfusion: multi-process training on CUDA needs a LibTorch built with NCCL");
#endif
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(r.timeout);
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(r.host));
      comm->gloo_ = c10::make_intrusive<c10d::ProcessGroupGloo>(store, r.rank, r.world_size, options);
    }
    comm->store_ = store;
    return comm;
  }

  int rank() const override { return rendezvous_.rank; }
  int world_size() const override { return rendezvous_.world_size; }

  void average(const std::vector<torch::Tensor>& tensors) override {
    for (const auto& t : tensors) {
      TORCH_CHECK(t.is_floating_point(), "tdfusion: only floating-point tensors can be averaged across processes");
    }
    collective(tensors, [this](std::vector<at::Tensor>& flat) {
      c10d::AllreduceOptions options;
      options.reduceOp = c10d::ReduceOp::SUM;
      run([&](auto& group) { return group->allreduce(flat, options); });
      flat[0].div_(static_cast<double>(rendezvous_.world_size));
    });
  }

  void broadcast(const std::vector<torch::Tensor>& tensors) override {
    collective(tensors, [this](std::vector<at::Tensor>& flat) {
      c10d::BroadcastOptions options;
      options.rootRank = 0;
      run([&](auto& group) { return group->broadcast(flat, options); });
    });
  }

 private:
  explicit ProcessGroupCommunicator(Rendezvous r) : rendezvous_(std::move(r)) {}

  template <class Start>
  void run(const Start& start) {
    if (gloo_) {
      start(gloo_)->wait();
      return;
    }
#ifdef USE_C10D_NCCL
    start(nccl_)->wait();
#endif
  }

  /// Packs the tensors of each dtype into one contiguous buffer, runs `op` on it, and copies the result back.
  template <class Op>
  void collective(const std::vector<torch::Tensor>& tensors, const Op& op) {
    if (rendezvous_.world_size == 1) return;
    torch::NoGradGuard no_grad;
    std::vector<torch::ScalarType> types;
    for (const auto& t : tensors) {
      if (std::find(types.begin(), types.end(), t.scalar_type()) == types.end()) types.push_back(t.scalar_type());
    }
    for (const torch::ScalarType type : types) {
      std::vector<torch::Tensor> group, parts;
      for (const auto& t : tensors) {
        if (t.scalar_type() != type) continue;
        group.push_back(t.detach());
        parts.push_back(t.detach().reshape({-1}));
      }
      std::vector<at::Tensor> flat = {torch::cat(parts)};
      op(flat);
      int64_t offset = 0;
      for (auto& t : group) {
        t.copy_(flat[0].narrow(0, offset, t.numel()).view_as(t));
        offset += t.numel();
      }
    }
  }

  Rendezvous rendezvous_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_;
#ifdef USE_C10D_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_;
#endif
};

}  // namespace tdfusion::distributed
