/*
 * heat: 2-D heat diffusion (Jacobi iteration) whose grids live in memory protected
 * by fgbi. Every iteration each thread passes its safepoint; the restart record is
 * the number of iterations completed. At the end the result computed from the live
 * grid must equal the one computed from the replica's grid (in-process replica).
 *
 * usage: heat [N [ITERATIONS [THREADS [EPOCH_MS]]]] [OPTIONS]   (defaults 512 1000 2 10)
 *   --mode fgbi|remus|llm|xbzrle   how checkpoints are encoded (default fgbi)
 *   --backup HOST:PORT --key FILE  replicate to `fgbi backup` instead of in-process
 *   --transport tcp|uring|std|rdma, --rdma-device DEV, --heartbeat-ms MS  (with --backup)
 *   --unprotected                  solve in ordinary memory, without fgbi (a baseline)
 *   --progress K                   print `heat: iteration I done` after every K-th iteration
 *
 * Started by `fgbi backup --restart`, it takes over the replica, resumes from the
 * iteration its restart record names and ends with the result an uninterrupted run
 * computes: the solver is deterministic. The last line is machine-readable:
 *   heat: result iterations=I seconds=S checksum=0x... epochs=E committed=C
 *         pause_us_p50=... pause_us_p99=... pause_us_max=... wire_bytes=W
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fgbi.h"

#define MAX_THREADS 64
#define POSITIONAL 4

static const char usage[] =
    "usage: heat [N [ITERATIONS [THREADS [EPOCH_MS]]]] [--mode fgbi|remus|llm|xbzrle]\n"
    "            [--backup HOST:PORT --key FILE [--transport tcp|uring|std|rdma]\n"
    "             [--rdma-device DEV] [--heartbeat-ms MS]] [--unprotected]\n"
    "            [--progress K]\n";

/* Exits with a message if an fgbi call failed. fgbi_last_error is per thread, so it
 * is read on the thread that made the call. */
#define MUST(call) must((call), #call)

static void must(int status, const char *call) {
    if (status != FGBI_OK) {
        fprintf(stderr, "heat: %s returned %d: %s\n", call, status, fgbi_last_error());
        exit(1);
    }
}

/* Exits 2 after the usage and what is wrong with the arguments. */
static void bad_usage(const char *what, const char *value) {
    fprintf(stderr, "%sheat: %s%s%s\n", usage, what, value ? ": " : "", value ? value : "");
    exit(2);
}

