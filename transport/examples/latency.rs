//! Prints the p50 and p99 epoch round trip (send, commit, acknowledgement) of each
//! implementation on loopback, for a 4 KiB, a 64 KiB and a 4 MiB epoch.
//!
//!     cargo run --release -p fgbi-transport --example latency [ROUND_TRIPS]

use std::time::Instant;

use fgbi_transport::Implementation;

#[path = "../benches/support/mod.rs"]
mod support;

fn main() {
    let trips: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    println!("| epoch | implementation | p50 us | p99 us | GB/s at p50 |");
    println!("|---|---|---|---|---|");
    for (name, pages) in [("4 KiB", 1u64), ("64 KiB", 16), ("4 MiB", 1024)] {
        let mut epochs = support::Epochs::new(pages);
        let epoch = epochs
            .encoder
            .encode(&epochs.dirty, &epochs.memory, &[])
            .unwrap();
        // Interleave the implementations, alternating which goes first, so that both
        // see the same machine state.
        let mut links: Vec<_> = Implementation::ALL
            .into_iter()
            .filter(|imp| match imp.available() {
                Ok(()) => true,
                Err(e) => {
                    eprintln!("SKIPPED: {}: {e}", imp.as_str());
                    false
                }
            })
            .map(|imp| {
                (
                    imp,
                    support::connect(imp, epoch.len()),
                    Vec::with_capacity(trips),
                )
            })
            .collect();
        for round in 0..trips + trips / 10 {
            links.rotate_left(1);
            for (_, primary, samples) in &mut links {
                let start = Instant::now();
                support::round_trip(primary, &epoch);
                // The first tenth warms up.
                if round >= trips / 10 {
                    samples.push(start.elapsed());
                }
            }
        }
        links.sort_by_key(|(imp, ..)| imp.as_str());
        for (imp, _, samples) in &mut links {
            samples.sort_unstable();
            let p50 = samples[samples.len() / 2];
            let p99 = samples[samples.len() * 99 / 100];
            println!(
                "| {name} ({} B) | {} | {:.1} | {:.1} | {:.2} |",
                epoch.len(),
                imp.as_str(),
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6,
                epoch.len() as f64 / p50.as_secs_f64() / 1e9
            );
        }
    }
}
