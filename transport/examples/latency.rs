//! Prints the p50 and p99 epoch round trip (send, commit, acknowledgement) of each
//! implementation on loopback, for a 4 KiB, a 64 KiB and a 4 MiB epoch, then how each
//! compares with std round by round (the median difference within a round, and how
//! many rounds it was faster).
//!
//!     cargo run --release -p fgbi-transport --example latency [ROUND_TRIPS] [--pin]
//!
//! With `--pin`, the primary runs on CPU 0 and every backup thread on CPU 1, whatever
//! the implementation, so that the scheduler cannot place one
//! implementation's threads better than another's.

use std::time::Instant;

use fgbi_transport::Implementation;

#[path = "../benches/support/mod.rs"]
mod support;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let trips: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(2000);
    // CPUs 0 and 1: the machines this runs on have at least two.
    let backup_cpu = args.iter().any(|a| a == "--pin").then(|| {
        support::pin(0);
        1
    });
    let mut paired = Vec::new();
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
                    support::connect(imp, epoch.len(), backup_cpu),
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
        // Each round ran every implementation back to back: the difference within a
        // round is what the machine's changing load disturbs least.
        let std_samples = links
            .iter()
            .find(|(imp, ..)| *imp == Implementation::Std)
            .map(|(.., samples)| samples.clone());
        for (imp, _, samples) in &links {
            let Some(base) = std_samples.as_ref().filter(|_| *imp != Implementation::Std) else {
                continue;
            };
            let mut diffs: Vec<f64> = samples
                .iter()
                .zip(base)
                .map(|(a, b)| (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
                .collect();
            let faster = diffs.iter().filter(|d| **d < 0.0).count();
            diffs.sort_unstable_by(f64::total_cmp);
            paired.push(format!(
                "| {name} | {} | {:+.1} | {:.0}% |",
                imp.as_str(),
                diffs[diffs.len() / 2],
                100.0 * faster as f64 / diffs.len() as f64
            ));
        }
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
    println!();
    println!(
        "| epoch | implementation | median of (it - std) per round, us | rounds faster than std |"
    );
    println!("|---|---|---|---|");
    for line in paired {
        println!("{line}");
    }
}
