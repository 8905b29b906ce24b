//! The two system calls the recorder needs, behind a safe API: reading another
//! process's memory (`process_vm_readv`) and sending it a signal (`kill`).

use std::io;

/// Reads `buf.len()` bytes of process `pid`'s memory at address `addr` into `buf`;
/// returns how many bytes were read, which is short if the range stops being
/// readable part way (an unmapped or inaccessible page).
pub(crate) fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which is valid for writes of `buf.len()` bytes
    // and exclusively borrowed for the call; the kernel only reads the two iovec
    // structs, which live on this stack frame, and checks the remote range itself
    // (a bad remote address is an error, never a write here).
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Sends signal `signal` to process `pid`, which must be positive (kill's process
/// group and broadcast forms are refused).
pub(crate) fn signal(pid: i32, signal: libc::c_int) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill takes plain integers and touches no memory of this process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
