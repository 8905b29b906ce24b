//! The C API called as C calls it: its error paths (NULL pointers, bad sizes and
//! options, unknown and freed handles, calls out of order, a thread that never
//! passes its safepoint), a whole protect-to-replica round trip, and the header's
//! agreement with the Rust status values.

use std::ffi::{CStr, c_int, c_void};
use std::ptr::{self, NonNull};
use std::time::Duration;

use fgbi::capi::*;
use fgbi_hyp::tracking::DirtyTracker;

/// This thread's last error message.
fn last_error() -> String {
    // SAFETY: fgbi_last_error returns a NUL-terminated string that stays valid until
    // the next failing call on this thread.
    unsafe { CStr::from_ptr(fgbi_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts that `code` is `status` and that the message names `words`.
fn assert_fails(code: c_int, status: Status, words: &[&str]) {
    let message = last_error();
    assert_eq!(code, status as c_int, "{message}");
    for word in words {
        assert!(message.contains(word), "`{word}` missing from: {message}");
    }
}

/// Options with `edit` applied to the defaults.
fn options(edit: impl FnOnce(&mut FgbiOptions)) -> FgbiOptions {
    let mut options = FgbiOptions {
        epoch_ms: 0,
        block_size: 0,
        stop_timeout_ms: 0,
        verify_every: 0,
        cache_bytes: 0,
    };
    // SAFETY: `options` is valid for writes.
    assert_eq!(unsafe { fgbi_options_default(&mut options) }, 0);
    edit(&mut options);
    options
}

/// fgbi_protect with these arguments: the handle, or the status.
fn protect(sizes: &[usize], options: &FgbiOptions) -> Result<*mut FgbiProcess, c_int> {
    let mut process = ptr::null_mut();
    // SAFETY: `sizes` holds `sizes.len()` elements; `options` and `process` are valid.
    match unsafe { fgbi_protect(sizes.as_ptr(), sizes.len(), options, &mut process) } {
        0 => Ok(process),
        status => Err(status),
    }
}

/// Whether the kernel can track dirty pages; says so loudly if not.
fn tracking() -> bool {
    fgbi_hyp::feature::available("kernel dirty tracking", DirtyTracker::probe())
}

#[test]
fn null_pointers_are_refused_and_named() {
    let defaults = options(|_| {});
    let mut process = ptr::null_mut();
    // SAFETY: NULL pointers are what is tested; the others are valid.
    let code = unsafe { fgbi_protect(ptr::null(), 1, &defaults, &mut process) };
    assert_fails(code, Status::Null, &["fgbi_protect", "`sizes`"]);
    // SAFETY: as above.
    let code = unsafe { fgbi_protect([4096].as_ptr(), 1, &defaults, ptr::null_mut()) };
    assert_fails(code, Status::Null, &["`process`"]);
    // SAFETY: as above.
    let code = unsafe { fgbi_options_default(ptr::null_mut()) };
    assert_fails(code, Status::Null, &["fgbi_options_default", "`options`"]);
    let (mut base, mut len) = (ptr::null_mut(), 0);
    // SAFETY: as above.
    let code = unsafe { fgbi_region(ptr::null(), 0, &mut base, &mut len) };
    assert_fails(code, Status::Null, &["fgbi_region", "`process`"]);
    // SAFETY: as above.
    let code = unsafe { fgbi_safepoint_pass(ptr::null()) };
    assert_fails(code, Status::Null, &["fgbi_safepoint_pass", "`safepoint`"]);
    assert_fails(
        fgbi_safepoint_enter_outside(ptr::null()),
        Status::Null,
        &["fgbi_safepoint_enter_outside"],
    );
    assert_fails(
        fgbi_replica_free(ptr::null_mut()),
        Status::Null,
        &["fgbi_replica_free"],
    );
    let mut replica = ptr::null_mut();
    // SAFETY: as above.
    let code = unsafe { fgbi_finish(ptr::null(), ptr::null_mut(), &mut replica) };
    assert_fails(code, Status::Null, &["fgbi_finish", "`summary`"]);
}

#[test]
fn bad_sizes_and_options_are_invalid_before_anything_is_mapped() {
    let defaults = options(|_| {});
    for sizes in [&[][..], &[4096, 0], &[usize::MAX]] {
        let code = protect(sizes, &defaults).unwrap_err();
        assert_fails(code, Status::Invalid, &["fgbi_protect", "regions"]);
    }
    let code = protect(&[4096], &options(|o| o.block_size = 48)).unwrap_err();
    assert_fails(code, Status::Invalid, &["block_size", "power of two"]);
    let code = protect(&[4096], &options(|o| o.epoch_ms = 0)).unwrap_err();
    assert_fails(code, Status::Invalid, &["epoch_ms", "fgbi_options_default"]);
    let code = protect(&[4096], &options(|o| o.stop_timeout_ms = 0)).unwrap_err();
    assert_fails(code, Status::Invalid, &["stop_timeout_ms"]);
}

#[test]
fn unknown_handles_are_refused_without_being_touched() {
    let bogus = NonNull::<c_void>::dangling().as_ptr();
    let (mut base, mut len) = (ptr::null_mut(), 0);
    // SAFETY: the out-pointers are valid; the handle is only looked up, never read.
    let code = unsafe { fgbi_region(bogus.cast(), 0, &mut base, &mut len) };
    assert_fails(code, Status::Handle, &["`process`", "fgbi_protect"]);
    assert_fails(
        fgbi_safepoint_leave_outside(bogus.cast()),
        Status::Handle,
        &["fgbi_safepoint_register"],
    );
    assert_fails(
        fgbi_process_free(bogus.cast()),
        Status::Handle,
        &["fgbi_process"],
    );
    let (mut data, mut len) = (ptr::null(), 0);
    // SAFETY: as above.
    let code = unsafe { fgbi_replica_state(bogus.cast(), &mut data, &mut len) };
    assert_fails(code, Status::Handle, &["fgbi_replica", "fgbi_finish"]);
}

#[test]
fn freed_and_mistyped_handles_are_refused() {
    if !tracking() {
        return;
    }
    let process = protect(&[4096], &options(|_| {})).unwrap();
    let (mut data, mut len) = (ptr::null(), 0);
    // SAFETY: the out-pointers are valid; a process handle is not a replica handle.
    let code = unsafe { fgbi_replica_state(process.cast(), &mut data, &mut len) };
    assert_fails(code, Status::Handle, &["not a live fgbi_replica"]);
    assert_eq!(fgbi_process_free(process), 0, "{}", last_error());
    assert_fails(
        fgbi_process_free(process),
        Status::Handle,
        &["not after freeing it"],
    );
}

#[test]
fn a_thread_outside_counts_as_stopped_and_the_replica_is_exact() {
    if !tracking() {
        return;
    }
    let short = options(|o| {
        o.epoch_ms = 2;
        o.stop_timeout_ms = 50;
        o.cache_bytes = 1 << 20;
    });
    let process = protect(&[3 * 4096, 4096], &short).unwrap();
    let mut safepoint = ptr::null_mut();
    // SAFETY: the name is NUL-terminated and `safepoint` valid for writes.
    let code = unsafe { fgbi_safepoint_register(process, c"waiter".as_ptr(), &mut safepoint) };
    assert_eq!(code, 0, "{}", last_error());

    // A wait four times the stop timeout: checkpoints go on meanwhile.
    assert_eq!(fgbi_safepoint_enter_outside(safepoint), 0);
    assert_fails(
        fgbi_safepoint_enter_outside(safepoint),
        Status::State,
        &["already outside"],
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fgbi_safepoint_leave_outside(safepoint), 0);
    assert_fails(
        fgbi_safepoint_leave_outside(safepoint),
        Status::State,
        &["not outside"],
    );

    let (mut base, mut len) = (ptr::null_mut(), 0);
    // SAFETY: the out-pointers are valid.
    assert_eq!(unsafe { fgbi_region(process, 0, &mut base, &mut len) }, 0);
    assert_eq!(len, 3 * 4096);
    // SAFETY: region 0 is `len` writable bytes, written only by this registered thread.
    let live = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), len) };
    for (i, byte) in live.iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }
    let record = 7u64.to_le_bytes();
    // SAFETY: `record` is `record.len()` readable bytes; the handle is live.
    unsafe {
        assert_eq!(
            fgbi_set_state(process, record.as_ptr().cast(), record.len()),
            0
        );
        assert_eq!(fgbi_safepoint_pass(safepoint), 0);
    }
    assert_eq!(fgbi_safepoint_free(safepoint), 0);

    let mut summary = FgbiSummary::default();
    let mut replica = ptr::null_mut();
    // SAFETY: the out-pointers are valid.
    let code = unsafe { fgbi_finish(process, &mut summary, &mut replica) };
    assert_eq!(code, 0, "{}", last_error());
    assert!(summary.epochs >= 10, "{summary:?}");
    assert_eq!((summary.verified, summary.mismatches), (summary.epochs, 0));
    // SAFETY: the out-pointers are valid.
    let code = unsafe { fgbi_finish(process, &mut summary, &mut replica) };
    assert_fails(code, Status::State, &["already finished"]);

    let (mut copy, mut copy_len) = (ptr::null(), 0);
    // SAFETY: the out-pointers are valid.
    let code = unsafe { fgbi_replica_region(replica, 0, &mut copy, &mut copy_len) };
    assert_eq!(code, 0, "{}", last_error());
    // SAFETY: the replica's region is `copy_len` bytes, alive until fgbi_replica_free.
    let region = unsafe { std::slice::from_raw_parts(copy.cast::<u8>(), copy_len) };
    assert_eq!(region, live);
    // SAFETY: the out-pointers are valid.
    let code = unsafe { fgbi_replica_state(replica, &mut copy, &mut copy_len) };
    assert_eq!(code, 0, "{}", last_error());
    // SAFETY: the restart record is `copy_len` bytes, alive until fgbi_replica_free.
    let state = unsafe { std::slice::from_raw_parts(copy.cast::<u8>(), copy_len) };
    assert_eq!(state, record);
    // SAFETY: the out-pointers are valid.
    let code = unsafe { fgbi_replica_region(replica, 2, &mut copy, &mut copy_len) };
    assert_fails(code, Status::Invalid, &["no region 2", "it has 2"]);
    assert_eq!(fgbi_replica_free(replica), 0);
    assert_eq!(fgbi_process_free(process), 0);
}

