// The CPU kernels built for the DEFAULT capability (see group_norm_act_cpu_kernel.h).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "../group_norm_act_cpu_kernel.h"
