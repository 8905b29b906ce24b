//! The guest side: the memory layout the VMM builds, the parameter page it shares
//! with the guest programs (mirrored by `guest/guest.h`), the programs themselves
//! (built from `guest/*.c` by `build.rs`), and the page tables, GDT and segment
//! registers that run them as 64-bit code at CPL3 (or CPL0).
//!
//! Guest-physical layout, identity-mapped with 2 MiB pages:
//!
//! | address | what |
//! |---|---|
//! | `0x1000` | GDT |
//! | `0x2000` | PML4, `0x3000` PDPT, `0x4000..0x8000` page directories (up to 3 GiB) |
//! | `0x8000` | parameters (VMM writes, guest reads) |
//! | `0x9000` | status (guest writes) |
//! | `0xa000` | TSS with an I/O bitmap allowing every port |
//! | `0x10000` | the program image (up to `0x80000`), entered at its first byte |
//! | `0x80000..0x100000` | the stacks, 64 KiB per vCPU, vCPU *i*'s growing down from `0x100000 - i * 0x10000` |
//! | `0x100000` | the touch program's page table (VMM writes), up to 256 Ki entries; or the key-value device's request slots, and from `0x140000` its reply slots |
//! | `0x200000` | the data area the programs write, to the end of memory |

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::workload::{PAGE, write_at};

/// Where KVM on Intel keeps its real-mode TSS (`KVM_SET_TSS_ADDR`), above guest memory.
pub const KVM_TSS: usize = 0xfffb_d000;
/// Guest-physical address of the GDT.
const GDT: u64 = 0x1000;
/// Guest-physical address of the 64-bit TSS.
const TSS: u64 = 0xa000;
/// The TSS's limit: 0x68 bytes of TSS, then an I/O permission bitmap of 8 KiB (all
/// zero: every port allowed at CPL3) and its terminating 0xff byte.
const TSS_LIMIT: u64 = 0x68 + 8192;
/// Guest-physical address of the PML4.
const PML4: u64 = 0x2000;
/// Guest-physical address of the PDPT.
const PDPT: u64 = 0x3000;
/// Guest-physical address of the first page directory.
const PD: u64 = 0x4000;
/// Guest-physical address of the parameter page.
pub const PARAMS: u64 = 0x8000;
/// Guest-physical address of the status page.
pub const STATUS: u64 = 0x9000;
/// Guest-physical address of the program image.
pub const IMAGE: u64 = 0x10000;
/// The largest program image.
const IMAGE_MAX: usize = 0x70000;
/// The top of vCPU 0's stack.
const STACK_TOP: u64 = 0x100000;
/// Each vCPU's stack, below the previous one's (`MAX_VCPUS` of them end at the image
/// area's end).
const STACK_BYTES: u64 = 0x10000;
/// The most vCPUs a VM has (guest.h `MAX_VCPUS`: the status page has a slot each).
pub const MAX_VCPUS: usize = 8;
/// Guest-physical address of the touch program's page table.
pub const TABLE: u64 = 0x100000;
/// Entries the touch table holds (u32 each).
pub const TABLE_MAX: usize = 0x100000 / 4;
/// Guest-physical address of the data area.
pub const DATA: u64 = 0x200000;
/// The smallest guest memory: the system area plus one 2 MiB page of data.
pub const MIN_MEM: usize = 4 << 20;
/// The largest guest memory: below the TSS area KVM is given at [`KVM_TSS`].
pub const MAX_MEM: usize = 3 << 30;

/// The console port: each `out8` is one byte of guest output.
pub const PORT_CONSOLE: u16 = 0x3f8;
/// The doorbell port: an `out32` of the low 32 bits of the guest's iteration count.
pub const PORT_DOORBELL: u16 = 0x510;
/// The fault port: an `out32` of a code when the guest finds its memory inconsistent.
pub const PORT_FAULT: u16 = 0x511;
/// The exit port: an `out32` of a code when the program has finished (0: success).
pub const PORT_EXIT: u16 = 0x512;
/// `PARAMS_MAGIC` of guest.h: the parameter page is filled.
const PARAMS_MAGIC: u64 = 0x6667626967756573;

/// Byte offsets of the fields of `struct params` (guest.h).
mod field {
    pub const MAGIC: u64 = 0;
    pub const DATA_BASE: u64 = 8;
    pub const DATA_PAGES: u64 = 16;
    pub const SEED: u64 = 24;
    pub const ARG0: u64 = 32;
    pub const ARG1: u64 = 40;
    pub const ROUND: u64 = 48;
    pub const TABLE: u64 = 56;
    pub const TABLE_LEN: u64 = 64;
    pub const VCPUS: u64 = 72;
}

