#!/usr/bin/env bash
# Runs the project's RDMA tests on real verbs: Soft-RoCE (rdma_rxe) inside a QEMU
# guest booted (TCG) from Debian's own kernel, because this machine kind's kernel has
# no RDMA. Run as root on Debian 12:
#
#     tests/rdma/soft-roce.sh [--release]
#
# Builds the RDMA test binary, `fgbi` and its demo tests on the host, boots the guest with two rxe
# devices on a veth pair, runs tests/rdma/guest.sh there, and exits 0 only if every
# test in the guest passed. Downloads and the base initramfs are cached under
# target/soft-roce/ (docs/rdma.md).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tests/rdma/soft-roce.sh [--release]

  --release   build the test binary and fgbi with the release profile (default: debug)

Environment:
  FGBI_ROCE_CACHE      cache directory (default: target/soft-roce in the repository)
  FGBI_ROCE_TIMEOUT    seconds the whole guest run may take (default: 1500)
EOF
}

profile=()
for arg in "$@"; do
    case "$arg" in
        --release) profile=(--release) ;;
        -h | --help) usage; exit 0 ;;
        *) echo "soft-roce: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
here="$repo/tests/rdma"
cache=${FGBI_ROCE_CACHE:-$repo/target/soft-roce}
guest_timeout=${FGBI_ROCE_TIMEOUT:-1500}
debs="$cache/debs"
base="$cache/base"
run="$cache/run"
results="$cache/results.txt"
multiarch=usr/lib/x86_64-linux-gnu
started=$SECONDS

# Modules the guest loads (with everything they depend on): the netdev pair, Soft-RoCE,
# and the RDMA connection manager for programs that connect through librdmacm.
# rxe computes its ICRC with the kernel's "crc32" hash, which the kernel would ask
# modprobe for; the guest has no modprobe, so it is loaded up front.
guest_modules=(veth crc32_generic rdma_rxe rdma_ucm)
# The guest's kernel comes from bookworm-backports: the project's dirty tracking needs
# PAGEMAP_SCAN (Linux 6.7), which bookworm's 6.1 lacks. apt reads that suite from a
# sources list of the cache's own, so the host's apt configuration is left alone.
kernel_suite="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"
# Packages unpacked for the guest; their libraries not installed on the host are
# added by following their dependencies.
guest_packages=(busybox-static rdma-core ibverbs-providers libibverbs1 librdmacm1 iproute2
    ibverbs-utils perftest)
# Programs copied into the guest (path inside the unpacked packages = path in the guest).
guest_programs=(usr/bin/rdma usr/bin/ibv_devinfo usr/bin/ibv_rc_pingpong usr/bin/ib_write_bw)

die() {
    echo "soft-roce: FAILED: $*" >&2
    exit 1
}
step() { echo "=== soft-roce: $* (+$((SECONDS - started)) s)"; }

[ "$(id -u)" -eq 0 ] || die "run as root: it installs packages with apt-get and builds device nodes"
[ "$(uname -m)" = x86_64 ] || die "x86-64 only (the guest is Debian's amd64 kernel)"

apt_updated=0
# `apt-get update`, once per run, before the first install or download.
apt_update() {
    [ "$apt_updated" -eq 0 ] || return 0
    timeout 300 apt-get update -qq || die "apt-get update failed (timed out after 300 s?)"
    apt_updated=1
}

