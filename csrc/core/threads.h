// The number of threads every kernel uses; set from Python with moe_ext.set_num_threads().
#pragma once

namespace moe_ext {

// Defaults to OpenMP's own default (OMP_NUM_THREADS, else the number of cores); 1 without OpenMP.
int num_threads();
// Throws std::invalid_argument unless n >= 1.
void set_num_threads(int n);
bool openmp_enabled();

}  // namespace moe_ext
