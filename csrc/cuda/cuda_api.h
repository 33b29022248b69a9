// Host-side entry points of the CUDA backend that the rest of the extension
// may call whether or not CUDA was built (see bindings/module.cpp).
#pragma once
#include <string>

namespace mq::cuda {
bool built();                         // compiled with CUDA
int device_count();                   // usable devices now (0 without driver/GPU); never throws
std::string device_name(int device);  // "" when unavailable
}  // namespace mq::cuda
