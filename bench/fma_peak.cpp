// FMA peak of one core, for the "% of FMA peak" figures in bench/results.
//
//   g++ -O2 bench/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
//
// Ten independent vfmadd231ps chains (ymm, then zmm) in inline assembly,
// timed in thread CPU time (CLOCK_THREAD_CPUTIME_ID), so other processes on a
// shared machine do not enter; prints GFLOP/s (2 FLOP per lane per FMA) three
// times each. The zmm run needs AVX-512F (it faults without it).
//
// Also the AVX2 int8 multiply-add sequences of the kernels (issue 13: "an int8 dot product
// has about twice the multiply-add rate of float32 FMA" on AVX2), as GOP/s (2 per
// multiply-add, 32 per sequence), 6 independent chains each:
//   q8_0 seq   vpsignb + vpmaddubsw + vpmaddwd (ones) + vpaddd: signed x signed bytes, ggml's
//              sign trick, what the Q8_0 kernels need (kernels_avx2.cpp PanelMicroQ80)
//   u8 seq     vpmaddubsw + vpaddw: unsigned codes x signed bytes summed in int16, what the
//              Q4_K panel's inner loop needs (4-bit codes leave room in int16)
// And zmm vpdpbusd (AVX-512 VNNI; 6 independent chains, 64 multiply-adds each): the rate the
// AVX-512 tiles and panels are judged against (it faults without AVX512_VNNI).
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <ctime>
static double cpu_now(){timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t); return t.tv_sec+1e-9*t.tv_nsec;}
__attribute__((target("avx2,fma"),noinline)) double r256(long iters){
  double t0=cpu_now();
  __asm__ volatile(
   "vxorps %%ymm0,%%ymm0,%%ymm0\n vxorps %%ymm1,%%ymm1,%%ymm1\n vxorps %%ymm2,%%ymm2,%%ymm2\n vxorps %%ymm3,%%ymm3,%%ymm3\n"
   "vxorps %%ymm4,%%ymm4,%%ymm4\n vxorps %%ymm5,%%ymm5,%%ymm5\n vxorps %%ymm6,%%ymm6,%%ymm6\n vxorps %%ymm7,%%ymm7,%%ymm7\n"
   "vxorps %%ymm8,%%ymm8,%%ymm8\n vxorps %%ymm9,%%ymm9,%%ymm9\n"
   "1:\n"
   "vfmadd231ps %%ymm14,%%ymm15,%%ymm0\n vfmadd231ps %%ymm14,%%ymm15,%%ymm1\n vfmadd231ps %%ymm14,%%ymm15,%%ymm2\n vfmadd231ps %%ymm14,%%ymm15,%%ymm3\n"
   "vfmadd231ps %%ymm14,%%ymm15,%%ymm4\n vfmadd231ps %%ymm14,%%ymm15,%%ymm5\n vfmadd231ps %%ymm14,%%ymm15,%%ymm6\n vfmadd231ps %%ymm14,%%ymm15,%%ymm7\n"
   "vfmadd231ps %%ymm14,%%ymm15,%%ymm8\n vfmadd231ps %%ymm14,%%ymm15,%%ymm9\n"
   "dec %0\n jnz 1b\n" : "+r"(iters) :: "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","cc");
  double t1=cpu_now();
  return t1-t0;
}
__attribute__((target("avx512f"),noinline)) double r512(long iters){
  double t0=cpu_now();
  __asm__ volatile(
   "vxorps %%zmm0,%%zmm0,%%zmm0\n vxorps %%zmm1,%%zmm1,%%zmm1\n vxorps %%zmm2,%%zmm2,%%zmm2\n vxorps %%zmm3,%%zmm3,%%zmm3\n"
   "vxorps %%zmm4,%%zmm4,%%zmm4\n vxorps %%zmm5,%%zmm5,%%zmm5\n vxorps %%zmm6,%%zmm6,%%zmm6\n vxorps %%zmm7,%%zmm7,%%zmm7\n"
   "vxorps %%zmm8,%%zmm8,%%zmm8\n vxorps %%zmm9,%%zmm9,%%zmm9\n"
   "1:\n"
   "vfmadd231ps %%zmm14,%%zmm15,%%zmm0\n vfmadd231ps %%zmm14,%%zmm15,%%zmm1\n vfmadd231ps %%zmm14,%%zmm15,%%zmm2\n vfmadd231ps %%zmm14,%%zmm15,%%zmm3\n"
   "vfmadd231ps %%zmm14,%%zmm15,%%zmm4\n vfmadd231ps %%zmm14,%%zmm15,%%zmm5\n vfmadd231ps %%zmm14,%%zmm15,%%zmm6\n vfmadd231ps %%zmm14,%%zmm15,%%zmm7\n"
   "vfmadd231ps %%zmm14,%%zmm15,%%zmm8\n vfmadd231ps %%zmm14,%%zmm15,%%zmm9\n"
   "dec %0\n jnz 1b\n" : "+r"(iters) :: "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","cc");
  double t1=cpu_now();
  return t1-t0;
}
// n_ops instructions per sequence; 6 sequences per loop iteration.
#define I8_LOOP(BODY) \
  double t0=cpu_now(); \
  __asm__ volatile( \
   "vpxor %%ymm0,%%ymm0,%%ymm0\n vpxor %%ymm1,%%ymm1,%%ymm1\n vpxor %%ymm2,%%ymm2,%%ymm2\n" \
   "vpxor %%ymm3,%%ymm3,%%ymm3\n vpxor %%ymm4,%%ymm4,%%ymm4\n vpxor %%ymm5,%%ymm5,%%ymm5\n" \
   "vpcmpeqw %%ymm13,%%ymm13,%%ymm13\n vpabsw %%ymm13,%%ymm13\n" /* int16 ones */ \
   "1:\n" BODY "dec %0\n jnz 1b\n" : "+r"(iters) :: \
   "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm13","cc"); \
  return cpu_now()-t0;
