//! This machine's memory copy bandwidth: the limit encode and apply are compared with.

use std::time::Instant;

use crate::percentiles::median;

/// Bytes copied per sample: larger than the last-level cache, like a big epoch.
pub const COPY_BYTES: usize = 64 << 20;

/// The median bandwidth of `samples` copies of [`COPY_BYTES`] from one buffer into
/// another (both written first, so no page is faulted in while timed), GB/s.
pub fn bandwidth_gbps(samples: usize) -> f64 {
    let source: Vec<u8> = (0..COPY_BYTES).map(|i| (i % 251) as u8).collect();
    let mut target = vec![1u8; COPY_BYTES];
    let mut rates: Vec<f64> = (0..samples.max(1))
        .map(|_| {
            let started = Instant::now();
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&mut target);
            COPY_BYTES as f64 / started.elapsed().as_secs_f64().max(1e-9) / 1e9
        })
        .collect();
    median(&mut rates).unwrap_or(0.0)
}
