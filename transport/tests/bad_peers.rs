//! Peers that die, stall, flood or crash, over each TCP implementation: the backup
//! reports each as a typed error, its replica stays at its last committed epoch, and
//! a new connection resumes. The cases live in `common/suite.rs`; `rdma.rs` runs the
//! same ones over RDMA.

#[macro_use]
mod common;

use common::tcp_links;

cases!(tcp_links;
    a_primary_that_stops_mid_epoch_leaves_the_replica_committed_and_a_new_one_resumes,
    a_huge_declared_length_is_refused_before_any_payload_is_read,
    a_peer_flooding_heartbeats_is_refused,
    a_silent_primary_is_declared_dead_within_the_timeout,
    a_silent_backup_is_declared_dead_within_the_timeout,
    heartbeats_keep_an_idle_link_alive_past_the_timeout,
);
