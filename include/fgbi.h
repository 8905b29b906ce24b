/*
 * fgbi.h: continuous-checkpoint protection of an application's own memory.
 *
 * C99; usable from C++ (the declarations are extern "C"). Link with -lfgbi
 * (libfgbi.so, built by `cargo build --release` into target/release).
 * docs/operating.md, section "C, C++ and Fortran", has the full protocol.
 *
 * Protocol
 *   1. fgbi_protect: allocate protected regions; checkpointing starts at once.
 *   2. fgbi_region: where each region lies. Keep the program's state in them.
 *   3. Each thread that writes them: fgbi_safepoint_register, then
 *      fgbi_safepoint_pass at every consistent point (after an iteration),
 *      preceded by fgbi_set_state with the restart record (the iteration
 *      number) when it is the thread that owns it. Wrap blocking waits (a
 *      barrier, a receive) in fgbi_safepoint_enter_outside / _leave_outside.
 *      fgbi_safepoint_free before the thread exits.
 *   4. fgbi_finish: a final, verified checkpoint; returns an fgbi_summary and
 *      the replica, whose regions and restart record are what a restart reads
 *      (fgbi_replica_region, fgbi_replica_state). With a remote backup
 *      (fgbi_options.backup) the replica stays on the backup: none is returned.
 *   5. fgbi_replica_free, fgbi_process_free.
 *
 * Failover and restart
 *   With options.backup set, every checkpoint goes to `fgbi backup` over the
 *   network instead of an in-process replica. Started with
 *   `fgbi backup --listen ADDR --key FILE --mem N --restart 'COMMAND'` (N: the
 *   sum of the region sizes, each rounded up to 2 MiB; the same block size), the
 *   backup runs COMMAND when the primary dies, handing it the replica through
 *   FGBI_RESTART_* variables. The restarted program calls fgbi_protect with the
 *   same region sizes: it takes over the replica, so the regions start with the
 *   contents of the last committed checkpoint (not zeros) and the restart record
 *   with them. It then reads fgbi_restart_record, resumes from what the record
 *   names, and calls fgbi_ready once it runs again (the backup waits for that
 *   line). With options.backup set it is protected by that backup from its first
 *   checkpoint on; without, by an in-process replica. If fgbi_protect fails
 *   there, the backup learns it from the program's exit status (print
 *   fgbi_last_error and exit). With a remote backup, fgbi writes a line to
 *   stderr when the backup is reached, when it holds a checkpoint, and when
 *   protection is lost (with the reason).
 *
 * Errors
 *   Every function but fgbi_last_error returns an int: FGBI_OK (0) or one of the
 *   negative fgbi_status values. fgbi_last_error then says, for the calling
 *   thread, what failed and what to do. Pointer arguments are checked for NULL
 *   (FGBI_ERR_NULL) and handles against the live ones (FGBI_ERR_HANDLE), except
 *   in fgbi_safepoint_pass, which must stay cheap and only checks for NULL.
 *
 * Threads
 *   Every function may be called from any thread. Handles are opaque pointers.
 *
 * Fortran (ISO_C_BINDING)
 *   Bind each function with an interface block, `bind(c, name="fgbi_...")`:
 *   - int return values:         integer(c_int)
 *   - size_t arguments:          integer(c_size_t), value
 *   - handles (fgbi_process *):  type(c_ptr), value
 *   - out pointers (T **):       type(c_ptr), intent(out)  (by reference)
 *   - out size_t (size_t *):     integer(c_size_t), intent(out)
 *   - const size_t *sizes:       integer(c_size_t), intent(in) :: sizes(*)
 *   - const char *name:          character(kind=c_char), intent(in) :: name(*),
 *                                passed as trim(name) // c_null_char
 *   - const void *data:          type(c_ptr), value  (e.g. c_loc(iteration))
 *   - struct fgbi_options / fgbi_summary: a type, bind(c) with the same fields
 *     in the same order, uint64_t as integer(c_int64_t), int32_t as
 *     integer(c_int32_t), double as real(c_double), const char * as
 *     type(c_ptr) (c_loc of a NUL-terminated character(kind=c_char) array with
 *     the target attribute, or c_null_ptr); pass it by reference
 *     (fgbi_protect's options: c_loc(o), or c_null_ptr for the defaults).
 *   - fgbi_status:               enum, bind(c) with the same enumerators.
 *   Map a region onto an array with c_f_pointer(base, grid, [n, n]).
 *   fgbi_last_error returns type(c_ptr) to a NUL-terminated string.
 */
