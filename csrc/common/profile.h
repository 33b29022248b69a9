// Opt-in per-op profiler for the CPU backend and the model code.
//
// Off by default and then free: every timing site is
//     const uint64_t t0 = prof::start();        // 0 when profiling is off
//     ... work ...
//     if (t0) prof::record("matmul", detail, t0, flop, bytes);
// i.e. one relaxed atomic load per op when off (no clock read, no string).
// On: entries are accumulated per (region, op, detail): calls, wall seconds,
// FLOP and bytes moved, so a report can give time, GFLOP/s and GB/s per op
// and weight shape. `region` is a label the model code sets around a part of
// its forward pass (prof::Region, e.g. "vision.layer", "projector"), so the same
// op (a matmul of one shape) can be told apart by where it ran.
//
// Enabled by MLLAMA_Q_PROFILE=1 in the environment (read once) or
// set_enabled(true) (Python: _core.profile_enable); read with snapshot()
// (_core.profile_report) and cleared with reset(). Ops are recorded from the
// thread that calls the backend (model code is single-threaded); record() takes
// a mutex, so a pool worker may record too. The inline functions are `static`:
// the SIMD kernel files include this header with their own -m flags, and an
// inline function with external linkage could let the linker pick their copy
// for the portable code.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace mq::prof {

namespace detail {
extern std::atomic<int> g_state;  // -1: not read from the environment yet, 0 off, 1 on
int init_from_env();
}  // namespace detail

static inline bool enabled() {
    const int s = detail::g_state.load(std::memory_order_relaxed);
    return s > 0 || (s < 0 && detail::init_from_env() > 0);
}
void set_enabled(bool on);

// Monotonic wall-clock nanoseconds (never 0): cheap (vDSO), for splitting an op
// into phases (shares only, see record_seconds).
static inline uint64_t now_ns() {
    return uint64_t(
               std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
                   .count()) |
           1u;
}
// The clock of op times: wall clock (default), or the calling thread's CPU time
// (a system call per read), which other processes on a busy machine do not
// inflate; the latter is the op's whole cost only with a one-thread pool.
enum class Clock { Wall, ThreadCpu };
void set_clock(Clock c);
uint64_t op_now_ns();  // nanoseconds on the op clock (never 0)
// Start of a timed op: op_now_ns() when profiling is on, else 0.
static inline uint64_t start() { return enabled() ? op_now_ns() : 0; }

// Adds one call of `op` (in the current region) that started at t0 (from start()).
void record(const char* op, const std::string& detail, uint64_t t0, double flop = 0, double bytes = 0);
// Adds `seconds` to an entry without a call count of its own (phases of an op, e.g.
// the score / softmax / P·V shares of one attention call).
void record_seconds(const char* op, const std::string& detail, double seconds, double flop = 0, double bytes = 0);

struct Entry {
    std::string region, op, detail;
    int64_t calls = 0;
    double seconds = 0, flop = 0, bytes = 0;
};
std::vector<Entry> snapshot();  // in first-recorded order
void reset();

// Region label for the ops recorded while it lives (innermost wins). `name`
// must outlive the scope (a string literal).
class Region {
public:
    explicit Region(const char* name);
    ~Region();
    Region(const Region&) = delete;
    Region& operator=(const Region&) = delete;

private:
    const char* prev_;
};

}  // namespace mq::prof