/// A guest program, built from `hyp/guest/<name>.c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// A counter in a register and in memory, and a memory pattern the guest checks
    /// itself: any gap or bad byte after a restore makes it report a fault.
    /// `arg0`: ring the doorbell every `arg0` iterations.
    Counter,
    /// The `web` workload's behaviour: scattered small writes (`arg0` records of 64 to
    /// 256 bytes per iteration at random places). `arg1`: doorbell interval.
    Web,
    /// The `dense` workload's behaviour: every word of the first `arg0` data pages
    /// rewritten each iteration. `arg1`: doorbell interval.
    Dense,
    /// Writes exactly the data pages the VMM lists ([`crate::kvm::KvmVm::post_round`]),
    /// for checking dirty tracking against ground truth.
    Touch,
    /// The `npb-ep` workload's behaviour, by running the NPB EP kernel for ever: a
    /// 16-page batch buffer of fresh random numbers and a page of accumulators
    /// rewritten each iteration. `arg1`: doorbell interval.
    NpbEp,
    /// The `sys` workload's behaviour: pointer-sized updates across a slab, pages
    /// zeroed from a pool, pages copied from a cache. `arg1`: doorbell interval.
    Sys,
    /// The `dup` workload's behaviour: fresh source pages copied whole and in
    /// 64-256 byte pieces into many others. `arg1`: doorbell interval.
    Dup,
    /// The NPB EP kernel, class S, verified against the specification's sums; its
    /// 256 batches are dealt round-robin to the vCPUs, each vCPU's doorbell counting
    /// its own; vCPU 0 adds up every vCPU's sums, prints the result
    /// ([`super::ep::EpResult`]) and finishes. Needs [`Program::min_data_pages`]
    /// (1 MiB and a page) per vCPU.
    Ep,
    /// Programs the in-kernel PICs and PIT through their ports, counts PIT periods
    /// by polling its counter, and faults if the devices lose their programming
    /// (a restore without their state). Needs the irqchip; one vCPU.
    Pit,
    /// A key-value store in guest memory served through the key-value device
    /// ([`super::kv`]); [`super::kv_server`] exposes it over TCP in the Redis
    /// protocol. One vCPU.
    Kv,
}

impl Program {
    /// The most vCPUs the program uses: each vCPU of the others works in its own
    /// share of the data area. `touch` writes the rounds the VMM posts to one
    /// table, `pit` programs the one PIC/PIT pair, and `kv`'s store has one
    /// request ring and no locks: one vCPU each.
    pub fn max_vcpus(self) -> usize {
        match self {
            Program::Touch | Program::Pit | Program::Kv => 1,
            _ => MAX_VCPUS,
        }
    }

    /// The data pages each vCPU's share must hold: `ep` keeps a batch of 2^17
    /// deviates (1 MiB) and its published sums there.
    pub fn min_data_pages(self) -> u64 {
        match self {
            Program::Ep => 257,
            _ => 1,
        }
    }
}

impl Program {
    /// Every program.
    pub const ALL: [Program; 10] = [
        Program::Counter,
        Program::Web,
        Program::Dense,
        Program::Touch,
        Program::NpbEp,
        Program::Sys,
        Program::Dup,
        Program::Ep,
        Program::Pit,
        Program::Kv,
    ];

