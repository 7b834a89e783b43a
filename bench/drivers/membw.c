/* Memory read bandwidth with N threads: each thread sums its slice of a large
 * array (far bigger than the caches), best of several passes. Prints JSON.
 * Built at bench time: cc -O3 -march=native -pthread membw.c -o membw */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct { const uint64_t *p; size_t n; uint64_t sum; } job_t;

static void *reader(void *arg) {
    job_t *j = (job_t *)arg;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= j->n; i += 4) { s0 += j->p[i]; s1 += j->p[i + 1]; s2 += j->p[i + 2]; s3 += j->p[i + 3]; }
    for (; i < j->n; i++) s0 += j->p[i];
    j->sum = s0 + s1 + s2 + s3;
    return NULL;
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 512;
    int passes = argc > 3 ? atoi(argv[3]) : 7;
    size_t n = mib * 1024 * 1024 / sizeof(uint64_t);
    uint64_t *a = malloc(n * sizeof(uint64_t));
    if (!a || threads < 1 || threads > 256) return 1;
    for (size_t i = 0; i < n; i++) a[i] = i;  /* touch every page */
    pthread_t th[256]; job_t jobs[256];
    double best = 1e30, total = 0; uint64_t check = 0;
    for (int p = 0; p < passes; p++) {
        double t0 = now();
        for (int t = 0; t < threads; t++) {
            size_t lo = n * t / threads, hi = n * (t + 1) / threads;
            jobs[t].p = a + lo; jobs[t].n = hi - lo; jobs[t].sum = 0;
            pthread_create(&th[t], NULL, reader, &jobs[t]);
        }
        for (int t = 0; t < threads; t++) { pthread_join(th[t], NULL); check += jobs[t].sum; }
        double dt = now() - t0;
        total += dt;
        if (dt < best) best = dt;
    }
    double bytes = (double)n * sizeof(uint64_t);
    printf("{\"threads\": %d, \"bytes\": %.0f, \"passes\": %d, \"best_gbps\": %.3f, \"mean_gbps\": %.3f, \"check\": %llu}\n",
           threads, bytes, passes, bytes / best / 1e9, bytes * passes / total / 1e9, (unsigned long long)(check & 0xffff));
    free(a);
    return 0;
}
