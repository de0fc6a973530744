#pragma once
// ProgressBar: a training callback that draws one live line (epoch, phase, step, losses, elapsed time) and
// prints a line per epoch and per validation, like ensmallen's ProgressBar.

#include "tdfusion/meta/options.hpp"
#include "tdfusion/meta/validation.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <ostream>
#include <string>

namespace tdfusion::meta {

class ProgressBar {
 public:
  /// @param out   where the per-epoch and validation lines go
  /// @param live  where the live line is redrawn, only when it is a terminal (stderr by default): logs
  ///              redirected to a file get the per-epoch lines only
  explicit ProgressBar(std::ostream& out = std::cout, std::ostream& live = std::cerr)
      : out_(&out), live_(&live), start_(Clock::now()), terminal_(&live == &std::cerr && isatty(STDERR_FILENO) != 0) {}

  void operator()(const MetaStepReport& r) const { draw(r, "meta", r.fusion_loss, r.task_loss); }
  void operator()(const TrainStepReport& r) const { draw(r, "train", r.fusion_loss, r.task_loss); }
  void operator()(const FusionStepReport& r) const { draw(r, "fuse", r.fusion_loss, std::nan("")); }
  void operator()(const EpochReport& r) const {
    if (terminal_) *live_ << "\r\033[K" << std::flush;
    *out_ << "epoch " << r.epoch + 1 << "/" << r.epochs << ": fusion loss " << r.fusion_loss << ", task loss "
          << r.task_loss << ", lr " << r.learning_rate << std::endl;
  }
  void operator()(const ValidationReport& r) const { *out_ << "  " << format_validation(r) << std::endl; }

 private:
  using Clock = std::chrono::steady_clock;
  void draw(const StepPosition& at, const char* phase, double fusion, double task) const {
    if (!terminal_) return;
    const int width = 20;
    const int filled = static_cast<int>(width * (at.step + 1) / std::max<int64_t>(at.steps, 1));
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    std::ostream& line = *live_;
    const auto flags = line.flags();
    const auto precision = line.precision();
    line << "\r\033[Kepoch " << at.epoch + 1 << "/" << at.epochs << " " << std::setw(5) << phase << " ["
         << std::string(static_cast<size_t>(std::min(filled, width)), '#')
         << std::string(static_cast<size_t>(width - std::min(filled, width)), '.') << "] " << at.step + 1 << "/"
         << at.steps << "  fusion " << std::setprecision(4) << fusion;
    if (std::isfinite(task)) line << "  task " << task;
    line << "  " << std::fixed << std::setprecision(0) << seconds << " s" << std::flush;
    line.flags(flags);
    line.precision(precision);
  }

  std::ostream* out_;
  std::ostream* live_;
  Clock::time_point start_;
  bool terminal_;
};

}  // namespace tdfusion::meta