    /// The program's name (its source file's).
    pub fn name(self) -> &'static str {
        match self {
            Program::Counter => "counter",
            Program::Web => "web",
            Program::Dense => "dense",
            Program::Touch => "touch",
            Program::NpbEp => "npb-ep",
            Program::Sys => "sys",
            Program::Dup => "dup",
            Program::Ep => "ep",
            Program::Pit => "pit",
            Program::Kv => "kv",
        }
    }

    /// One line on what the program does.
    pub fn summary(self) -> &'static str {
        match self {
            Program::Counter => {
                "a counter and a memory pattern the guest checks itself (faults on any gap)"
            }
            Program::Web => "scattered small writes, like a web server (the web workload)",
            Program::Dense => "every word of a hot set rewritten (the dense workload)",
            Program::Touch => {
                "writes exactly the pages the VMM lists (dirty tracking ground truth)"
            }
            Program::NpbEp => {
                "the NPB EP kernel for ever: a batch buffer and accumulators (the npb-ep workload)"
            }
            Program::Sys => {
                "slab updates, pool pages zeroed, cache pages copied (the sys workload)"
            }
            Program::Dup => "fresh pages copied whole and in pieces (the dup workload)",
            Program::Ep => {
                "the NPB EP kernel, class S, verified against the specification; finishes"
            }
            Program::Pit => {
                "programs the in-kernel PICs and PIT, counts PIT periods, checks they keep it"
            }
            Program::Kv => "a key-value store in guest memory, served in the Redis protocol",
        }
    }

    /// The flat binary, loaded at [`IMAGE`].
    pub fn image(self) -> &'static [u8] {
        match self {
            Program::Counter => include_bytes!(concat!(env!("OUT_DIR"), "/counter.bin")),
            Program::Web => include_bytes!(concat!(env!("OUT_DIR"), "/web.bin")),
            Program::Dense => include_bytes!(concat!(env!("OUT_DIR"), "/dense.bin")),
            Program::Touch => include_bytes!(concat!(env!("OUT_DIR"), "/touch.bin")),
            Program::NpbEp => include_bytes!(concat!(env!("OUT_DIR"), "/npb-ep.bin")),
            Program::Sys => include_bytes!(concat!(env!("OUT_DIR"), "/sys.bin")),
            Program::Dup => include_bytes!(concat!(env!("OUT_DIR"), "/dup.bin")),
            Program::Ep => include_bytes!(concat!(env!("OUT_DIR"), "/ep.bin")),
            Program::Pit => include_bytes!(concat!(env!("OUT_DIR"), "/pit.bin")),
            Program::Kv => include_bytes!(concat!(env!("OUT_DIR"), "/kv.bin")),
        }
    }
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Program {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
                format!("unknown guest {s:?}: use one of {}", names.join(", "))
            })
    }
}

/// A guest program's parameters (see each [`Program`] for what `arg0`/`arg1` mean).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestArgs {
    /// Seed of the guest's random choices.
    pub seed: u64,
    /// First program-specific argument.
    pub arg0: u64,
    /// Second program-specific argument.
    pub arg1: u64,
}

/// The privilege level guest code runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// CPL3, 64-bit user mode: native speed on every host, including PVM hosts
    /// without hardware virtualization.
    User,
    /// CPL0, 64-bit kernel mode: native on hosts with VT-x/AMD-V; **emulated** on
    /// PVM hosts (about 0.35 M stores/s instead of about 930 M).
    Kernel,
}

impl Privilege {
    /// The code and data selectors (RPL included) of this level in the GDT built here.
    fn selectors(self) -> (u16, u16) {
        match self {
            Privilege::User => (0x2b, 0x23),
            Privilege::Kernel => (0x08, 0x10),
        }
    }

    /// The descriptor privilege level.
    fn dpl(self) -> u8 {
        match self {
            Privilege::User => 3,
            Privilege::Kernel => 0,
        }
    }
}

/// The bytes that must fit guest memory, or why not.
pub fn check_size(mem_bytes: usize) -> Result<(), String> {
    if !(MIN_MEM..=MAX_MEM).contains(&mem_bytes) || mem_bytes % (2 << 20) != 0 {
        return Err(format!(
            "guest memory of {mem_bytes} bytes: use a multiple of 2 MiB from {} MiB to {} GiB",
            MIN_MEM >> 20,
            MAX_MEM >> 30
        ));
    }
    Ok(())
}