# Host tools: qemu-system-x86_64 boots the guest, cpio packs its initramfs, zstd
# unpacks the kernel.
host_tools() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v zstd >/dev/null || missing+=(zstd)
    [ ${#missing[@]} -eq 0 ] && return 0
    step "installing ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

# --- the project's binaries (built before booting: the guest's vCPUs need the cores) ---

# Prints the executable of the artifact named $1 of kind $2 in cargo's JSON messages.
artifact() {
    grep '"reason":"compiler-artifact"' |
        grep "\"kind\":\[\"$2\"\][^}]*\"name\":\"$1\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

rdma_tests=""
fgbi_bin=""
failover_tests=""
kill_tests=""
fence_tests=""
# Builds the artifact named $2 of kind $3 (test or bin) with `cargo $1` and the rest
# of the arguments; prints its executable.
build() {
    local verb=$1 name=$2 kind=$3 json="$run/cargo.json" exe
    shift 3
    (cd "$repo" && cargo "$verb" "${profile[@]}" "$@" \
        --message-format=json-render-diagnostics >"$json") || die "cargo could not build $name (errors above)"
    exe=$(artifact "$name" "$kind" <"$json")
    [ -x "$exe" ] || die "cargo built $name but named no executable (see $json)"
    echo "$exe"
}
build_project() {
    step "building the RDMA test binary and fgbi (${profile[*]:-debug})"
    # The transport's RDMA suite (transport/tests/rdma.rs).
    rdma_tests=$(build test rdma test -p fgbi-transport --test rdma --no-run)
    fgbi_bin=$(build build fgbi bin -p fgbi-tools --bin fgbi)
    # The failure tests of `fgbi demo` (tools/tests/demo.rs), run over RDMA in the guest.
    failover_tests=$(build test demo test -p fgbi-tools --test demo --no-run)
    # `fgbi primary` killed mid-transfer and during initial sync (tools/tests/kill.rs).
    kill_tests=$(build test kill test -p fgbi-tools --test kill --no-run)
    # A partition between them, fenced (tools/tests/fence.rs).
    fence_tests=$(build test fence test -p fgbi-tools --test fence --no-run)
}

# --- the base initramfs: kernel modules, busybox, verbs libraries and tools ---

# apt's options for the kernel's suite ($kernel_suite): its own sources list, package
# lists and cache under $cache/apt.
kernel_apt=(-o "Dir::Etc::SourceList=$cache/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt/cache")
kernel_apt_updated=0
# `apt-get update` of the kernel's suite, once per run.
kernel_apt_update() {
    [ "$kernel_apt_updated" -eq 0 ] || return 0
    mkdir -p "$cache/apt/lists/partial" "$cache/apt/cache/archives/partial"
    echo "$kernel_suite" >"$cache/apt/sources.list"
    timeout 300 apt-get "${kernel_apt[@]}" update -qq || die "apt-get update of '$kernel_suite' failed"
    kernel_apt_updated=1
}

# Downloads (into $debs) every package in $@ not downloaded yet; with --kernel first,
# from the kernel's suite.
download() {
    local options=() update=apt_update
    if [ "$1" = --kernel ]; then
        options=("${kernel_apt[@]}")
        update=kernel_apt_update
        shift
    fi
    local missing=() p
    for p in "$@"; do
        compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    $update
    echo "downloading ${missing[*]}"
    (cd "$debs" && timeout 600 apt-get "${options[@]}" download -q -o APT::Sandbox::User=root "${missing[@]}") ||
        die "apt-get download ${missing[*]} failed"
}

# Prints the library packages $@ depend on, directly, that are not installed here.
missing_lib_deps() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
        --no-enhances "$@" | awk '$1 ~ /Depends:$/ && $2 ~ /^lib/ {print $2}' | sort -u |
        while read -r p; do
            dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' ||
                echo "$p"
        done
}

# The guest's packages and the library packages they need that the host lacks.
resolve_packages() {
    kernel_apt_update
    kernel_pkg=$(apt-cache "${kernel_apt[@]}" depends linux-image-amd64 | awk '$2 ~ /^linux-image-/ {print $2; exit}')
    [ -n "$kernel_pkg" ] || die "apt-cache names no kernel for linux-image-amd64 in '$kernel_suite'"
    apt-cache show busybox-static >/dev/null 2>&1 || apt_update
    packages=("${guest_packages[@]}")
    command -v depmod >/dev/null || packages+=(kmod)
    local new=("${packages[@]}") more p
    while [ ${#new[@]} -gt 0 ]; do
        more=()
        for p in $(missing_lib_deps "${new[@]}"); do
            [[ " ${packages[*]} " == *" $p "* ]] || more+=("$p")
        done
        packages+=("${more[@]}")
        new=("${more[@]}")
    done
}

# Copies the program or library $1 (a host path) to $2 (a path in the guest) under the
# staging root $3, with every library ldd lists that $3 does not hold yet. Libraries are
# looked up in the unpacked packages $unpacked first, then on the host.
copy_with_libs() {
    local src=$1 dest=$2 stage=$3 line lib soname
    mkdir -p "$stage/$(dirname "$dest")"
    cp -L "$src" "$stage/$dest"
    local libpath="$unpacked/$multiarch:$unpacked/lib/x86_64-linux-gnu:$base/root/$multiarch"
    local listing
    listing=$(LD_LIBRARY_PATH=$libpath ldd "$src") || die "ldd $src failed: $listing"
    while read -r line; do
        case "$line" in
            *"=> not found"*) die "$src needs ${line%% *}, found neither in the guest's packages nor on the host" ;;
            *"=> /"*)
                soname=${line%% *}
                lib=${line#*=> }
                lib=${lib%% (*}
                ;;
            /*ld-linux*)
                lib=${line%% (*}
                soname=""
                ;;
            *) continue ;;
        esac
        if [ -z "$soname" ]; then
            mkdir -p "$stage/lib64"
            [ -e "$stage/lib64/$(basename "$lib")" ] || cp -L "$lib" "$stage/lib64/"
        elif [ ! -e "$base/root/$multiarch/$soname" ] && [ ! -e "$stage/$multiarch/$soname" ]; then
            mkdir -p "$stage/$multiarch"
            cp -L "$lib" "$stage/$multiarch/$soname"
        fi
    done <<<"$listing"
}

# Packs the directory $1 as an uncompressed newc cpio archive into $2.
pack() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) >"$2"
}

# Extracts the uncompressed ELF vmlinux from the bzImage $1 (xz- or zstd-compressed)
# into $2 (it boots through its PVH entry in about half the time); falls back to the
# bzImage itself.
extract_vmlinux() {
    local offset format magic decompress
    for format in xz zstd; do
        case "$format" in
            xz) magic='\xfd7zXZ\x00' decompress=(xz -dc --single-stream) ;;
            zstd) magic='\x28\xb5\x2f\xfd' decompress=(zstd -dcq) ;;
        esac
        command -v "${decompress[0]}" >/dev/null || continue
        # (Without pipefail: head and the decompressor stop reading early, on purpose;
        # zstd complains about what follows its frame, so the ELF header is the test.)
        offset=$(set +o pipefail; LC_ALL=C grep -obUaP "$magic" "$1" | head -n 1 | cut -d: -f1)
        [ -n "$offset" ] || continue
        (set +o pipefail; tail -c +$((offset + 1)) "$1" | "${decompress[@]}") >"$2" 2>/dev/null || true
        [ "$(head -c 4 "$2" | od -An -c | tr -d ' ')" = '177ELF' ] && return 0
    done
    echo "soft-roce: no xz- or zstd-compressed ELF kernel in $1, booting the bzImage" >&2
    cp "$1" "$2"
}

build_base() {
    local stamp
    stamp=$(sha256sum "$here/soft-roce.sh" | cut -d' ' -f1)
    if [ -f "$base/initrd.cpio" ] && [ -f "$base/vmlinux" ] && [ "$(cat "$base/stamp" 2>/dev/null)" = "$stamp" ]; then
        step "base initramfs cached ($base)"
        return 0
    fi
    step "building the base initramfs"
    mkdir -p "$debs"
    resolve_packages
    download --kernel "$kernel_pkg"
    download "${packages[@]}"
    rm -rf "$base" "$cache/unpacked"
    unpacked="$cache/unpacked"
    mkdir -p "$base/root" "$unpacked"
    local p deb
    for p in "$kernel_pkg" "${packages[@]}"; do
        deb=$(compgen -G "$debs/${p}_*.deb" | tail -n 1)
        dpkg -x "$deb" "$unpacked"
    done
    local kver
    kver=$(find "$unpacked/lib/modules" -mindepth 1 -maxdepth 1 -printf "%f\n" 2>/dev/null | head -n 1 || true)
    [ -f "$unpacked/boot/vmlinuz-$kver" ] || die "$kernel_pkg holds no kernel and modules"

    # The package ships no modules.dep: depmod (the host's, or the downloaded kmod's).
    local depmod
    depmod=$(command -v depmod || true)
    if [ -z "$depmod" ]; then
        depmod="$unpacked/depmod"
        ln -sf "$unpacked/bin/kmod" "$depmod"
    fi
    LD_LIBRARY_PATH="$unpacked/$multiarch:$unpacked/lib/x86_64-linux-gnu" "$depmod" -b "$unpacked" "$kver" ||
        die "depmod failed for $kver"

    # Modules in load order: each one's dependencies (modules.dep lists them so that the
    # last is loaded first), then itself. Compressed ones (.ko.xz) are stored
    # decompressed: busybox's insmod hands the kernel the file as it is.
    local root="$base/root" order=() m line deps i path ko
    mkdir -p "$root/etc/fgbi"
    for m in "${guest_modules[@]}"; do
        line=$(grep -E "(^|/)$m\.ko(\.xz)?:" "$unpacked/lib/modules/$kver/modules.dep") || die "no module $m in $kver"
        read -r -a deps <<<"${line#*:}"
        for ((i = ${#deps[@]} - 1; i >= -1; i--)); do
            if [ "$i" -ge 0 ]; then path=${deps[i]}; else path=${line%%:*}; fi
            ko=${path%.xz}
            [[ " ${order[*]} " == *" $ko "* ]] && continue
            order+=("$ko")
            mkdir -p "$root/lib/modules/$(dirname "$ko")"
            case "$path" in
                *.xz) xz -dc "$unpacked/lib/modules/$kver/$path" >"$root/lib/modules/$ko" || die "cannot decompress $path" ;;
                *) cp "$unpacked/lib/modules/$kver/$path" "$root/lib/modules/$ko" ;;
            esac
        done
    done
    printf '%s\n' "${order[@]}" >"$root/etc/fgbi/modules"

    mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/etc/libibverbs.d" \
        "$root/$multiarch/libibverbs"
    mknod -m 600 "$root/dev/console" c 5 1
    cp "$unpacked/bin/busybox" "$root/bin/busybox"
    copy_with_libs "$unpacked/bin/ip" usr/sbin/ip "$root"
    for p in "${guest_programs[@]}"; do
        copy_with_libs "$unpacked/$p" "$p" "$root"
    done
    # Loaded at run time, so ldd does not list them: librdmacm for programs that connect
    # through it, the rxe provider and the file that names it.
    copy_with_libs "$unpacked/$multiarch/librdmacm.so.1" "$multiarch/librdmacm.so.1" "$root"
    copy_with_libs "$unpacked/$multiarch/libibverbs/librxe-rdmav34.so" \
        "$multiarch/libibverbs/librxe-rdmav34.so" "$root"
    cp "$unpacked/etc/libibverbs.d/rxe.driver" "$root/etc/libibverbs.d/"

    extract_vmlinux "$unpacked/boot/vmlinuz-$kver" "$base/vmlinux"
    pack "$root" "$base/initrd.cpio"
    echo "$stamp" >"$base/stamp"
    rm -rf "$unpacked"
    echo "base: kernel $kver, initramfs $(($(stat -c %s "$base/initrd.cpio") / 1024 / 1024)) MiB"
}

# --- this run's archive: /init, the test list, the project's binaries ---

build_overlay() {
    local stage="$run/overlay"
    rm -rf "$stage"
    mkdir -p "$stage/bin" "$stage/etc/fgbi"
    install -m 755 "$here/init.sh" "$stage/init"
    install -m 755 "$here/guest.sh" "$stage/etc/fgbi/guest.sh"
    unpacked="$base/root"
    copy_with_libs "$rdma_tests" bin/rdma-tests "$stage"
    copy_with_libs "$fgbi_bin" bin/fgbi "$stage"
    copy_with_libs "$failover_tests" bin/failover-tests "$stage"
    copy_with_libs "$kill_tests" bin/kill-tests "$stage"
    copy_with_libs "$fence_tests" bin/fence-tests "$stage"
    # The demo tests run fgbi from where cargo built it.
    mkdir -p "$stage$(dirname "$fgbi_bin")"
    ln -s /bin/fgbi "$stage$fgbi_bin"
    # Rust binaries unwind through libgcc_s, which ldd need not list; without it they exit 127.
    local gcc_s
    gcc_s=$(ldconfig -p | awk '/libgcc_s\.so\.1 .*x86-64/ {print $NF; exit}')
    [ -n "$gcc_s" ] || die "no libgcc_s.so.1 on the host (install libgcc-s1)"
    [ -e "$stage/$multiarch/libgcc_s.so.1" ] || { mkdir -p "$stage/$multiarch" && cp -L "$gcc_s" "$stage/$multiarch/"; }
    pack "$stage" "$run/overlay.cpio"
    cat "$base/initrd.cpio" "$run/overlay.cpio" >"$run/initrd"
}

# --- boot, collect, judge ---

boot() {
    step "booting the guest (TCG; at most $guest_timeout s)"
    local console="$run/console" status
    # The console, without its carriage returns, to the terminal and a file.
    timeout --kill-after=10 "$guest_timeout" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu max -m 1G -smp 2 -nographic -no-reboot -nic none \
        -kernel "$base/vmlinux" -initrd "$run/initrd" \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -append "console=ttyS0 quiet loglevel=3 panic=-1" </dev/null |
        tr -d '\r' | tee "$console" && status=("${PIPESTATUS[@]}") || status=("${PIPESTATUS[@]}")
    guest_rc=${status[0]}
    [ "$guest_rc" -ne 124 ] || echo "soft-roce: the guest ran out of its $guest_timeout s" >&2
    # The guest's marker lines, from where they start (the firmware's screen clearing
    # may precede the first one on its line).
    sed -n 's/.*\(FGBI-ROCE \)/\1/p' "$console" >"$run/markers"
}

judge() {
    local markers="$run/markers" console="$run/console"
    step "summary"
    grep -q '^FGBI-ROCE guest-up' "$markers" ||
        die "the guest never came up (QEMU exit $guest_rc; console in $console)"
    local setup
    setup=$(grep '^FGBI-ROCE setup-failed' "$markers" | head -n 1 | cut -d' ' -f3- || true)
    [ -z "$setup" ] || die "guest setup failed: $setup (console in $console)"
    sed -n 's/^FGBI-ROCE result //p' "$markers" >"$results"
    echo "tests:"
    sed -n 's/^FGBI-ROCE test \([^ ]* \(pass\|fail\|skip\).*\)/  \1/p' "$markers"
    if [ -s "$results" ]; then
        echo "results ($results):"
        sed 's/^/  /' "$results"
    fi
    local done_line failures
    done_line=$(grep '^FGBI-ROCE done failures=' "$markers" | tail -n 1 || true)
    [ -n "$done_line" ] ||
        die "the guest stopped before finishing its tests (QEMU exit $guest_rc; console in $console)"
    failures=${done_line##*=}
    # isa-debug-exit: QEMU exits with (status << 1) | 1, the status being the failure count.
    [ "$guest_rc" -eq $(((failures << 1) | 1)) ] ||
        die "QEMU exit $guest_rc does not match the guest's report ($done_line)"
    if [ "$failures" -ne 0 ] || grep -q '^FGBI-ROCE test [^ ]* fail' "$markers"; then
        die "test(s) failed in the guest (console in $console)"
    fi
    echo "soft-roce: all guest tests passed in $((SECONDS - started)) s"
}

mkdir -p "$run"
host_tools
build_project
build_base
build_overlay
boot
judge
