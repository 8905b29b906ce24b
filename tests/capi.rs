//! The C API called as C calls it: its error paths (NULL pointers, bad sizes and
//! options, unknown and freed handles, calls out of order, a thread that never
//! passes its safepoint), bad remote-backup options, a whole protect-to-replica
//! round trip, the restart calls of a process that was not restarted, and the
//! header's agreement with the Rust status and mode values.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
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
        mode: -1,
        backup: ptr::null(),
        key_file: ptr::null(),
        transport: ptr::null(),
        rdma_device: ptr::null(),
        heartbeat_ms: 0,
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
    let code = protect(&[4096], &options(|o| o.mode = 7)).unwrap_err();
    assert_fails(code, Status::Invalid, &["mode (7)", "FGBI_MODE_REMUS"]);
}

/// A key file holding `bytes` with permissions `mode`, in a scratch directory.
fn key_file(name: &str, mode: u32, bytes: &[u8]) -> CString {
    let dir = std::env::temp_dir().join(format!("fgbi-capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    CString::new(path.into_os_string().into_encoded_bytes()).unwrap()
}

#[test]
fn bad_backup_options_are_invalid_and_say_what_to_do() {
    let key = key_file("good.key", 0o600, b"0123456789abcdef0123456789abcdef");
    let open = key_file("open.key", 0o644, b"0123456789abcdef0123456789abcdef");
    let remote = |backup: &'static CStr, key: *const c_char| {
        options(move |o| {
            o.backup = backup.as_ptr();
            o.key_file = key;
        })
    };
    let cases: [(FgbiOptions, &[&str]); 8] = [
        (
            remote(c"127.0.0.1:7000", ptr::null()),
            &["key_file is NULL", "fgbi backup", "--key"],
        ),
        (
            remote(c"nonsense", key.as_ptr()),
            &["\"nonsense\" is not a host:port", "--listen"],
        ),
        (remote(c"127.0.0.1:99999", key.as_ptr()), &["host:port"]),
        (
            remote(c"127.0.0.1:7000", open.as_ptr()),
            &["key_file:", "chmod 600"],
        ),
        (
            remote(c"127.0.0.1:7000", c"/nonexistent/fgbi.key".as_ptr()),
            &["key_file:", "cannot read"],
        ),
        (
            FgbiOptions {
                transport: c"pigeon".as_ptr(),
                ..remote(c"127.0.0.1:7000", key.as_ptr())
            },
            &["transport \"pigeon\" is unknown", "\"tcp\""],
        ),
        (
            FgbiOptions {
                rdma_device: c"rxe0".as_ptr(),
                ..remote(c"127.0.0.1:7000", key.as_ptr())
            },
            &["rdma_device is set", "\"rdma\""],
        ),
        (
            options(|o| o.key_file = key.as_ptr()),
            &["remote backup only", "set backup"],
        ),
    ];
    for (options, words) in cases {
        let code = protect(&[4096], &options).unwrap_err();
        assert_fails(code, Status::Invalid, words);
    }
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
fn a_process_not_restarted_has_no_restart_record_and_ready_does_nothing() {
    if !tracking() {
        return;
    }
    let process = protect(&[4096], &options(|_| {})).unwrap();
    let mut data: *const c_void = NonNull::<u8>::dangling().as_ptr().cast();
    let (mut restarted, mut epoch, mut len) = (-1, 9, 9);
    // SAFETY: the out-pointers are valid.
    let code =
        unsafe { fgbi_restart_record(process, &mut restarted, &mut epoch, &mut data, &mut len) };
    assert_eq!(code, 0, "{}", last_error());
    assert_eq!((restarted, epoch, data, len), (0, 0, ptr::null(), 0));
    // SAFETY: the message is NUL-terminated.
    assert_eq!(unsafe { fgbi_ready(process, c"serving".as_ptr()) }, 0);
    // SAFETY: a NULL message is what is tested.
    let code = unsafe { fgbi_ready(process, ptr::null()) };
    assert_fails(code, Status::Null, &["fgbi_ready", "`message`"]);
    // SAFETY: a NULL out-pointer is what is tested; the others are valid.
    let code =
        unsafe { fgbi_restart_record(process, ptr::null_mut(), &mut epoch, &mut data, &mut len) };
    assert_fails(code, Status::Null, &["fgbi_restart_record", "`restarted`"]);
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

/// The `FGBI_<prefix>NAME = value` enumerators the header declares, as (NAME, value).
fn declared(prefix: &str) -> Vec<(String, i32)> {
    include_str!("../include/fgbi.h")
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim().trim_end_matches(',').split_once(" = ")?;
            let name = name.strip_prefix("FGBI_")?.strip_prefix(prefix)?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn the_header_declares_the_rust_status_values() {
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
    .map(|(name, status)| (name.to_string(), status as i32));
    let statuses: Vec<_> = declared("")
        .into_iter()
        .filter(|(name, _)| !name.starts_with("MODE_"))
        .collect();
    assert_eq!(statuses, rust);
}

#[test]
fn the_header_declares_the_modes_fgbi_protect_accepts() {
    let modes = declared("MODE_");
    let names: Vec<&str> = modes.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["FGBI", "REMUS", "LLM", "XBZRLE"]);
    let defaults = options(|_| {});
    assert_eq!(defaults.mode, 0, "the default is FGBI_MODE_FGBI");
    for (name, value) in modes {
        // Options that fail after the mode is checked: a mode refused would say so.
        let probe = options(|o| {
            o.mode = value;
            o.transport = c"tcp".as_ptr();
        });
        let code = protect(&[4096], &probe).unwrap_err();
        assert_fails(code, Status::Invalid, &["remote backup only"]);
        assert!(
            !last_error().contains("fgbi_mode"),
            "{name}: {}",
            last_error()
        );
    }
}