/// Writes the GDT, TSS, page tables, parameter page and program image into fresh
/// (zeroed) guest memory for `vcpus` vCPUs, recording the pages written in `written`.
pub fn write_boot(
    memory: &mut [u8],
    program: Program,
    args: GuestArgs,
    vcpus: usize,
    written: &mut Vec<u64>,
) -> Result<(), String> {
    check_size(memory.len())?;
    if !(1..=program.max_vcpus()).contains(&vcpus) {
        return Err(format!(
            "{vcpus} vCPUs for the {} guest: use 1 to {}",
            program.name(),
            program.max_vcpus()
        ));
    }
    let share = data_pages(memory.len()) / vcpus as u64;
    if share < program.min_data_pages() {
        return Err(format!(
            "the {} guest needs {} data pages per vCPU; {vcpus} vCPU(s) in {} MiB get {share}: \
             give it more memory or fewer vCPUs",
            program.name(),
            program.min_data_pages(),
            memory.len() >> 20
        ));
    }
    let image = program.image();
    if image.len() > IMAGE_MAX {
        return Err(format!(
            "guest program {} is {} bytes, more than the {IMAGE_MAX}-byte image area: shrink it",
            program.name(),
            image.len()
        ));
    }
    // Accessed bits are preset so the CPU never writes them back. Dirty bits are
    // not: with shadow paging (PVM) KVM maps every page under a dirty PDE writable
    // on first access and logs it as dirty, even when the guest only reads it. The
    // CPU sets a PDE's dirty bit on the first write into its 2 MiB, a write to the
    // page directory that the next harvest reports once.
    let gdt: [u64; 8] = [
        0,
        0x00af9b000000ffff, // 0x08: 64-bit code, DPL 0
        0x00cf93000000ffff, // 0x10: data, DPL 0
        0,
        0x00cff3000000ffff, // 0x23: data, DPL 3
        0x00affb000000ffff, // 0x2b: 64-bit code, DPL 3
        tss_low(),          // 0x30: 64-bit TSS (two slots)
        TSS >> 32,
    ];
    write_at(memory, GDT as usize, &words(&gdt), written);
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    write_at(memory, TSS as usize, &tss, written);

    const PRESENT_RW_USER_ACCESSED: u64 = 0x27;
    const HUGE: u64 = 0x80;
    let gigs = memory.len().div_ceil(1 << 30) as u64;
    write_at(
        memory,
        PML4 as usize,
        &(PDPT | PRESENT_RW_USER_ACCESSED).to_le_bytes(),
        written,
    );
    let pdpt: Vec<u64> = (0..gigs)
        .map(|g| (PD + g * 4096) | PRESENT_RW_USER_ACCESSED)
        .collect();
    write_at(memory, PDPT as usize, &words(&pdpt), written);
    let pd: Vec<u64> = (0..(memory.len() >> 21) as u64)
        .map(|i| (i << 21) | PRESENT_RW_USER_ACCESSED | HUGE)
        .collect();
    write_at(memory, PD as usize, &words(&pd), written);

    write_at(memory, IMAGE as usize, image, written);
    let params = [
        (field::DATA_BASE, DATA),
        (field::DATA_PAGES, data_pages(memory.len())),
        (field::SEED, args.seed),
        (field::ARG0, args.arg0),
        (field::ARG1, args.arg1),
        (field::TABLE, TABLE),
        (field::VCPUS, vcpus as u64),
        (field::MAGIC, PARAMS_MAGIC),
    ];
    for (offset, value) in params {
        write_u64(memory, PARAMS + offset, value, written);
    }
    Ok(())
}

/// Writes the touch program's next round: the table of data pages to write, then
/// the round number that sets the guest going. Returns the pages written.
pub fn write_round(
    memory: &mut [u8],
    round: u64,
    pages: &[u32],
    written: &mut Vec<u64>,
) -> Result<(), String> {
    let data = data_pages(memory.len());
    if pages.len() > TABLE_MAX {
        return Err(format!(
            "{} pages in one round: at most {TABLE_MAX}",
            pages.len()
        ));
    }
    if let Some(bad) = pages.iter().find(|&&p| u64::from(p) >= data) {
        return Err(format!("data page {bad} is beyond the {data} data pages"));
    }
    let table: Vec<u8> = pages.iter().flat_map(|p| p.to_le_bytes()).collect();
    write_at(memory, TABLE as usize, &table, written);
    write_u64(
        memory,
        PARAMS + field::TABLE_LEN,
        pages.len() as u64,
        written,
    );
    write_u64(memory, PARAMS + field::ROUND, round, written);
    Ok(())
}

/// The number of 4 KiB pages in the data area of `mem_bytes` of guest memory.
pub fn data_pages(mem_bytes: usize) -> u64 {
    (mem_bytes as u64).saturating_sub(DATA) / PAGE as u64
}

