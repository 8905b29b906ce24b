//! io_uring against blocking std TCP on the same loopback, in the same run: the
//! round trip of a small epoch (send, commit, acknowledgement) and the throughput of
//! large epochs.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fgbi_transport::Implementation;

mod support;

fn bench(c: &mut Criterion) {
    for (name, pages) in [("64KiB", 16u64), ("4MiB", 1024)] {
        let mut group = c.benchmark_group(format!("epoch round trip {name}"));
        for imp in Implementation::ALL {
            if let Err(e) = imp.available() {
                eprintln!("SKIPPED: {}: {e}", imp.as_str());
                continue;
            }
            let mut epochs = support::Epochs::new(pages);
            let epoch = epochs
                .encoder
                .encode(&epochs.dirty, &epochs.memory, &[])
                .unwrap();
            let mut primary = support::connect(imp, epoch.len(), None);
            group.throughput(Throughput::Bytes(epoch.len() as u64));
            group.bench_function(imp.as_str(), |b| {
                b.iter(|| support::round_trip(&mut primary, &epoch))
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500));
    targets = bench
}
criterion_main!(benches);
