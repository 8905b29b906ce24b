# The tests that run inside the Soft-RoCE guest (run by busybox sh from the guest's
# /init, tests/rdma/init.sh, once rxe0 on veth0 = 10.0.0.1 and rxe1 on veth1 = 10.0.0.2
# are up). Each test prints "FGBI-ROCE test NAME pass|fail|skip"; measured figures are
# "FGBI-ROCE result KEY=VALUE" lines, which the host writes to its results file. The
# exit status is the number of failed tests.
#
# To add a test: one `check` (one program) or `pair` (a server and its client) line at
# the end. Every command runs under `timeout`; the guest runs under TCG emulation, so
# allow generously.

failures=0

# Records the outcome of test $1 from exit status $2.
outcome() {
    if [ "$2" -eq 0 ]; then
        echo "FGBI-ROCE test $1 pass"
    else
        echo "FGBI-ROCE test $1 fail status=$2"
        failures=$((failures + 1))
    fi
}

# check NAME SECONDS COMMAND...: runs COMMAND for at most SECONDS; passes if it exits 0.
check() {
    name=$1
    seconds=$2
    shift 2
    echo "FGBI-ROCE test $name start"
    timeout "$seconds" "$@"
    outcome "$name" $?
}

# Waits (at most 20 s) until something listens on TCP port $1.
wait_listen() {
    hex=$(printf '%04X' "$1")
    tries=0
    until grep -qE ":$hex [0-9A-F]+:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
        tries=$((tries + 1))
        [ "$tries" -le 200 ] || return 1
        sleep 0.1
    done
}

# pair NAME PORT SECONDS "SERVER COMMAND" "CLIENT COMMAND": starts the server, waits
# until it listens on PORT (clients do not retry), runs the client; passes if both exit
# 0. The client's output is kept in /tmp/NAME.client.
pair() {
    name=$1
    port=$2
    seconds=$3
    echo "FGBI-ROCE test $name start"
    # shellcheck disable=SC2086 # the commands are word lists
    timeout "$seconds" $4 >"/tmp/$name.server" 2>&1 &
    server=$!
    if ! wait_listen "$port"; then
        kill "$server" 2>/dev/null
        wait "$server"
        cat "/tmp/$name.server"
        echo "FGBI-ROCE test $name fail (the server never listened on port $port)"
        failures=$((failures + 1))
        return
    fi
    # shellcheck disable=SC2086
    timeout "$seconds" $5 >"/tmp/$name.client" 2>&1
    client_status=$?
    wait "$server"
    server_status=$?
    echo "--- $name server:"
    cat "/tmp/$name.server"
    echo "--- $name client:"
    cat "/tmp/$name.client"
    [ "$client_status" -eq 0 ] || echo "FGBI-ROCE $name client exit $client_status"
    [ "$server_status" -eq 0 ] || echo "FGBI-ROCE $name server exit $server_status"
    outcome "$name" $((client_status | server_status))
}

# A verbs round trip between the two devices: RC queue pairs, 4 KiB messages,
# contents checked (-c).
pair rc-pingpong 18515 60 \
    "ibv_rc_pingpong -d rxe1 -g 1 -c -n 200 -p 18515" \
    "ibv_rc_pingpong -d rxe0 -g 1 -c -n 200 -p 18515 10.0.0.2"

# The reference figure: RDMA WRITE bandwidth with 64 KiB messages for 3 s.
pair ib-write-bw 18516 60 \
    "ib_write_bw -d rxe1 -x 1 -s 65536 -D 3 -F --report_gbits -p 18516" \
    "ib_write_bw -d rxe0 -x 1 -s 65536 -D 3 -F --report_gbits -p 18516 10.0.0.2"
gbps=$(awk '$1 == 65536 && NF >= 5 {print $4}' /tmp/ib-write-bw.client)
if [ -n "$gbps" ]; then
    echo "FGBI-ROCE result ib_write_bw_gbps=$gbps"
else
    outcome ib-write-bw-figure 1
fi

# The project's binary runs here (its libraries were copied in).
check fgbi-starts 60 /bin/fgbi --version

# The project's RDMA tests, on the two devices.
check rdma-tests 600 env FGBI_RDMA_DEVICE_A=rxe0 FGBI_RDMA_DEVICE_B=rxe1 \
    FGBI_RDMA_ADDR_A=10.0.0.1 FGBI_RDMA_ADDR_B=10.0.0.2 FGBI_REQUIRE_ALL=1 FGBI_RDMA_REQUIRED=1 \
    RUST_BACKTRACE=1 /bin/rdma-tests --test-threads=1

# suite NAME BINARY [TEST...]: runs the project's test BINARY (the TESTs named, else
# every test in it) over RDMA, the two sides on the two devices, heartbeats every
# second (a peer silent for 4 s is dead, an epoch unanswered for 16 s lost: under
# emulation a debug build takes seconds over the first epoch, the whole memory).
# Passes if it exits 0 having run every test it was to run (a name that matches
# nothing would pass by running nothing).
suite() {
    name=$1
    binary=$2
    shift 2
    if [ $# -gt 0 ]; then
        expected=$#
    else
        expected=$("$binary" --list 2>/dev/null | grep -c ': test$')
    fi
    echo "FGBI-ROCE test $name start"
    timeout 600 env FGBI_TEST_TRANSPORT=rdma FGBI_RDMA_DEVICE_A=rxe0 FGBI_RDMA_DEVICE_B=rxe1 \
        FGBI_TEST_HEARTBEAT_MS=1000 FGBI_REQUIRE_ALL=1 RUST_BACKTRACE=1 \
        "$binary" --exact --test-threads=1 "$@" >"/tmp/$name.out" 2>&1
    status=$?
    cat "/tmp/$name.out"
    [ "$status" -ne 0 ] || grep -q "test result: ok. $expected passed" "/tmp/$name.out" || status=1
    outcome "$name" "$status"
}

# Failover over RDMA: the demo's failure tests (tools/tests/demo.rs), `fgbi backup` and
# the protected program as separate processes, the primary killed with SIGKILL at
# chosen points of a checkpoint.
suite rdma-failover /bin/failover-tests \
    a_workload_killed_at_any_point_of_a_checkpoint_resumes_from_a_replica_equal_to_it \
    with_output_commit_no_reply_announces_a_write_a_crash_at_any_point_loses

# `fgbi primary` and `fgbi backup` over RDMA, the primary killed in the middle of an
# epoch's transfer (the backup fails over to its last committed checkpoint) and during
# initial sync (the backup holds no checkpoint and does not fail over), and the backup
# killed and replaced by an empty one (synced, then failed over to):
# tools/tests/kill.rs, every test of it.
suite rdma-kill /bin/kill-tests

# A partition of the link (a proxy that stops forwarding the side channel, which
# carries the heartbeats, while RDMA itself stays up): the backup fences the primary
# before failing over, or, when the fence fails, does not fail over
# (tools/tests/fence.rs, every test of it).
suite rdma-fence /bin/fence-tests

# `fgbi bench` over RDMA: its networked pass, the bench and its backup process on
# rxe0 (a device loops back to itself), every replica verified, one failover per
# mode; the synthetic workloads are small, as the guest is emulated.
check rdma-bench 600 /bin/fgbi bench --workload idle,web --modes remus,fgbi --epochs 2 \
    --net-epochs 3 --failovers 1 --mem 8M --cache 1M --tracking kernel \
    --transport rdma --rdma-device rxe0

exit "$failures"
