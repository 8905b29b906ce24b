//! Tests that need a host feature (userfaultfd, KVM, io_uring, a compiler, a tool).
//!
//! [`available`] is the one way a test decides to skip: where the feature is absent
//! it says so loudly on stderr and the test returns. Because a passing test's output
//! is hidden, a skip is easy to miss; with `FGBI_REQUIRE_ALL=1` in the environment a
//! missing feature fails the test instead. `.ci/run` sets it: the CI machine has every
//! feature, so nothing may skip there.

use std::fmt::Display;

/// Environment variable that turns skips into failures.
pub const REQUIRE_ALL: &str = "FGBI_REQUIRE_ALL";

/// Whether `what` can run here, given its `probe`. Prints `SKIPPED: what: reason`
/// when it cannot, and panics instead when [`REQUIRE_ALL`] is set.
pub fn available<E: Display>(what: &str, probe: Result<(), E>) -> bool {
    match probe {
        Ok(()) => true,
        Err(reason) => {
            let message = format!("SKIPPED: {what}: {reason}");
            if std::env::var_os(REQUIRE_ALL).is_some_and(|v| v != "0") {
                panic!("{message} ({REQUIRE_ALL} is set: every feature must be present)");
            }
            eprintln!("{message}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_features_run_and_absent_ones_skip_or_fail() {
        assert!(available::<&str>("present", Ok(())));
        if std::env::var_os(REQUIRE_ALL).is_some_and(|v| v != "0") {
            let absent = std::panic::catch_unwind(|| available("absent", Err("not here")));
            assert!(absent.is_err(), "a missing feature fails when required");
        } else {
            assert!(!available("absent", Err("not here")));
        }
    }
}
