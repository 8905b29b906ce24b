//! Builds the KVM guest programs in `guest/` into flat binaries with the host gcc:
//! freestanding 64-bit code linked at a fixed address by `guest/guest.ld`, then
//! `objcopy -O binary`. `src/kvm/guest.rs` embeds the results.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest programs, one `guest/<name>.c` each.
const PROGRAMS: [&str; 10] = [
    "counter", "web", "dense", "touch", "npb-ep", "sys", "dup", "ep", "pit", "kv",
];

/// Flags for code that runs with no library, no runtime and no kernel, at a fixed
/// address, as a user-mode program whose stack the VMM sets.
const CFLAGS: [&str; 17] = [
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-static",
    "-mno-red-zone",
    "-O2",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fno-builtin",
    // sqrt as the sqrtsd instruction (ep.h): no errno to set.
    "-fno-math-errno",
    "-Wall",
    "-Werror",
    "-Wl,--build-id=none",
];

fn main() {
    let dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("guest");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=guest");
    for name in PROGRAMS {
        let elf = out.join(format!("{name}.elf"));
        let bin = out.join(format!("{name}.bin"));
        run(
            Command::new("gcc")
                .args(CFLAGS)
                .arg("-T")
                .arg(dir.join("guest.ld"))
                .arg("-o")
                .arg(&elf)
                .arg(dir.join(format!("{name}.c"))),
            "gcc",
        );
        run(
            Command::new("objcopy")
                .args(["-O", "binary"])
                .arg(&elf)
                .arg(&bin),
            "objcopy",
        );
    }
}

/// Runs `command`, failing the build with a message that says what to install or fix.
fn run(command: &mut Command, tool: &str) {
    match command.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!(
            "building the KVM guest programs failed: `{command:?}` exited with {status}; fix the guest source in {}",
            Path::new("hyp/guest").display()
        ),
        Err(e) => panic!(
            "building the KVM guest programs needs `{tool}` on PATH ({e}): install it (Debian: apt-get install gcc binutils)"
        ),
    }
}
