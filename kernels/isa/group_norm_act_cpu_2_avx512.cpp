// The CPU kernels built for the AVX512 capability (see group_norm_act_cpu_kernel.h).
#if defined(__x86_64__) || defined(_M_X64)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "../group_norm_act_cpu_kernel.h"
#endif
