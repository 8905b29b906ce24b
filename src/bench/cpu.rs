//! CPU time, from the kernel's scheduler statistics (`/proc/.../schedstat`, whose
//! first field is the nanoseconds a task has run).

/// Nanoseconds the calling thread has run, if the kernel reports it.
pub fn thread_ns() -> Option<u64> {
    read("/proc/thread-self/schedstat")
}

/// Nanoseconds all live threads of this process have run, if the kernel reports it.
pub fn process_ns() -> Option<u64> {
    tasks_ns("/proc/self/task")
}

/// Nanoseconds all live threads of process `pid` have run, if the kernel reports it.
pub fn process_ns_of(pid: u32) -> Option<u64> {
    tasks_ns(format!("/proc/{pid}/task"))
}

fn tasks_ns(dir: impl AsRef<std::path::Path>) -> Option<u64> {
    let tasks = std::fs::read_dir(dir).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        // A thread that exits between the listing and the read is skipped.
        total += read(task.path().join("schedstat")).unwrap_or(0);
    }
    Some(total)
}

fn read(path: impl AsRef<std::path::Path>) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_moves_forward_while_working() {
        let (t0, p0) = (thread_ns().unwrap(), process_ns().unwrap());
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_ns().unwrap() > t0);
        assert!(process_ns().unwrap() > p0);
        assert!(process_ns_of(std::process::id()).unwrap() > p0);
    }
}
