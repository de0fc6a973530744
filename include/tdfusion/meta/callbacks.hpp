#pragma once
// Callbacks of the bilevel optimiser are duck-typed: any object callable with a MetaStepReport,
// TrainStepReport or EpochReport is called with the reports it accepts and ignores the rest (a lambda
// takes one kind, a struct with several operator() overloads several). Returning true stops training.

#include "tdfusion/meta/options.hpp"
#include "tdfusion/meta/validation.hpp"

#include <ostream>
#include <type_traits>

namespace tdfusion::meta {

namespace detail {
template <class Callback, class Report>
bool call_if_accepted(Callback& callback, const Report& report) {
  if constexpr (std::is_invocable_v<Callback&, const Report&>) {
    if constexpr (std::is_void_v<std::invoke_result_t<Callback&, const Report&>>) {
      callback(report);
      return false;
    } else {
      return static_cast<bool>(callback(report));
    }
  } else {
    return false;
  }
}
}  // namespace detail

/// Calls every callback that accepts `report`; true when any asks to stop.
template <class Report, class... Callbacks>
bool notify(const Report& report, Callbacks&... callbacks) {
  bool stop = false;
  ((stop = detail::call_if_accepted(callbacks, report) || stop), ...);
  return stop;
}

/// Prints one line per epoch and per validation (and per meta step when `verbose`).
class PrintLosses {
 public:
  explicit PrintLosses(std::ostream& out, bool verbose = false) : out_(&out), verbose_(verbose) {}
  void operator()(const MetaStepReport& r) const {
    if (verbose_)
      *out_ << "epoch " << r.epoch << " meta step " << r.step << ": fusion loss " << r.fusion_loss
            << ", outer task loss " << r.task_loss << ", max|hypergradient| " << r.hypergradient_max << '\n';
  }
  void operator()(const EpochReport& r) const {
    *out_ << "epoch " << r.epoch << ": fusion loss " << r.fusion_loss << ", task loss " << r.task_loss << ", lr "
          << r.learning_rate << std::endl;
  }
  void operator()(const ValidationReport& r) const { *out_ << format_validation(r) << std::endl; }

 private:
  std::ostream* out_;
  bool verbose_;
};

}  // namespace tdfusion::meta
