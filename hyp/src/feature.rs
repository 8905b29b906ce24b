//! Tests that need a host feature (userfaultfd, KVM, io_uring, a compiler, a tool).
//!
//! [`available`] is the one way a test decides to skip: where the feature is absent
//! it says so loudly on stderr and the test returns. Because a passing test's output
//! is hidden, a skip is easy to miss; with `FGBI_REQUIRE_ALL=1` in the environment a
//! missing feature fails the test instead. `.ci/run` sets it: the CI machine has every
//! feature, so nothing may skip there.
//!
//! A few features are absent from this machine kind by design (RDMA devices: the
//! kernel has no RDMA; those tests run in a Soft-RoCE guest). [`available_if_required`]
//! decides for them: their absence fails only where an environment variable such as
//! [`RDMA_REQUIRED`] says the feature must be present, and skips loudly elsewhere,
//! [`REQUIRE_ALL`] or not.

use std::fmt::Display;

/// Environment variable that turns skips into failures.
pub const REQUIRE_ALL: &str = "FGBI_REQUIRE_ALL";

/// Environment variable that makes RDMA devices a required feature (set where the
/// tests run with Soft-RoCE or real RDMA hardware).
pub const RDMA_REQUIRED: &str = "FGBI_RDMA_REQUIRED";

/// Whether `what` can run here, given its `probe`. Prints `SKIPPED: what: reason`
/// when it cannot, and panics instead when [`REQUIRE_ALL`] is set.
pub fn available<E: Display>(what: &str, probe: Result<(), E>) -> bool {
    decide(what, probe, REQUIRE_ALL, "every feature must be present")
}

/// Like [`available`], for a feature this machine kind lacks by design: its absence
/// panics only when the environment variable `required_by` is set (not to `0`), and
/// otherwise skips loudly even with [`REQUIRE_ALL`] set.
pub fn available_if_required<E: Display>(
    required_by: &str,
    what: &str,
    probe: Result<(), E>,
) -> bool {
    decide(what, probe, required_by, "this feature must be present")
}

fn decide<E: Display>(what: &str, probe: Result<(), E>, required_by: &str, why: &str) -> bool {
    match probe {
        Ok(()) => true,
        Err(reason) => {
            let message = format!("SKIPPED: {what}: {reason}");
            if std::env::var_os(required_by).is_some_and(|v| v != "0") {
                panic!("{message} ({required_by} is set: {why})");
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

    #[test]
    fn a_feature_required_by_its_own_switch_ignores_require_all() {
        const SWITCH: &str = "FGBI_TEST_FEATURE_SWITCH_NEVER_SET";
        assert!(available_if_required::<&str>(SWITCH, "present", Ok(())));
        assert!(!available_if_required(SWITCH, "absent", Err("not here")));
    }
}
