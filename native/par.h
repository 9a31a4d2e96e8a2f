// par_tasks_n: a lambda over the kernels' threads (pool_run, pool.cc). Included inside each ISA's namespace
// by gemm_driver.h and ops_simd.h, so it has internal linkage there (see gemm_common.h).

namespace {

// f(t) once for every t in [0, tasks); task 0 on the calling thread.
template <class F>
void par_tasks_n(int tasks, F&& f) {
  if (tasks <= 1) {
    if (tasks == 1) f(0);
    return;
  }
  using Fn = std::remove_reference_t<F>;
  pool_run(tasks, [](void* c, int t) { (*(Fn*)c)(t); }, (void*)&f);
}

}  // namespace
