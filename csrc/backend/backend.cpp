// Host-side helpers of the Backend interface shared by every backend (backend.h).
#include <cmath>
#include <stdexcept>
#include <string>

#include "backend/backend.h"

namespace mq {

void Backend::check(const SampleParams& p) {
    auto bad = [](const std::string& what) { throw std::invalid_argument("sampling: " + what); };
    if (!std::isfinite(p.temperature) || p.temperature < 0) bad("temperature must be a finite number >= 0");
    if (p.top_k < 0) bad("top_k must be >= 0 (0 disables it)");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) bad("top_p must be in (0, 1]");
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) bad("min_p must be in [0, 1]");
    if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty <= 0) bad("repetition_penalty must be > 0");
    if (!(p.u >= 0.0 && p.u < 1.0)) bad("the draw u must be in [0, 1)");
    if (p.hist_len < 0 || p.hist_begin < 0) bad("negative history range");
}

}  // namespace mq
