// The CPU kernels built for the AVX2 capability (see group_norm_act_cpu_kernel.h).
#if defined(__x86_64__) || defined(_M_X64)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "../group_norm_act_cpu_kernel.h"
#endif
