#include "common/threadpool.h"

#include "common/env.h"

#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace mq {

static constexpr uint64_t kOpen = 1ull << 31;  // admit_: loop open for joining
static constexpr int kMaxThreads = 1024;       // more is a typo, not a machine

ThreadPool::ThreadPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) { start_workers(); }

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::start_workers() {
    stop_.store(false, std::memory_order_release);
    // New workers start from the current generation: they must not mistake the
    // last (finished) loop for a new one.
    const uint64_t g = generation_.load(std::memory_order_acquire);
    const int n = n_threads_.load(std::memory_order_relaxed);
    for (int i = 1; i < n; i++) workers_.emplace_back(&ThreadPool::worker, this, i, g);
}

void ThreadPool::stop_workers() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_.store(true, std::memory_order_release);
        generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
}

void ThreadPool::resize(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    // Holding run_mu_ means no loop is running (parallel_for holds it for the
    // whole loop), so no worker is inside a task while they are replaced.
    std::lock_guard<std::mutex> run_lock(run_mu_);
    if (n_threads == n_threads_.load(std::memory_order_relaxed)) return;
    stop_workers();
    n_threads_.store(n_threads, std::memory_order_release);
    start_workers();
}

void ThreadPool::run_tasks(int thread) {
    for (;;) {
        const int64_t t = next_task_.fetch_add(1, std::memory_order_relaxed);
        if (t >= n_tasks_) break;
        try {
            (*fn_)(t, thread);
        } catch (...) {
            std::lock_guard<std::mutex> lk(error_mu_);
            if (!error_) error_ = std::current_exception();
            next_task_.store(n_tasks_, std::memory_order_relaxed);  // stop handing out work
        }
    }
}

void ThreadPool::worker(int index, uint64_t seen) {
    for (;;) {
        // Spin a little for the next loop, then sleep on the condition variable.
        uint64_t g = generation_.load(std::memory_order_acquire);
        for (int spin = 0; g == seen && spin < 20000; spin++) {
#if defined(__x86_64__) || defined(_M_X64)
            __builtin_ia32_pause();
#endif
            g = generation_.load(std::memory_order_acquire);
        }
        if (g == seen) {
            std::unique_lock<std::mutex> lk(mu_);
            cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            g = generation_.load(std::memory_order_acquire);
        }
        seen = g;
        if (stop_.load(std::memory_order_acquire)) return;
        // Join the loop of generation g if it is still open.
        const uint64_t id = (g & 0xffffffffull) << 32;
        uint64_t a = admit_.load(std::memory_order_acquire);
        bool joined = false;
        while ((a & 0xffffffff00000000ull) == id && (a & kOpen)) {
            if (admit_.compare_exchange_weak(a, a + 1, std::memory_order_acq_rel)) {
                joined = true;
                break;
            }
        }
        if (!joined) continue;
        run_tasks(index);
        active_.fetch_add(1, std::memory_order_acq_rel);
    }
}

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
    if (n_tasks <= 0) return;
    if (n_threads_.load(std::memory_order_acquire) == 1 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++) fn(t, 0);
        return;
    }
    std::lock_guard<std::mutex> run_lock(run_mu_);
    if (workers_.empty()) {  // resized to one thread meanwhile
        for (int64_t t = 0; t < n_tasks; t++) fn(t, 0);
        return;
    }
    fn_ = &fn;
    n_tasks_ = n_tasks;
    error_ = nullptr;
    next_task_.store(0, std::memory_order_relaxed);
    active_.store(0, std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> lk(mu_);
        const uint64_t next = generation_.load(std::memory_order_relaxed) + 1;
        admit_.store(((next & 0xffffffffull) << 32) | kOpen, std::memory_order_release);
        generation_.store(next, std::memory_order_release);
    }
    cv_.notify_all();
    run_tasks(0);
    // Close the loop, then wait for the workers that joined it (they may still
    // be finishing a task); late workers see it closed and skip it.
    uint64_t a = admit_.load(std::memory_order_acquire);
    while (!admit_.compare_exchange_weak(a, a & ~kOpen, std::memory_order_acq_rel)) {}
    const int joined = static_cast<int>(a & 0x7fffffffull);
    while (active_.load(std::memory_order_acquire) != joined) {
#if defined(__x86_64__) || defined(_M_X64)
        __builtin_ia32_pause();
#endif
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
}

int ThreadPool::default_threads() {
    if (const int n = env::num_threads(); n > 0) return n < kMaxThreads ? n : kMaxThreads;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? static_cast<int>(n) : 1;
}

void ThreadPool::forget_workers_after_fork() {
    // The std::thread objects name the parent's threads: destroying a joinable one
    // calls std::terminate and joining one waits forever, so they move to a vector
    // that is never destroyed (a few bytes per worker, leaked in the child only).
    new std::vector<std::thread>(std::move(workers_));
    workers_.clear();
    // Another parent thread may have held these at the fork (glibc's mutex and
    // condition variable need no destruction, so constructing over them is safe).
    new (&mu_) std::mutex;
    new (&run_mu_) std::mutex;
    new (&error_mu_) std::mutex;
    new (&cv_) std::condition_variable;
    n_threads_ = 1;
}

static std::unique_ptr<ThreadPool>& global_slot() {
    static std::unique_ptr<ThreadPool> pool;
    return pool;
}
static std::mutex g_pool_mu;

static void global_pool_after_fork_in_child() {
    new (&g_pool_mu) std::mutex;  // see forget_workers_after_fork
    if (auto& p = global_slot()) p->forget_workers_after_fork();
}

ThreadPool& ThreadPool::global() {
#if defined(__unix__) || defined(__APPLE__)
    static const int registered = pthread_atfork(nullptr, nullptr, global_pool_after_fork_in_child);
    (void)registered;
#endif
    std::lock_guard<std::mutex> lk(g_pool_mu);
    auto& p = global_slot();
    if (!p) p = std::make_unique<ThreadPool>(default_threads());
    return *p;
}

void ThreadPool::set_global_threads(int n) {
    if (n > kMaxThreads)
        throw std::invalid_argument("n_threads must be <= " + std::to_string(kMaxThreads) + ", got " +
                                    std::to_string(n));
    // In place, never a new pool: backends keep a reference to global() and
    // other threads may be inside one of its loops right now (see resize).
    global().resize(n > 0 ? n : default_threads());
}

}  // namespace mq
