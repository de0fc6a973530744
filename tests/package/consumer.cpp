// Uses the installed headers: fuses a pair with ReFusion and prints the parameter count.
#include <tdfusion/tdfusion.hpp>

#include <iostream>

int main() {
  tdfusion::fusion::ReFusion net;
  int64_t count = 0;
  for (const auto& p : net->parameters()) count += p.numel();
  const torch::Tensor fused = net->forward(torch::rand({1, 1, 9, 11}), torch::rand({1, 1, 9, 11}));
  std::cout << "consumer: ReFusion parameters " << count << ", fused " << fused.size(2) << "x" << fused.size(3)
            << std::endl;
  return count == 59856 && fused.size(2) == 9 && fused.size(3) == 11 ? 0 : 1;
}