#ifndef FGBI_H
#define FGBI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What a call returns. */
enum fgbi_status {
    FGBI_OK = 0,
    /* A required pointer argument was NULL. */
    FGBI_ERR_NULL = -1,
    /* An argument is out of range: region sizes, options, a region index. */
    FGBI_ERR_INVALID = -2,
    /* A handle is unknown, already freed, or of another kind. */
    FGBI_ERR_HANDLE = -3,
    /* A call out of order: finishing twice, leaving a wait never entered. */
    FGBI_ERR_STATE = -4,
    /* The kernel lacks dirty tracking: it needs Linux 6.7 or later. */
    FGBI_ERR_UNSUPPORTED = -5,
    /* The process may not use userfaultfd: run as root or with CAP_SYS_PTRACE,
     * or set the sysctl vm.unprivileged_userfaultfd=1. */
    FGBI_ERR_PERMISSION = -6,
    /* Dirty tracking failed on a kernel that supports it. */
    FGBI_ERR_TRACKING = -7,
    /* Memory could not be mapped or the epoch thread could not be started. */
    FGBI_ERR_RESOURCES = -8,
    /* A registered thread did not reach a safepoint within the stop timeout;
     * checkpointing has stopped. */
    FGBI_ERR_SAFEPOINT = -9,
    /* The replica refused an epoch or the epoch thread failed: a bug in fgbi. */
    FGBI_ERR_REPLICATION = -10,
    /* fgbi panicked: a bug in fgbi. */
    FGBI_ERR_PANIC = -11
};

/* How checkpoints are encoded: fgbi_options.mode. */
enum fgbi_mode {
    /* Changed 64-byte blocks by digest, shared and hybrid-encoded (the default). */
    FGBI_MODE_FGBI = 0,
    /* Every dirty page whole. */
    FGBI_MODE_REMUS = 1,
    /* Remus's encoding with the epoch given: a C program has no input log to
     * replay, so this is Remus with (usually longer) epochs. */
    FGBI_MODE_LLM = 2,
    /* Run delta against a cached previous copy of the page (QEMU's XBZRLE). */
    FGBI_MODE_XBZRLE = 3
};

/* A protected process: its regions, safepoints, restart record, epoch thread. */
typedef struct fgbi_process fgbi_process;
/* One thread's safepoint. */
typedef struct fgbi_safepoint fgbi_safepoint;
/* The replica fgbi_finish leaves: regions and restart record. */
typedef struct fgbi_replica fgbi_replica;

/* How to protect. Programs must fill it with fgbi_options_default and then
 * change what they need: fields may be added at its end. fgbi_protect checks
 * every field and fails with FGBI_ERR_INVALID, saying which and why. */
struct fgbi_options {
    /* Milliseconds between checkpoints, at least 1 (default 25). */
    uint64_t epoch_ms;
    /* Block size in bytes: a power of two from 32 to 4096 (default 64). */
    uint64_t block_size;
    /* Milliseconds the registered threads have to reach a safepoint, at least 1
     * (default 1000). */
    uint64_t stop_timeout_ms;
    /* Compare the replica with the checkpoint every this many epochs; 0: only the
     * final checkpoint, which is always compared (default 1). In-process replica
     * only: with backup set it does not apply. */
    uint64_t verify_every;
    /* Bytes of page cache for run deltas (default 64 MiB). */
    uint64_t cache_bytes;
    /* Encoding: an enum fgbi_mode value (default FGBI_MODE_FGBI). */
    int32_t mode;
    /* "host:port" of `fgbi backup --listen`: checkpoints go there, and it
     * restarts the program when this one dies. NULL: an in-process replica
     * (default). */
    const char *backup;
    /* The key file shared with the backup (`fgbi backup --key`): at least 16
     * bytes, readable by its owner only. Required with backup; NULL otherwise. */
    const char *key_file;
    /* With backup: "tcp" (io_uring when the kernel allows it, else plain
     * sockets), "uring", "std" or "rdma"; NULL: "tcp" (default). */
    const char *transport;
    /* With transport "rdma": the device (as ibv_devices names it); NULL: the
     * first with an active port (default). */
    const char *rdma_device;
    /* With backup: milliseconds between heartbeats; a side silent for four is
     * dead. 0: 25 (default 25). */
    uint64_t heartbeat_ms;
};

/* What protection did. */
struct fgbi_summary {
    /* Checkpoints taken, the final one included. */
    uint64_t epochs;
    /* Checkpoints compared with the replica. */
    uint64_t verified;
    /* Checkpoints whose replica differed: 0 unless something is broken. */
    uint64_t mismatches;
    /* Dirty pages replicated. */
    uint64_t dirty_pages;
    /* Bytes encoded. */
    uint64_t wire_bytes;
    /* Pause per checkpoint (type II downtime), microseconds. */
    double pause_us_p50;
    double pause_us_p99;
    double pause_us_max;
    /* Checkpoints the replica committed: all of them in-process; those the
     * backup acknowledged with a remote backup. */
    uint64_t committed;
};

