// Opt-in per-op profiler (profile.h).
#include "common/profile.h"

#include "common/env.h"

#include <ctime>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

namespace mq::prof {

namespace detail {
std::atomic<int> g_state{-1};

int init_from_env() {
    const int on = env::profile() ? 1 : 0;
    int expected = -1;
    g_state.compare_exchange_strong(expected, on, std::memory_order_relaxed);
    return g_state.load(std::memory_order_relaxed);
}
}  // namespace detail

namespace {

struct Store {
    std::mutex mu;
    std::map<std::tuple<std::string, std::string, std::string>, size_t> index;
    std::vector<Entry> entries;
};
Store& store() {
    static Store s;
    return s;
}
// Current region of the calling thread (pool workers record with no region
// of their own: they inherit none, so callers pass phases from the model thread).
thread_local const char* t_region = "";

void add(const char* op, const std::string& detail, double seconds, double flop, double bytes, int64_t calls) {
    Store& s = store();
    std::lock_guard<std::mutex> lk(s.mu);
    auto key = std::make_tuple(std::string(t_region), std::string(op), detail);
    auto it = s.index.find(key);
    if (it == s.index.end()) {
        it = s.index.emplace(key, s.entries.size()).first;
        s.entries.push_back(Entry{t_region, op, detail});
    }
    Entry& e = s.entries[it->second];
    e.calls += calls;
    e.seconds += seconds;
    e.flop += flop;
    e.bytes += bytes;
}

}  // namespace

void set_enabled(bool on) { detail::g_state.store(on ? 1 : 0, std::memory_order_relaxed); }

static std::atomic<int> g_clock{int(Clock::Wall)};
void set_clock(Clock c) { g_clock.store(int(c), std::memory_order_relaxed); }

uint64_t op_now_ns() {
    if (g_clock.load(std::memory_order_relaxed) == int(Clock::ThreadCpu)) {
        timespec ts;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return (uint64_t(ts.tv_sec) * 1000000000u + uint64_t(ts.tv_nsec)) | 1u;
    }
    return now_ns();
}

void record(const char* op, const std::string& detail, uint64_t t0, double flop, double bytes) {
    add(op, detail, double(op_now_ns() - t0) * 1e-9, flop, bytes, 1);
}

void record_seconds(const char* op, const std::string& detail, double seconds, double flop, double bytes) {
    add(op, detail, seconds, flop, bytes, 0);
}

std::vector<Entry> snapshot() {
    Store& s = store();
    std::lock_guard<std::mutex> lk(s.mu);
    return s.entries;
}

void reset() {
    Store& s = store();
    std::lock_guard<std::mutex> lk(s.mu);
    s.index.clear();
    s.entries.clear();
}

Region::Region(const char* name) : prev_(t_region) { t_region = name; }
Region::~Region() { t_region = prev_; }

}  // namespace mq::prof
