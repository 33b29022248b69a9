// The avxvnni path: kernels_avx2.cpp compiled a second time, with AVX-VNNI
// (-mavxvnni, CMakeLists.txt) and MQ_AVXVNNI defined, so the tiles and panel
// GEMMs exist once. Only the int8 multiply-adds differ (simd_avx2.h:
// dot_u8s8_add / madd16_add become vpdpbusd / vpdpwssd on ymm, and the K-quant
// panel sums whole sub-blocks in int32): CPUs with AVX-VNNI but no AVX-512
// (Alder Lake, Raptor Lake, Arrow Lake, ...) run it; AVX-512 CPUs take avx512.
// The activation quantizers and the bandwidth probe are the AVX2 file's (they
// have no int8 multiply-adds), so this build leaves them out.
#define MQ_AVXVNNI 1
#include "cpu/kernels_avx2.cpp"  // NOLINT(bugprone-suspicious-include): the second build, on purpose
