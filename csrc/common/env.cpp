// The one place the compiled core reads the environment (see env.h).
#include "common/env.h"

#include <cstdlib>
#include <cstring>

namespace mq::env {
namespace {

bool equals(const char* name, const char* value) {
    const char* e = std::getenv(name);
    return e && std::strcmp(e, value) == 0;
}

}  // namespace

const char* cpu_path() { return std::getenv("MLLAMA_Q_CPU_PATH"); }

int num_threads() {
    const char* e = std::getenv("MLLAMA_Q_NUM_THREADS");
    const int n = e ? std::atoi(e) : 0;
    return n > 0 ? n : 0;
}

bool cpu_attn_direct() { return !equals("MLLAMA_Q_ATTN_DIRECT", "0"); }

bool profile() {
    const char* e = std::getenv("MLLAMA_Q_PROFILE");
    return e && *e && std::strcmp(e, "0") != 0;
}

bool cuda_gemm_simple() { return equals("MLLAMA_Q_CUDA_GEMM", "simple"); }
bool cuda_attn_simt() { return equals("MLLAMA_Q_CUDA_ATTN", "simt"); }
bool cuda_poison() { return equals("MLLAMA_Q_CUDA_POISON", "1"); }

}  // namespace mq::env