/// The little-endian u64 at guest-physical `gpa`.
pub fn read_u64(memory: &[u8], gpa: u64) -> u64 {
    let at = gpa as usize;
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&memory[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Sets the special registers for long mode with paging at `privilege`.
pub fn set_long_mode(sregs: &mut kvm_sregs, privilege: Privilege) {
    let (code_selector, data_selector) = privilege.selectors();
    let dpl = privilege.dpl();
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: code_selector,
        type_: 11,
        present: 1,
        dpl,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: data_selector,
        type_: 3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT as u32,
        selector: 0x30,
        type_: 11,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 8 * 8 - 1;
    sregs.cr3 = PML4;
    sregs.cr4 = 0x620; // PAE, OSFXSR, OSXMMEXCPT
    sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
    sregs.efer = 0x501; // LMA, LME, SCE
}

/// RFLAGS of a fresh guest: interrupts off, IOPL 0 (PVM clears IOPL anyway; CPL3
/// code reaches the device ports through the TSS's I/O bitmap).
const RFLAGS: u64 = 0x2;

/// The registers of vCPU `cpu` of a fresh guest: the entry point, its own stack (as
/// if `_start` had been called from its top) and its index in RDI, `_start`'s
/// argument.
pub fn entry(cpu: usize) -> kvm_regs {
    kvm_regs {
        rip: IMAGE,
        rsp: STACK_TOP - cpu as u64 * STACK_BYTES - 8,
        rflags: RFLAGS,
        rdi: cpu as u64,
        ..Default::default()
    }
}

/// The low half of the TSS descriptor: base, limit 0x67, type 11 (busy 64-bit TSS),
/// present.
const fn tss_low() -> u64 {
    (TSS_LIMIT & 0xffff) | ((TSS & 0xff_ffff) << 16) | (0x8b << 40) | (((TSS >> 24) & 0xff) << 56)
}

fn words(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_u64(memory: &mut [u8], gpa: u64, value: u64, written: &mut Vec<u64>) {
    write_at(memory, gpa as usize, &value.to_le_bytes(), written);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_writes_tables_params_and_image_and_reports_their_pages() {
        let mut memory = vec![0u8; 8 << 20];
        let mut written = Vec::new();
        let args = GuestArgs {
            seed: 5,
            arg0: 7,
            arg1: 9,
        };
        write_boot(&mut memory, Program::Counter, args, 1, &mut written).unwrap();
        assert_eq!(read_u64(&memory, PARAMS + field::VCPUS), 1);
        assert_eq!(read_u64(&memory, PARAMS), PARAMS_MAGIC);
        assert_eq!(
            read_u64(&memory, PARAMS + field::DATA_PAGES),
            (6 << 20) / 4096
        );
        assert_eq!(read_u64(&memory, PARAMS + field::ARG0), 7);
        // Four 2 MiB pages mapped, user-accessible and accessed.
        assert_eq!(read_u64(&memory, PD + 3 * 8), (3 << 21) | 0xa7);
        assert_eq!(read_u64(&memory, PD + 4 * 8), 0);
        let image = Program::Counter.image();
        assert_eq!(&memory[IMAGE as usize..][..image.len()], image);
        written.sort_unstable();
        written.dedup();
        let nonzero: Vec<u64> = (0..memory.len() / PAGE)
            .filter(|&p| memory[p * PAGE..][..PAGE].iter().any(|&b| b != 0))
            .map(|p| p as u64)
            .collect();
        assert!(nonzero.iter().all(|p| written.binary_search(p).is_ok()));
    }

    #[test]
    fn sizes_and_rounds_outside_the_layout_are_refused() {
        assert!(check_size(2 << 20).is_err());
        assert!(check_size((4 << 20) + 4096).is_err());
        assert!(check_size(8 << 30).is_err());
        assert!(check_size(64 << 20).is_ok());
        let mut fresh = vec![0u8; 4 << 20];
        let args = GuestArgs::default();
        // 512 data pages: one ep vCPU fits, two do not; three fit in 8 MiB.
        let ep = |memory: &mut [u8], vcpus| {
            write_boot(memory, Program::Ep, args, vcpus, &mut Vec::new())
        };
        assert!(ep(&mut fresh, 1).is_ok());
        fresh.fill(0);
        assert!(
            ep(&mut fresh, 2)
                .unwrap_err()
                .contains("257 data pages per vCPU")
        );
        assert!(ep(&mut vec![0u8; 8 << 20], 3).is_ok());
        assert!(write_boot(&mut fresh, Program::Kv, args, 2, &mut Vec::new()).is_err());
        assert!(
            write_boot(
                &mut fresh,
                Program::Web,
                args,
                MAX_VCPUS + 1,
                &mut Vec::new()
            )
            .is_err()
        );
        assert!(write_boot(&mut fresh, Program::Web, args, 0, &mut Vec::new()).is_err());
        // The last vCPU's stack ends where the image area does.
        assert_eq!(
            entry(MAX_VCPUS - 1).rsp + 8 - STACK_BYTES,
            IMAGE + IMAGE_MAX as u64
        );
        let mut memory = vec![0u8; 4 << 20];
        let mut written = Vec::new();
        assert!(write_round(&mut memory, 1, &[512], &mut written).is_err());
        write_round(&mut memory, 1, &[0, 511], &mut written).unwrap();
        assert_eq!(read_u64(&memory, PARAMS + field::ROUND), 1);
        assert_eq!(&memory[TABLE as usize + 4..][..4], &511u32.to_le_bytes());
    }

    #[test]
    fn every_program_is_built_and_fits() {
        for program in Program::ALL {
            let image = program.image();
            assert!(
                !image.is_empty() && image.len() <= IMAGE_MAX,
                "{}",
                program.name()
            );
            assert_eq!(program.name().parse::<Program>(), Ok(program));
        }
        let err = "linux".parse::<Program>().unwrap_err();
        assert!(err.contains("npb-ep"), "{err}");
    }
}
