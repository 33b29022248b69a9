// Every environment variable the compiled core reads, each read in env.cpp and nowhere else.
// README.md ("Environment variables") lists them with their effect; keep the two in step.
//
// The accessors read the environment when called (no caching here): each caller decides
// when it looks (the kernel path and thread count at first use, the attention switches at
// every call so a benchmark can flip them between runs, the CUDA switches once).
#pragma once

namespace mq::env {

// MLLAMA_Q_CPU_PATH: forced CPU kernel path ("scalar", "avx2", "avxvnni", "avx512", "amx"; "" or "auto": the
// best supported). Also picks the Q4_K/Q6_K quantizer's instruction set. nullptr if unset.
const char* cpu_path();

// MLLAMA_Q_NUM_THREADS: size of the global CPU thread pool; 0 if unset or not a positive integer.
int num_threads();

// MLLAMA_Q_ATTN_DIRECT=0 turns off the CPU's direct attention for few queries (the fused
// flash kernel runs instead).
bool cpu_attn_direct();

// MLLAMA_Q_PROFILE=1 (any value but "" and "0"): the per-op profiler (common/profile.h)
// starts on; read at the first op.
bool profile();

// MLLAMA_Q_CUDA_GEMM=simple: CUDA GEMM without the software-pipelined dequantization.
bool cuda_gemm_simple();

// MLLAMA_Q_CUDA_ATTN=simt: never the tensor-core attention kernel (debugging).
bool cuda_attn_simt();

// MLLAMA_Q_CUDA_POISON=1: every CUDA allocation is filled with NaN bytes (tests: an output
// element a kernel forgot to write shows up).
bool cuda_poison();

}  // namespace mq::env
