// Memory read bandwidth: sum a 1 GiB float array with OpenMP, best of several passes.
// Each thread keeps 32 independent partial sums (four AVX registers once vectorised), so the loop is
// bound by memory rather than by the latency of one add chain (a plain `s += a[i]` reads ~5 GB/s here).
// The buffer is advised into transparent huge pages, as rwkvc's runtime advises its weights: with 4 KiB
// pages the page walks cost ~5-15 % of the bandwidth here.
// Build: cc -O3 -march=native -fopenmp bandwidth.c -o bandwidth ; run: OMP_NUM_THREADS=2 ./bandwidth
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define LANES 32

int main(int argc, char **argv) {
    size_t n = (argc > 1 ? strtoull(argv[1], 0, 10) : 1024) * (1ull << 20) / sizeof(float);
    n -= n % LANES;
    float *a = aligned_alloc(2 << 20, n * sizeof(float));
    madvise(a, n * sizeof(float), MADV_HUGEPAGE);  // fails harmlessly where there is no THP
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    double best = 1e30, total = 0;
    for (int rep = 0; rep < 8; rep++) {
        double t0 = omp_get_wtime(), s = 0;
        #pragma omp parallel reduction(+ : s)
        {
            float acc[LANES] = {0};
            #pragma omp for
            for (size_t b = 0; b < n; b += LANES)
                for (int j = 0; j < LANES; j++) acc[j] += a[b + j];
            for (int j = 0; j < LANES; j++) s += acc[j];
        }
        double dt = omp_get_wtime() - t0;
        total += s;
        if (dt < best) best = dt;
    }
    printf("%.2f\n", n * sizeof(float) / best / 1e9);  // GB/s
    if (total == 42) puts("");  // keep the sums alive
    free(a);
    return 0;
}
