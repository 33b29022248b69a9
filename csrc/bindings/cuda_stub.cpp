// Stand-ins for the CUDA entry points when the extension is built without CUDA.
#ifndef MQ_WITH_CUDA
#include <stdexcept>

#include "backend/backend.h"
#include "cuda/cuda_api.h"

namespace mq::cuda {
bool built() { return false; }
int device_count() { return 0; }
std::string device_name(int) { return ""; }
}  // namespace mq::cuda

namespace mq {
std::unique_ptr<Backend> make_cuda_backend(int) {
    throw std::runtime_error("mllama-q was built without CUDA (no nvcc at build time); reinstall with nvcc on PATH");
}
}  // namespace mq
#endif