#[test]
fn a_thread_that_never_passes_fails_finish_saying_what_to_do() {
    if !tracking() {
        return;
    }
    let process = protect(&[4096], &options(|o| o.stop_timeout_ms = 30)).unwrap();
    let mut safepoint = ptr::null_mut();
    // SAFETY: the name is NUL-terminated and `safepoint` valid for writes.
    let code = unsafe { fgbi_safepoint_register(process, c"solver".as_ptr(), &mut safepoint) };
    assert_eq!(code, 0, "{}", last_error());
    let (mut summary, mut replica) = (FgbiSummary::default(), ptr::null_mut());
    // SAFETY: the out-pointers are valid.
    let code = unsafe { fgbi_finish(process, &mut summary, &mut replica) };
    assert_fails(
        code,
        Status::Safepoint,
        &[
            "fgbi_finish",
            "\"solver\"",
            "fgbi_safepoint_pass",
            "fgbi_safepoint_free",
        ],
    );
    assert!(replica.is_null(), "no replica on failure");
    assert_eq!(fgbi_safepoint_free(safepoint), 0);
    assert_eq!(fgbi_process_free(process), 0);
}

#[test]
fn the_header_declares_the_rust_status_values() {
    let header = include_str!("../include/fgbi.h");
    let declared: Vec<(&str, i32)> = header
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim().trim_end_matches(',').split_once(" = ")?;
            Some((name.strip_prefix("FGBI_")?, value.parse().ok()?))
        })
        .collect();
    let rust = [
        ("OK", Status::Ok),
        ("ERR_NULL", Status::Null),
        ("ERR_INVALID", Status::Invalid),
        ("ERR_HANDLE", Status::Handle),
        ("ERR_STATE", Status::State),
        ("ERR_UNSUPPORTED", Status::Unsupported),
        ("ERR_PERMISSION", Status::Permission),
        ("ERR_TRACKING", Status::Tracking),
        ("ERR_RESOURCES", Status::Resources),
        ("ERR_SAFEPOINT", Status::Safepoint),
        ("ERR_REPLICATION", Status::Replication),
        ("ERR_PANIC", Status::Panic),
    ]
    .map(|(name, status)| (name, status as i32));
    assert_eq!(declared, rust);
}
