// PLACEHOLDER until the CUDA backend lands (branch `cuda` deletes this file):
// the CUDA build links and imports, and asking for the backend says why not.
#include <stdexcept>

#include "backend/backend.h"

namespace mq {
std::unique_ptr<Backend> make_cuda_backend(int) {
    throw std::runtime_error("the CUDA backend is not implemented in this build yet");
}
}  // namespace mq
