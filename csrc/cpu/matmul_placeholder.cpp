// PLACEHOLDER matmul (dequantize a row of W, dot with every row of X) so the
// rest of the tree links and runs; replaced by the real kernels.
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "cpu/matmul.h"
#include "quants/quants.h"

namespace mq::cpu {

const CpuFeatures& cpu_features() { static CpuFeatures f; return f; }
Path best_path() { return Path::Scalar; }
Path active_path() { return Path::Scalar; }
void set_cpu_path(const std::string& name) {
    if (!name.empty() && name != "auto" && name != "scalar") throw std::invalid_argument("unsupported cpu path " + name);
}
const char* path_name(Path) { return "scalar"; }
std::vector<std::string> available_paths() { return {"scalar"}; }

void matmul(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, DType wtype, int64_t N,
            float* y, int64_t ldy, ThreadPool& pool) {
    const size_t rs = row_size(wtype, K);
    pool.parallel_for(N, [&](int64_t n, int) {
        std::vector<float> wr(K);
        dequantize_row(wtype, static_cast<const uint8_t*>(w) + n * rs, wr.data(), K);
        for (int64_t m = 0; m < M; m++) {
            double acc = 0;
            for (int64_t k = 0; k < K; k++) acc += double(x[m * ldx + k]) * wr[k];
            y[m * ldy + n] = float(acc);
        }
    });
}

}  // namespace mq::cpu
