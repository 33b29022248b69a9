// A small persistent thread pool for data-parallel loops.
//
// parallel_for(n, fn) runs fn(task, thread) for every task in [0, n); the
// calling thread takes part, so a pool of size 1 has no worker threads at all.
// Tasks are handed out through one atomic counter (dynamic scheduling), so
// uneven tasks balance themselves. Workers spin briefly before sleeping: a
// decode step issues hundreds of short loops and a futex wake per loop costs
// more than the loop. The first exception thrown by fn is re-thrown on the
// calling thread after all workers have left the loop.
//
// Resizing (resize(), set_global_threads()) is safe while other threads run
// loops on the pool: the pool object stays the same (so references held by
// backends remain valid), the resize waits for the loop in progress, if any,
// and every later loop runs on the new number of threads. A model forward pass
// in progress therefore finishes its remaining kernels with the new count.
// Never call it from inside a parallel_for task (it would wait for itself).
//
// fork(): a child process (multiprocessing's default start method on Linux, a
// pre-forking server, the fuzz runner) inherits the pool's state but none of its
// threads; a loop there would wait forever for workers that do not exist. The
// global pool registers a pthread_atfork child handler that makes the child's
// pool single-threaded (forget_workers_after_fork).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mq {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const { return n_threads_.load(std::memory_order_acquire); }
    void parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int thread)>& fn);
    // Change the number of threads (>= 1); waits for the loop in progress.
    void resize(int n_threads);

    // Process-wide pool. Sized from MLLAMA_Q_NUM_THREADS if set, else the
    // number of CPUs this process may run on.
    static ThreadPool& global();
    static void set_global_threads(int n);  // resizes the global pool in place (n <= 0: default)
    static int default_threads();

    // Called in the child of fork() (pthread_atfork, registered with the global pool):
    // the child has only the forking thread, so the workers are gone. Forget them and
    // run loops on the calling thread until set_global_threads() sizes the pool again.
    void forget_workers_after_fork();

private:
    void worker(int index, uint64_t seen);
    void run_tasks(int thread);
    void start_workers();  // spawns n_threads_ - 1 workers; run_mu_ held (or constructing)
    void stop_workers();   // stops and joins them; run_mu_ held (or destroying)

    std::atomic<int> n_threads_;
    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> active_{0};  // workers that joined the current loop and finished it
    // Current loop's admission word: bits 63..32 loop id (low bits of the
    // generation), bit 31 open, bits 30..0 number of workers that joined.
    // A worker joins only while the loop is open; the caller closes it when
    // it runs out of tasks and then waits only for the workers that joined,
    // so a worker that is descheduled or asleep never delays a loop it had
    // no part in (on a busy machine that wait cost ~0.5 ms per call).
    std::atomic<uint64_t> admit_{0};
    std::atomic<int64_t> next_task_{0};
    int64_t n_tasks_ = 0;
    const std::function<void(int64_t, int)>* fn_ = nullptr;
    std::exception_ptr error_;
    std::mutex error_mu_;
    std::atomic<bool> stop_{false};
    std::mutex run_mu_;  // one parallel_for (or resize) at a time per pool
};

}  // namespace mq