#define Q8SEQ(A,T) "vpsignb %%ymm14,%%ymm15,%%ymm" #T "\n vpmaddubsw %%ymm" #T ",%%ymm14,%%ymm" #T "\n" \
  "vpmaddwd %%ymm13,%%ymm" #T ",%%ymm" #T "\n vpaddd %%ymm" #T ",%%ymm" #A ",%%ymm" #A "\n"
#define U8SEQ(A,T) "vpmaddubsw %%ymm15,%%ymm14,%%ymm" #T "\n vpaddw %%ymm" #T ",%%ymm" #A ",%%ymm" #A "\n"
__attribute__((target("avx2"),noinline)) double q8seq(long iters){
  I8_LOOP(Q8SEQ(0,6) Q8SEQ(1,7) Q8SEQ(2,8) Q8SEQ(3,9) Q8SEQ(4,10) Q8SEQ(5,11))
}
__attribute__((target("avx2"),noinline)) double u8seq(long iters){
  I8_LOOP(U8SEQ(0,6) U8SEQ(1,7) U8SEQ(2,8) U8SEQ(3,9) U8SEQ(4,10) U8SEQ(5,11))
}
#define DPSEQ(A) "vpdpbusd %%zmm14,%%zmm15,%%zmm" #A "\n"
__attribute__((target("avx512f,avx512vnni"),noinline)) double dpseq(long iters){
  double t0=cpu_now();
  __asm__ volatile(
   "vpxord %%zmm0,%%zmm0,%%zmm0\n vpxord %%zmm1,%%zmm1,%%zmm1\n vpxord %%zmm2,%%zmm2,%%zmm2\n"
   "vpxord %%zmm3,%%zmm3,%%zmm3\n vpxord %%zmm4,%%zmm4,%%zmm4\n vpxord %%zmm5,%%zmm5,%%zmm5\n"
   "1:\n" DPSEQ(0) DPSEQ(1) DPSEQ(2) DPSEQ(3) DPSEQ(4) DPSEQ(5) "dec %0\n jnz 1b\n" : "+r"(iters) ::
   "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","cc");
  return cpu_now()-t0;
}
int main(){ long it=300000000;
 for(int rep=0;rep<3;rep++){
  double s=r256(it); printf("ymm FMA: %.1f GFLOP/s (%.2f G instr/s)\n", 10.0*it*16/s/1e9, 10.0*it/s/1e9);
  s=r512(it); printf("zmm FMA: %.1f GFLOP/s (%.2f G instr/s)\n", 10.0*it*32/s/1e9, 10.0*it/s/1e9);
  s=q8seq(it/2); printf("ymm int8, q8_0 seq (sign+maddubs+madd+add): %.1f GOP/s\n", 6.0*(it/2)*64/s/1e9);
  s=u8seq(it/2); printf("ymm int8, u8 seq (maddubs+addw): %.1f GOP/s\n", 6.0*(it/2)*64/s/1e9);
  if(__builtin_cpu_supports("avx512vnni")){
   s=dpseq(it/2); printf("zmm vpdpbusd: %.1f GOP/s (%.2f G instr/s)\n", 6.0*(it/2)*128/s/1e9, 6.0*(it/2)/s/1e9);}}
}
