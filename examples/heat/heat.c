/*
 * heat: 2-D heat diffusion (Jacobi iteration) whose grids live in memory protected
 * by fgbi. Every iteration each thread passes its safepoint; the restart record is
 * the number of iterations completed. At the end the result computed from the live
 * grid must equal the one computed from the replica's grid.
 *
 * usage: heat [N [ITERATIONS [THREADS [EPOCH_MS]]]]   (defaults 512 1000 2 10)
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fgbi.h"

#define MAX_THREADS 64

/* Exits with a message if an fgbi call failed. fgbi_last_error is per thread, so it
 * is read on the thread that made the call. */
#define MUST(call) must((call), #call)

static void must(int status, const char *call) {
    if (status != FGBI_OK) {
        fprintf(stderr, "heat: %s returned %d: %s\n", call, status, fgbi_last_error());
        exit(1);
    }
}

struct heat {
    fgbi_process *process;
    double *grid[2];
    size_t n;
    unsigned long iterations;
    unsigned long threads;
    pthread_barrier_t barrier;
};

struct worker {
    struct heat *heat;
    unsigned long id;
    pthread_t thread;
};

/* A barrier is a blocking wait: the thread counts as stopped while it waits. */
static void wait_all(struct heat *heat, const fgbi_safepoint *safepoint) {
    MUST(fgbi_safepoint_enter_outside(safepoint));
    pthread_barrier_wait(&heat->barrier);
    MUST(fgbi_safepoint_leave_outside(safepoint));
}

/*
 * Iteration k reads grid[k % 2] and writes grid[(k + 1) % 2]; thread `id` owns a
 * band of interior rows. After the first barrier grid[(k + 1) % 2] is complete and
 * thread 0 records k + 1; the second barrier keeps every thread from overwriting
 * grid[k % 2] (iteration k + 1) before the record says the result is in
 * grid[(k + 1) % 2]. So whenever all threads are parked, the restart record names a
 * complete grid that no thread is writing.
 */
static void solve(struct worker *w, const fgbi_safepoint *safepoint) {
    struct heat *heat = w->heat;
    size_t n = heat->n, rows = n - 2;
    size_t lo = 1 + rows * w->id / heat->threads;
    size_t hi = 1 + rows * (w->id + 1) / heat->threads;
    for (unsigned long k = 0; k < heat->iterations; k++) {
        const double *old = heat->grid[k % 2];
        double *next = heat->grid[(k + 1) % 2];
        for (size_t i = lo; i < hi; i++) {
            for (size_t j = 1; j < n - 1; j++) {
                next[i * n + j] = 0.25 * (old[(i - 1) * n + j] + old[(i + 1) * n + j] +
                                          old[i * n + j - 1] + old[i * n + j + 1]);
            }
        }
        wait_all(heat, safepoint);
        if (w->id == 0) {
            uint64_t done = k + 1;
            MUST(fgbi_set_state(heat->process, &done, sizeof done));
        }
        MUST(fgbi_safepoint_pass(safepoint));
        wait_all(heat, safepoint);
    }
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    char name[32];
    fgbi_safepoint *safepoint;
    snprintf(name, sizeof name, "heat-%lu", w->id);
    MUST(fgbi_safepoint_register(w->heat->process, name, &safepoint));
    solve(w, safepoint);
    MUST(fgbi_safepoint_free(safepoint));
    return NULL;
}

/* FNV-1a over the grid's bytes: equal grids, equal checksums. */
static uint64_t checksum(const void *grid, size_t bytes) {
    const unsigned char *p = grid;
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < bytes; i++) {
        h = (h ^ p[i]) * 1099511628211ULL;
    }
    return h;
}