struct heat {
    /* NULL when --unprotected: the grids are ordinary memory. */
    fgbi_process *process;
    double *grid[2];
    size_t n;
    /* The first iteration to compute: 0, or where a restarted run resumes. */
    unsigned long start;
    /* Whether this run took over a replica (then its first iteration is announced). */
    int restarted;
    unsigned long iterations;
    /* Announce every `progress`-th iteration done (0: never). */
    unsigned long progress;
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
    if (heat->process) {
        MUST(fgbi_safepoint_enter_outside(safepoint));
    }
    pthread_barrier_wait(&heat->barrier);
    if (heat->process) {
        MUST(fgbi_safepoint_leave_outside(safepoint));
    }
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
    for (unsigned long k = heat->start; k < heat->iterations; k++) {
        const double *old = heat->grid[k % 2];
        double *next = heat->grid[(k + 1) % 2];
        for (size_t i = lo; i < hi; i++) {
            for (size_t j = 1; j < n - 1; j++) {
                next[i * n + j] = 0.25 * (old[(i - 1) * n + j] + old[(i + 1) * n + j] +
                                          old[i * n + j - 1] + old[i * n + j + 1]);
            }
        }
        wait_all(heat, safepoint);
        if (w->id == 0 && heat->restarted && k == heat->start) {
            /* The end of type I downtime, on the clock the backup stamps its own. */
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            printf("heat: first iteration after the restart done at_unix_ns=%lld\n",
                   (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
            fflush(stdout);
        }
        if (w->id == 0 && heat->progress && (k + 1) % heat->progress == 0) {
            printf("heat: iteration %lu done\n", k + 1);
            fflush(stdout);
        }
        if (heat->process) {
            if (w->id == 0) {
                uint64_t done = k + 1;
                MUST(fgbi_set_state(heat->process, &done, sizeof done));
            }
            MUST(fgbi_safepoint_pass(safepoint));
        }
        wait_all(heat, safepoint);
    }
}

static void *worker_main(void *arg) {
    struct worker *w = arg;
    char name[32];
    fgbi_safepoint *safepoint = NULL;
    snprintf(name, sizeof name, "heat-%lu", w->id);
    if (w->heat->process) {
        MUST(fgbi_safepoint_register(w->heat->process, name, &safepoint));
    }
    solve(w, safepoint);
    if (safepoint) {
        MUST(fgbi_safepoint_free(safepoint));
    }
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

static unsigned long number(const char *text, const char *what, unsigned long min,
                            unsigned long max) {
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < min || value > max) {
        fprintf(stderr, "%sheat: %s must be an integer from %lu to %lu, not '%s'\n", usage,
                what, min, max, text);
        exit(2);
    }
    return value;
}

/* Positional argument i (from 1) if given, else fallback. */
static unsigned long arg(int positional, char **argv, int i, const char *what,
                         unsigned long fallback, unsigned long min, unsigned long max) {
    return positional < i ? fallback : number(argv[i], what, min, max);
}

/* What the options after the positional arguments ask for. */
struct settings {
    int unprotected;
    unsigned long progress;
    /* Whether any option but --unprotected and --progress was given. */
    int tuned;
    struct fgbi_options options;
    const char *mode;
};

static void parse_options(int argc, char **argv, int first, struct settings *s) {
    static const char *const modes[] = {"fgbi", "remus", "llm", "xbzrle"};
    static const int mode_values[] = {FGBI_MODE_FGBI, FGBI_MODE_REMUS, FGBI_MODE_LLM,
                                      FGBI_MODE_XBZRLE};
    for (int i = first; i < argc; i++) {
        const char *option = argv[i];
        if (strcmp(option, "--unprotected") == 0) {
            s->unprotected = 1;
            continue;
        }
        if (i + 1 >= argc) {
            bad_usage("an option lacks its value, or is unknown", option);
        }
        const char *value = argv[++i];
        if (strcmp(option, "--progress") == 0) {
            s->progress = number(value, "--progress", 1, 1000000000);
            continue;
        }
        s->tuned = 1;
        if (strcmp(option, "--mode") == 0) {
            size_t m = 0;
            while (m < sizeof modes / sizeof modes[0] && strcmp(value, modes[m]) != 0) {
                m++;
            }
            if (m == sizeof modes / sizeof modes[0]) {
                bad_usage("--mode must be fgbi, remus, llm or xbzrle, not", value);
            }
            s->options.mode = mode_values[m];
            s->mode = modes[m];
        } else if (strcmp(option, "--backup") == 0) {
            s->options.backup = value;
        } else if (strcmp(option, "--key") == 0) {
            s->options.key_file = value;
        } else if (strcmp(option, "--transport") == 0) {
            s->options.transport = value;
        } else if (strcmp(option, "--rdma-device") == 0) {
            s->options.rdma_device = value;
        } else if (strcmp(option, "--heartbeat-ms") == 0) {
            s->options.heartbeat_ms = number(value, "--heartbeat-ms", 1, 60000);
        } else {
            bad_usage("unknown option", option);
        }
    }
    if (s->unprotected && s->tuned) {
        bad_usage("--unprotected takes no other option", NULL);
    }
}

static double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

/* Where the run resumes: 0, or the iteration the restart record of the replica
 * taken over names (then the backup is told the program runs again). */
static unsigned long resume(struct heat *heat) {
    int restarted;
    uint64_t epoch;
    const void *record;
    size_t len;
    MUST(fgbi_restart_record(heat->process, &restarted, &epoch, &record, &len));
    if (!restarted) {
        return 0;
    }
    heat->restarted = 1;
    uint64_t done = 0;
    if (len == sizeof done) {
        memcpy(&done, record, sizeof done);
    } else if (len != 0) {
        fprintf(stderr, "heat: the restart record is %zu bytes, not %zu: not heat's\n", len,
                sizeof done);
        exit(1);
    }
    if (done > heat->iterations) {
        fprintf(stderr,
                "heat: the replica is at iteration %llu, past the %lu asked for: restart "
                "with the primary's arguments\n",
                (unsigned long long)done, heat->iterations);
        exit(1);
    }
    char line[128];
    snprintf(line, sizeof line, "heat resumed at iteration %llu of %lu from epoch %llu",
             (unsigned long long)done, heat->iterations, (unsigned long long)epoch);
    printf("heat: restarted from the replica at epoch %llu, resuming at iteration %llu\n",
           (unsigned long long)epoch, (unsigned long long)done);
    fflush(stdout);
    MUST(fgbi_ready(heat->process, line));
    return (unsigned long)done;
}

int main(int argc, char **argv) {
    int positional = 0;
    while (positional + 1 < argc && positional < POSITIONAL &&
           strncmp(argv[positional + 1], "--", 2) != 0) {
        positional++;
    }
    struct heat heat;
    heat.n = arg(positional, argv, 1, "N", 512, 3, 16384);
    heat.iterations = arg(positional, argv, 2, "ITERATIONS", 1000, 1, 1000000000);
    heat.threads = arg(positional, argv, 3, "THREADS", 2, 1, MAX_THREADS);
    unsigned long epoch_ms = arg(positional, argv, 4, "EPOCH_MS", 10, 1, 60000);
    if (heat.threads > heat.n - 2) {
        fprintf(stderr, "heat: %lu threads for %zu interior rows: use at most one per row\n",
                heat.threads, heat.n - 2);
        return 2;
    }
    struct settings settings = {0};
    MUST(fgbi_options_default(&settings.options));
    settings.options.epoch_ms = epoch_ms;
    settings.mode = "fgbi";
    parse_options(argc, argv, positional + 1, &settings);

    size_t bytes = heat.n * heat.n * sizeof(double);
    heat.process = NULL;
    heat.start = 0;
    heat.restarted = 0;
    heat.progress = settings.progress;
    if (settings.unprotected) {
        for (size_t g = 0; g < 2; g++) {
            heat.grid[g] = calloc(heat.n * heat.n, sizeof(double));
            if (!heat.grid[g]) {
                fprintf(stderr, "heat: cannot allocate a %zu-byte grid\n", bytes);
                return 1;
            }
        }
    } else {
        size_t sizes[2] = {bytes, bytes};
        MUST(fgbi_protect(sizes, 2, &settings.options, &heat.process));
        for (size_t g = 0; g < 2; g++) {
            void *base;
            size_t len;
            MUST(fgbi_region(heat.process, g, &base, &len));
            heat.grid[g] = base;
        }
    }

    /* The main thread is worker 0: it registers before it writes the boundary. */
    struct worker workers[MAX_THREADS];
    fgbi_safepoint *safepoint = NULL;
    if (heat.process) {
        MUST(fgbi_safepoint_register(heat.process, "heat-0", &safepoint));
        heat.start = resume(&heat);
    }
    /* Rewriting a boundary a replica holds already changes nothing. */
    for (size_t g = 0; g < 2; g++) {
        for (size_t j = 0; j < heat.n; j++) {
            heat.grid[g][j] = 100.0; /* the hot top edge; the others stay at 0 */
        }
    }
    if (safepoint) {
        MUST(fgbi_safepoint_pass(safepoint));
    }
    if (pthread_barrier_init(&heat.barrier, NULL, (unsigned)heat.threads) != 0) {
        fprintf(stderr, "heat: pthread_barrier_init failed\n");
        return 1;
    }
    struct timespec started;
    clock_gettime(CLOCK_MONOTONIC, &started);
    for (unsigned long t = 0; t < heat.threads; t++) {
        workers[t].heat = &heat;
        workers[t].id = t;
        if (t > 0 && pthread_create(&workers[t].thread, NULL, worker_main, &workers[t]) != 0) {
            fprintf(stderr, "heat: cannot start thread %lu\n", t);
            return 1;
        }
    }
    solve(&workers[0], safepoint);
    if (safepoint) {
        MUST(fgbi_safepoint_free(safepoint));
    }
    for (unsigned long t = 1; t < heat.threads; t++) {
        pthread_join(workers[t].thread, NULL);
    }
    double seconds = seconds_since(&started);
    pthread_barrier_destroy(&heat.barrier);

    struct fgbi_summary summary = {0};
    fgbi_replica *replica = NULL;
    if (heat.process) {
        MUST(fgbi_finish(heat.process, &summary, &replica));
    }

    const double *result = heat.grid[heat.iterations % 2];
    double total = 0.0;
    for (size_t i = 0; i < heat.n * heat.n; i++) {
        total += result[i];
    }
    uint64_t live = checksum(result, bytes);
    printf("heat: %zux%zu grid, %lu iterations, %lu threads, epoch %lu ms\n", heat.n, heat.n,
           heat.iterations, heat.threads, epoch_ms);
    if (settings.unprotected) {
        printf("heat: unprotected\n");
    } else if (settings.options.backup) {
        printf("heat: protected by the backup at %s over %s, mode %s\n", settings.options.backup,
               settings.options.transport ? settings.options.transport : "tcp", settings.mode);
    } else if (settings.tuned) {
        printf("heat: protected in-process, mode %s\n", settings.mode);
    }
    printf("mean temperature %.6f\n", total / (double)(heat.n * heat.n));
    printf("checksum live 0x%016llx\n", (unsigned long long)live);

    int failed = 0;
    if (replica) {
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
        uint64_t replicated = checksum(replica_grid, replica_len);
        printf("checksum replica 0x%016llx\n", (unsigned long long)replicated);
        printf("restart record %llu\n", (unsigned long long)restart);
        failed = summary.mismatches != 0 || live != replicated || restart != heat.iterations;
        MUST(fgbi_replica_free(replica));
    } else if (heat.process) {
        printf("replica on the backup at %s\n", settings.options.backup);
    }
    if (heat.process) {
        printf("epochs %llu verified %llu mismatches %llu\n", (unsigned long long)summary.epochs,
               (unsigned long long)summary.verified, (unsigned long long)summary.mismatches);
        printf("pause_us p50 %.1f p99 %.1f max %.1f\n", summary.pause_us_p50,
               summary.pause_us_p99, summary.pause_us_max);
    }
    printf("heat: result iterations=%lu seconds=%.6f checksum=0x%016llx epochs=%llu "
           "committed=%llu pause_us_p50=%.1f pause_us_p99=%.1f pause_us_max=%.1f "
           "wire_bytes=%llu\n",
           heat.iterations, seconds, (unsigned long long)live,
           (unsigned long long)summary.epochs, (unsigned long long)summary.committed,
           summary.pause_us_p50, summary.pause_us_p99, summary.pause_us_max,
           (unsigned long long)summary.wire_bytes);

    if (failed) {
        fprintf(stderr, "heat: FAILED: the replica does not match the live run\n");
    }
    if (heat.process) {
        MUST(fgbi_process_free(heat.process));
    } else {
        free(heat.grid[0]);
        free(heat.grid[1]);
    }
    return failed ? 1 : 0;
}
