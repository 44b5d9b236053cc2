// Memory read bandwidth: sum a 1 GiB float array with OpenMP, best of several passes.
// Build: cc -O3 -march=native -fopenmp bandwidth.c -o bandwidth ; run: OMP_NUM_THREADS=2 ./bandwidth
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    size_t n = (argc > 1 ? strtoull(argv[1], 0, 10) : 1024) * (1ull << 20) / sizeof(float);
    float *a = aligned_alloc(64, n * sizeof(float));
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 7);
    double best = 1e30, sum = 0;
    for (int rep = 0; rep < 8; rep++) {
        double t0 = omp_get_wtime(), s = 0;
        #pragma omp parallel for reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += a[i];
        double dt = omp_get_wtime() - t0;
        sum += s;
        if (dt < best) best = dt;
    }
    printf("%.2f\n", n * sizeof(float) / best / 1e9);  // GB/s
    if (sum == 42) puts("");  // keep the sum alive
    free(a);
    return 0;
}