/* The message of this thread's last failed call, or "" if none failed. Valid until
 * the next call on this thread fails; successful calls leave it alone. */
const char *fgbi_last_error(void);

/* Fills *options with the defaults. */
int fgbi_options_default(struct fgbi_options *options);

/* Protects count regions of sizes[i] bytes (each non-zero) and starts
 * checkpointing them; options NULL means the defaults. On success *process is
 * the handle. In a program started by `fgbi backup --restart`, takes over the
 * replica handed over first: sizes must be the regions the primary protected
 * (else FGBI_ERR_INVALID), and they start with the replica's contents. Only the
 * first call in a process takes over. */
int fgbi_protect(const size_t *sizes, size_t count,
                 const struct fgbi_options *options, fgbi_process **process);

/* Sets *base and *len to protected region index (from 0): zero-filled at first,
 * valid until fgbi_process_free. */
int fgbi_region(const fgbi_process *process, size_t index, void **base,
                size_t *len);

/* Registers the calling thread, under name (for error messages), as a writer of
 * protected memory. Waits first if a checkpoint is being taken. */
int fgbi_safepoint_register(const fgbi_process *process, const char *name,
                            fgbi_safepoint **safepoint);

/* A consistent point of the calling thread: parks while a checkpoint is taken.
 * One atomic load when none is pending. The handle must be live (only NULL is
 * checked). */
int fgbi_safepoint_pass(const fgbi_safepoint *safepoint);

/* Brackets a wait outside protected memory (a barrier, a receive): in between,
 * the thread counts as stopped and must neither touch protected memory nor pass
 * its safepoint. Leaving parks first if a checkpoint is being taken. */
int fgbi_safepoint_enter_outside(const fgbi_safepoint *safepoint);
int fgbi_safepoint_leave_outside(const fgbi_safepoint *safepoint);

/* Unregisters the thread: before it exits or calls fgbi_finish. */
int fgbi_safepoint_free(fgbi_safepoint *safepoint);

/* Sets the restart record (len bytes at data; data may be NULL if len is 0) that
 * travels with the next checkpoints. Call it just before a safepoint. */
int fgbi_set_state(const fgbi_process *process, const void *data, size_t len);

/* Takes a final checkpoint (verified, in-process) and stops checkpointing:
 * *summary says what protection did, *replica is the in-process replica; with
 * a remote backup, which holds the replica, *replica is NULL (and verified and
 * mismatches are 0). Every registered thread must have freed its safepoint (or
 * be outside) first. Once per process; its regions stay readable until
 * fgbi_process_free. */
int fgbi_finish(const fgbi_process *process, struct fgbi_summary *summary,
                fgbi_replica **replica);

/* Whether fgbi_protect took over a replica (the process was started by
 * `fgbi backup --restart`): then *restarted is 1, *epoch the epoch the replica
 * held, and *data, *len the restart record committed with it (valid until
 * fgbi_process_free; len 0 if the primary never set one). Otherwise *restarted
 * and *epoch are 0, *data NULL and *len 0. */
int fgbi_restart_record(const fgbi_process *process, int *restarted,
                        uint64_t *epoch, const void **data, size_t *len);

/* Tells the backup that restarted this process that it runs again: sends
 * message as one line (newlines become spaces), which the backup prints after
 * `restarted pid=P`. Call it once the program has resumed; the backup kills a
 * restarted program that does not within its --ready-timeout-ms. Later calls,
 * and calls in a process that was not restarted, do nothing. */
int fgbi_ready(const fgbi_process *process, const char *message);

/* Frees the process and unmaps its regions. Without fgbi_finish, stops
 * checkpointing first, discarding the summary and replica, and returns what that
 * final checkpoint returned; the process is freed either way. */
int fgbi_process_free(fgbi_process *process);

/* Sets *base and *len to the replica of region index, valid until
 * fgbi_replica_free. */
int fgbi_replica_region(const fgbi_replica *replica, size_t index,
                        const void **base, size_t *len);

/* Sets *data and *len to the restart record committed with the final
 * checkpoint, valid until fgbi_replica_free. */
int fgbi_replica_state(const fgbi_replica *replica, const void **data,
                       size_t *len);

/* Frees the replica. */
int fgbi_replica_free(fgbi_replica *replica);

#ifdef __cplusplus
}
#endif

#endif /* FGBI_H */
