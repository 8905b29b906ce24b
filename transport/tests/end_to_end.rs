//! The real engine over each TCP implementation: a primary encodes a workload epoch
//! by epoch, the backup receives into its region, applies and acknowledges, and the
//! replica ends byte-identical to the primary's memory. The cases live in
//! `common/suite.rs`; `rdma.rs` runs the same ones over RDMA.

#[macro_use]
mod common;

use common::tcp_links;

cases!(tcp_links;
    the_replica_equals_the_primary_after_every_implementation_carries_the_web_workload,
    an_epoch_larger_than_a_slot_or_beyond_the_window_is_refused_before_sending,
    messages_that_arrive_together_or_in_odd_pieces_are_taken_in_order,
    a_primary_moved_to_another_thread_keeps_sending,
    a_scrub_names_exactly_the_chunks_that_differ,
);
