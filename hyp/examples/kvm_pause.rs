//! Measures the parts of a KVM micro-VM's pause by dirty tracking method: the touch
//! guest writes `PAGES` random pages of a `MEM` VM per round; each round is then
//! stopped, harvested and its state captured. Prints medians and maxima.
//!
//!     cargo run --release -p fgbi-hyp --example kvm_pause [mem_mib] [pages] [rounds]

use std::time::Duration;

use fgbi_hyp::kvm::guest::data_pages;
use fgbi_hyp::kvm::{DirtyTracking, KvmVm, Program, VmConfig, probe};
use fgbi_hyp::protected::Protected;
use fgbi_hyp::workload::Rng;

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn median_max(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    format!("{:>9.3?} {:>9.3?}", v[v.len() / 2], v[v.len() - 1])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem = arg(1, 1024) << 20;
    let pages = arg(2, 10_000);
    let rounds = arg(3, 20);
    println!(
        "{} MiB VM, {pages} random pages written per round, {rounds} rounds; median and max",
        mem >> 20
    );
    println!(
        "{:<8} {:>19} {:>19} {:>19}",
        "method", "stop", "harvest", "state"
    );
    for tracking in DirtyTracking::ALL {
        if let Err(e) = probe(tracking) {
            println!("{tracking:<8} skipped: {e}");
            continue;
        }
        let mut vm = KvmVm::new(VmConfig::new(Program::Touch, mem, tracking))?;
        let data = data_pages(mem);
        let mut rng = Rng::new(1);
        let (mut stop, mut harvest, mut state) = (Vec::new(), Vec::new(), Vec::new());
        let mut dirty = Vec::new();
        let mut blob = Vec::new();
        for round in 0..=rounds {
            vm.stop()?;
            let table: Vec<u32> = (0..pages).map(|_| rng.below(data) as u32).collect();
            let posted = vm.post_round(&table)?;
            dirty.clear();
            vm.harvest(&mut dirty)?;
            vm.resume()?;
            vm.wait_progress(posted, Duration::from_secs(30))?;
            vm.stop()?;
            dirty.clear();
            vm.harvest(&mut dirty)?;
            blob.clear();
            vm.capture_state(&mut blob)?;
            vm.resume()?;
            if round > 0 {
                let times = vm.pause_times();
                stop.push(times.stop);
                harvest.push(times.harvest);
                state.push(times.state);
            }
        }
        println!(
            "{tracking:<8} {} {} {}",
            median_max(stop),
            median_max(harvest),
            median_max(state)
        );
    }
    Ok(())
}
