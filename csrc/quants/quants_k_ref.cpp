// Reference Q4_K / Q6_K quantizers (bit-exact with ggml's quantize_row_q4_K_ref
// and quantize_row_q6_K_ref). PLACEHOLDER: implemented in the quantizer work.
#include <stdexcept>

#include "quants/quants.h"

namespace mq {

void quantize_row_q4_K_ref(const float*, block_q4_K*, int64_t) {
    throw std::runtime_error("quantize_row_q4_K_ref: not implemented yet");
}
void quantize_row_q6_K_ref(const float*, block_q6_K*, int64_t) {
    throw std::runtime_error("quantize_row_q6_K_ref: not implemented yet");
}

}  // namespace mq
