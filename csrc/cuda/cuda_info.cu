// Device discovery for backends(). Linked only when CUDA is built.
#include <cuda_runtime.h>

#include "cuda/cuda_api.h"

namespace mq::cuda {
bool built() { return true; }
int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error
        return 0;
    }
    return n;
}
std::string device_name(int device) {
    cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
        cudaGetLastError();
        return "";
    }
    return p.name;
}
}  // namespace mq::cuda
