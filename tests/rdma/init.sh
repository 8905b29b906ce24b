#!/bin/busybox sh
# /init of the Soft-RoCE guest that tests/rdma/soft-roce.sh boots: mounts the kernel's
# file systems, loads the RDMA modules, puts one rxe device on each end of a veth pair,
# runs /etc/fgbi/guest.sh (tests/rdma/guest.sh), and leaves QEMU through isa-debug-exit
# with the number of failed tests. Everything the host reads is a line starting with
# "FGBI-ROCE " on the serial console.

/bin/busybox --install -s /bin
export PATH=/usr/bin:/usr/sbin:/bin
# busybox's shell runs its own `ip` applet for a bare `ip`: iproute2's by full path.
IP=/usr/sbin/ip

# Exits QEMU with status ($1 << 1) | 1 through isa-debug-exit (I/O port 0xf4).
leave() {
    # shellcheck disable=SC2059 # the format is the byte's octal escape
    printf "\\$(printf %o "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    poweroff -f
}
# Reports a setup step that failed and leaves with status 100.
die() {
    echo "FGBI-ROCE setup-failed $*"
    leave 100
}
# Sets the sysctl $1 (a path under /proc/sys) to $2.
sysctl_set() {
    echo "$2" >"/proc/sys/$1" || die "cannot set $1"
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "FGBI-ROCE guest-up kernel=$(uname -r) cpus=$(nproc)"

while read -r module; do
    insmod "/lib/modules/$module" || die "insmod $module"
done </etc/fgbi/modules

# Both ends of the pair are local addresses: packets from one to the other arrive with
# a local source, which the kernel drops unless accept_local is set (set before the
# devices exist, so `default` covers them).
sysctl_set net/ipv4/conf/all/accept_local 1
sysctl_set net/ipv4/conf/default/accept_local 1
$IP link set lo up || die "lo up"
# MTU 9000 gives the rxe devices an IB MTU of 4096 (1500 would give 1024).
$IP link add veth0 mtu 9000 type veth peer name veth1 mtu 9000 || die "veth pair"
$IP addr add 10.0.0.1/24 dev veth0 || die "address of veth0"
$IP addr add 10.0.0.2/24 dev veth1 || die "address of veth1"
$IP link set veth0 up || die "veth0 up"
$IP link set veth1 up || die "veth1 up"
rdma link add rxe0 type rxe netdev veth0 || die "rxe0 on veth0"
rdma link add rxe1 type rxe netdev veth1 || die "rxe1 on veth1"

# GID index 1 is the IPv4-mapped RoCE v2 GID: wait until both devices have it.
for dev in rxe0 rxe1; do
    gid=/sys/class/infiniband/$dev/ports/1/gids/1
    tries=0
    until [ -r "$gid" ] && [ "$(cat "$gid")" != "0000:0000:0000:0000:0000:0000:0000:0000" ]; do
        tries=$((tries + 1))
        [ "$tries" -le 100 ] || die "$dev has no GID at index 1 after 10 s"
        sleep 0.1
    done
    echo "FGBI-ROCE device $dev gid1=$(cat "$gid")" \
        "$(ibv_devinfo -d "$dev" | awk '/state:|active_mtu:/ {printf "%s%s ", $1, $2}')"
done
echo "FGBI-ROCE result ib_mtu=$(ibv_devinfo -d rxe0 | awk '/active_mtu:/ {print $2; exit}')"
echo "FGBI-ROCE setup-ok"

sh /etc/fgbi/guest.sh
failures=$?
[ "$failures" -le 99 ] || failures=99
echo "FGBI-ROCE done failures=$failures"
leave "$failures"
