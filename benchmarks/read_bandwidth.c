/* Streaming-read bandwidth of this machine: the floor under any batch-1 FC kernel, which must read its weights
 * once per call. Built and run by benchmarks/bandwidth.py (see there); prints one line per (bytes, threads):
 *   bytes threads best_GBps median_GBps
 *   usage: read_bandwidth THREADS HUGE BYTES...   (HUGE 1: the buffer on 2 MiB transparent huge pages, as
 *   LowBitMatMul's codes, lowbit.h AllocateCodes; 0: 4 KiB pages)
 * Each run reads `bytes` (split in equal contiguous parts over the threads) with 256-bit loads summed into
 * four independent accumulators (no compute bound: 1 load + 1 add per 32 bytes), after a 64 MiB buffer was
 * written to evict the previous run's data, as the kernel benchmarks do (onnxopt.timing.flush_cache). The
 * threads are started once and released per run by a barrier, so thread creation is not timed.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

enum { kMaxThreads = 16, kRuns = 25 };

static uint8_t* data;
static size_t part_bytes;
static int nthreads;
static pthread_barrier_t start_bar, done_bar;
static volatile long long sink[kMaxThreads * 8];
static volatile int stop;

static long long ReadPart(const uint8_t* p, size_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= bytes; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i*)(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i*)(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  long long out[4];
  _mm256_storeu_si256((__m256i*)out, s);
  return out[0] + out[1] + out[2] + out[3];
}

static void* Worker(void* arg) {
  const int t = (int)(intptr_t)arg;
  for (;;) {
    pthread_barrier_wait(&start_bar);
    if (stop) return NULL;
    sink[t * 8] += ReadPart(data + (size_t)t * part_bytes, part_bytes);
    pthread_barrier_wait(&done_bar);
  }
}

static double Now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int Compare(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s THREADS HUGE BYTES...\n", argv[0]);
    return 2;
  }
  nthreads = atoi(argv[1]);
  const int huge = atoi(argv[2]);
  if (nthreads < 1 || nthreads > kMaxThreads) return 2;
  const size_t flush_bytes = (size_t)64 << 20;
  uint8_t* flush = aligned_alloc(64, flush_bytes);
  memset(flush, 1, flush_bytes);
  for (int a = 3; a < argc; ++a) {
    const size_t want = strtoull(argv[a], NULL, 10);
    part_bytes = (want / nthreads + 127) / 128 * 128;
    const size_t page = (size_t)2 << 20, total = (part_bytes * nthreads + page - 1) / page * page;
    data = aligned_alloc(page, total);
    if (huge) madvise(data, total, MADV_HUGEPAGE);  /* before the first touch (memset) */
    memset(data, 1, part_bytes * nthreads);
    pthread_barrier_init(&start_bar, NULL, nthreads);
    pthread_barrier_init(&done_bar, NULL, nthreads);
    stop = 0;
    pthread_t th[kMaxThreads];
    for (int t = 1; t < nthreads; ++t) pthread_create(&th[t], NULL, Worker, (void*)(intptr_t)t);
    double gbps[kRuns];
    for (int r = 0; r < kRuns; ++r) {
      for (size_t i = 0; i < flush_bytes; i += 64) flush[i] += 1;
      const double t0 = Now();
      pthread_barrier_wait(&start_bar);
      sink[0] += ReadPart(data, part_bytes);
      pthread_barrier_wait(&done_bar);
      gbps[r] = (double)(part_bytes * nthreads) / (Now() - t0) * 1e-9;
    }
    stop = 1;
    pthread_barrier_wait(&start_bar);
    for (int t = 1; t < nthreads; ++t) pthread_join(th[t], NULL);
    pthread_barrier_destroy(&start_bar);
    pthread_barrier_destroy(&done_bar);
    qsort(gbps, kRuns, sizeof(double), Compare);
    printf("%zu %d %.2f %.2f\n", part_bytes * nthreads, nthreads, gbps[kRuns - 1], gbps[kRuns / 2]);
    fflush(stdout);
    free(data);
  }
  free(flush);
  return 0;
}