static unsigned long arg(int argc, char **argv, int i, const char *what,
                         unsigned long fallback, unsigned long min, unsigned long max) {
    if (argc <= i) {
        return fallback;
    }
    char *end;
    errno = 0;
    unsigned long value = strtoul(argv[i], &end, 10);
    if (errno != 0 || end == argv[i] || *end != '\0' || value < min || value > max) {
        fprintf(stderr,
                "usage: heat [N [ITERATIONS [THREADS [EPOCH_MS]]]]\n"
                "heat: %s must be an integer from %lu to %lu, not '%s'\n",
                what, min, max, argv[i]);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv) {
    struct heat heat;
    heat.n = arg(argc, argv, 1, "N", 512, 3, 16384);
    heat.iterations = arg(argc, argv, 2, "ITERATIONS", 1000, 1, 1000000000);
    heat.threads = arg(argc, argv, 3, "THREADS", 2, 1, MAX_THREADS);
    unsigned long epoch_ms = arg(argc, argv, 4, "EPOCH_MS", 10, 1, 60000);
    if (heat.threads > heat.n - 2) {
        fprintf(stderr, "heat: %lu threads for %zu interior rows: use at most one per row\n",
                heat.threads, heat.n - 2);
        return 2;
    }

    struct fgbi_options options;
    MUST(fgbi_options_default(&options));
    options.epoch_ms = epoch_ms;
    size_t bytes = heat.n * heat.n * sizeof(double);
    size_t sizes[2] = {bytes, bytes};
    MUST(fgbi_protect(sizes, 2, &options, &heat.process));
    for (size_t g = 0; g < 2; g++) {
        void *base;
        size_t len;
        MUST(fgbi_region(heat.process, g, &base, &len));
        heat.grid[g] = base;
    }

    /* The main thread is worker 0: it registers before it writes the boundary. */
    struct worker workers[MAX_THREADS];
    fgbi_safepoint *safepoint;
    MUST(fgbi_safepoint_register(heat.process, "heat-0", &safepoint));
    for (size_t g = 0; g < 2; g++) {
        for (size_t j = 0; j < heat.n; j++) {
            heat.grid[g][j] = 100.0; /* the hot top edge; the others stay at 0 */
        }
    }
    MUST(fgbi_safepoint_pass(safepoint));
    if (pthread_barrier_init(&heat.barrier, NULL, (unsigned)heat.threads) != 0) {
        fprintf(stderr, "heat: pthread_barrier_init failed\n");
        return 1;
    }
    for (unsigned long t = 0; t < heat.threads; t++) {
        workers[t].heat = &heat;
        workers[t].id = t;
        if (t > 0 && pthread_create(&workers[t].thread, NULL, worker_main, &workers[t]) != 0) {
            fprintf(stderr, "heat: cannot start thread %lu\n", t);
            return 1;
        }
    }
    solve(&workers[0], safepoint);
    MUST(fgbi_safepoint_free(safepoint));
    for (unsigned long t = 1; t < heat.threads; t++) {
        pthread_join(workers[t].thread, NULL);
    }
    pthread_barrier_destroy(&heat.barrier);

    struct fgbi_summary summary;
    fgbi_replica *replica;
    MUST(fgbi_finish(heat.process, &summary, &replica));

    /* What a restart would do: read the record, then the grid it names. */
    const void *record;
    size_t record_len;
    MUST(fgbi_replica_state(replica, &record, &record_len));
    uint64_t restart = 0;
    if (record_len == sizeof restart) {
        memcpy(&restart, record, sizeof restart);
    }
    const void *replica_grid;
    size_t replica_len;
    MUST(fgbi_replica_region(replica, restart % 2, &replica_grid, &replica_len));

    const double *result = heat.grid[heat.iterations % 2];
    double total = 0.0;
    for (size_t i = 0; i < heat.n * heat.n; i++) {
        total += result[i];
    }
    uint64_t live = checksum(result, bytes);
    uint64_t replicated = checksum(replica_grid, replica_len);
    printf("heat: %zux%zu grid, %lu iterations, %lu threads, epoch %lu ms\n", heat.n, heat.n,
           heat.iterations, heat.threads, epoch_ms);
    printf("mean temperature %.6f\n", total / (double)(heat.n * heat.n));
    printf("checksum live 0x%016llx\n", (unsigned long long)live);
    printf("checksum replica 0x%016llx\n", (unsigned long long)replicated);
    printf("restart record %llu\n", (unsigned long long)restart);
    printf("epochs %llu verified %llu mismatches %llu\n", (unsigned long long)summary.epochs,
           (unsigned long long)summary.verified, (unsigned long long)summary.mismatches);
    printf("pause_us p50 %.1f p99 %.1f max %.1f\n", summary.pause_us_p50, summary.pause_us_p99,
           summary.pause_us_max);

    int failed = summary.mismatches != 0 || live != replicated || restart != heat.iterations;
    if (failed) {
        fprintf(stderr, "heat: FAILED: the replica does not match the live run\n");
    }
    MUST(fgbi_replica_free(replica));
    MUST(fgbi_process_free(heat.process));
    return failed ? 1 : 0;
}
