#!/usr/bin/env bash
# tests/cluster/multinode-slurm.sh - hpc_bkd's multi-node SLURM on one machine, for its tests (root).
#
#   multinode-slurm.sh start [N]       N nodes n1..nN (default $HPC_BKD_MN_NODES or 2): network,
#                                      munged, slurmctld, one slurmd per node; waits until every
#                                      node is idle. Idempotent: ~0.1 s when already up with N nodes;
#                                      a cluster up with another node count is restarted.
#   multinode-slurm.sh stop            cancel jobs, end every process of every node, remove the
#                                      namespaces, links and mounts. Idempotent. State and logs kept.
#   multinode-slurm.sh stop --purge    ... and delete the state dir
#   multinode-slurm.sh status          daemons + nodes; exit 0 only when every node is idle
#   multinode-slurm.sh env             `export K=V` lines: eval "$(multinode-slurm.sh env)"
#   multinode-slurm.sh kill-node nI    a node fails: its link goes down, every process on it is
#                                      SIGKILLed (slurmd, step daemons, job tasks)
#   multinode-slurm.sh revive-node nI  link up, a fresh slurmd, node resumed (its /dev/shm is new)
#   multinode-slurm.sh exec nI CMD...  run CMD inside node nI (its network, hostname, mounts)
#
# A node is a network + UTS + IPC + mount namespace: its own hostname (nI), its own address on a
# private bridge ($NET.1I, only inside this machine; the controller is $NET.1), its own /dev/shm
# (tmpfs) and an /etc/hosts that names every node (as a cluster's DNS would). slurmctld and a
# private munged run in the machine's own namespaces; each slurmd runs in its node. Nodes share the
# machine's filesystem except $DIR/private: each node sees its own $DIR/nodes/nI/private there
# (a bind mount), so a run directory under $DIR/private is node-private, as on a cluster without
# a shared filesystem. The single-node cluster (local-slurm.sh) is not touched: own config
# ($DIR/slurm.conf, pass it as SLURM_CONF), own ports, own munge socket, no accounting.
#
# Knobs (env): HPC_BKD_MN_DIR (/tmp/hpc_bkd-mn), HPC_BKD_MN_NODES (2), HPC_BKD_MN_PREFIX (hbkd:
#   names of the namespaces hbkd-nI, links hbkd-nI and bridge hbkdbr), HPC_BKD_MN_NET (10.231.0),
#   HPC_BKD_MN_PORT (7817 slurmctld, +1 slurmd), HPC_BKD_MN_CPUS (CPUs per node, 2),
#   HPC_BKD_MN_SLURMD_TIMEOUT (10 s: how soon slurmctld declares a silent node DOWN),
#   HPC_BKD_MN_TIMEOUT (60 s to get ready). Distinct DIR/PREFIX/NET/PORT = independent clusters.
# Exit codes: 0 ok, 1 failed, 2 usage, 3 not root, 4 SLURM/munge/iproute2 not installed.
set -euo pipefail

DIR=${HPC_BKD_MN_DIR:-/tmp/hpc_bkd-mn}
PFX=${HPC_BKD_MN_PREFIX:-hbkd}
NET=${HPC_BKD_MN_NET:-10.231.0}
PORT=${HPC_BKD_MN_PORT:-7817}
CPUS=${HPC_BKD_MN_CPUS:-2}
SD_TIMEOUT=${HPC_BKD_MN_SLURMD_TIMEOUT:-10}
WAIT_S=${HPC_BKD_MN_TIMEOUT:-60}
PART=mn
BR=${PFX}br
RUN=$DIR/run LOG=$DIR/log
export SLURM_CONF=$DIR/slurm.conf

log() { printf '[multinode-slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $1"; exit "${2:-1}"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root" 3; }
lock() { install -d -m 0755 "$DIR"; exec 9>"$DIR/.lock"; flock -w 300 9 || die "lock $DIR/.lock busy"; }
# a running pid: exists and is no zombie (PID 1 may take seconds to reap orphans)
running() { local st; st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [ -n "$st" ] && [ "$st" != Z ]; }
alive() { local p; [ -s "$1" ] && p=$(<"$1") && running "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]; }
netns_of() { echo "$PFX-$1"; }                   # node name -> its network namespace
nodes_up() { ls /run/netns 2>/dev/null | sed -n "s/^$PFX-\(n[0-9]*\)\$/\1/p" | sort -V; }
node_count() { [ -s "$DIR/nodes.count" ] && cat "$DIR/nodes.count" || echo 0; }

check_tools() {  # SLURM and munge from Debian's packages, as local-slurm.sh installs them
  local t missing=0
  for t in slurmctld slurmd munged ip nsenter unshare sinfo; do
    command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || missing=1
  done
  [ $missing = 0 ] && return 0
  command -v apt-get >/dev/null || die "SLURM, munge or iproute2 missing and no apt-get" 4
  log "installing slurmctld slurmd slurm-client munge iproute2"
  install -d "$LOG"
  { apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge iproute2 util-linux; } >"$LOG/apt.log" 2>&1 \
    || { tail -20 "$LOG/apt.log" >&2; die "apt-get install failed" 4; }
}

# ------------------------------------------------------------------------------------ network
net_up() {  # net_up N: the bridge, then per node a namespace with eth0 on the bridge
  local n=$1 i ns
  [ -d /run/netns ] || touch "$RUN/netns-dir-ours"   # `ip netns add` creates (and mounts) it
  ip link show "$BR" >/dev/null 2>&1 || {
    ip link add "$BR" type bridge; ip addr add "$NET.1/24" dev "$BR"; }
  ip link set "$BR" up
  for i in $(seq "$n"); do
    ns=$(netns_of "n$i")
    [ -e "/run/netns/$ns" ] && continue
    ip netns add "$ns"
    ip link add "$PFX-n$i" type veth peer name eth0 netns "$ns"
    ip link set "$PFX-n$i" master "$BR" up
    ip -n "$ns" addr add "$NET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

kill_node_procs() {  # kill_node_procs NODE SIG: signal every process in the node's namespace
  local ns pids; ns=$(netns_of "$1")
  [ -e "/run/netns/$ns" ] || return 0
  pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
  [ -n "${pids// /}" ] && kill "-$2" $pids 2>/dev/null || true
}

wait_node_empty() {  # wait_node_empty NODE TENTHS: until no live process is left in the namespace
  local ns p left i; ns=$(netns_of "$1")
  for (( i = 0; i < $2; i++ )); do
    left=""
    for p in $(ip netns pids "$ns" 2>/dev/null); do running "$p" && left="$left $p"; done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  return 1
}

net_down() {  # every node's processes ended, namespaces and links removed, /run/netns if ours
  local node
  for node in $(nodes_up); do
    kill_node_procs "$node" TERM
    wait_node_empty "$node" 50 || { kill_node_procs "$node" KILL; wait_node_empty "$node" 50 || true; }
    ip netns del "$(netns_of "$node")" 2>/dev/null || true   # also removes the veth pair
    ip link del "$PFX-$node" 2>/dev/null || true
  done
  ip link del "$BR" 2>/dev/null || true
  if [ -e "$RUN/netns-dir-ours" ] && [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then
    while grep -q " /run/netns " /proc/self/mountinfo; do umount /run/netns || break; done
    rmdir /run/netns 2>/dev/null || true
  fi
  rm -f "$RUN/netns-dir-ours"
}

# ------------------------------------------------------------------------------------- daemons
start_munge() {
  install -d -o munge -g munge -m 0755 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$DIR/munge/munge.key"; chmod 0400 "$DIR/munge/munge.key"
  fi
  alive "$DIR/munge/munged.pid" munged && return 0
  rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
  runuser -u munge -- /usr/sbin/munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
    </dev/null 9>&- || die "munged failed: $(tail -3 "$DIR/munge/munged.log" 2>/dev/null)"
}

slurm_conf() {  # slurm_conf N
  cat <<EOF
# generated by hpc_bkd tests/cluster/multinode-slurm.sh ($1 nodes)
ClusterName=${PFX}mn
SlurmctldHost=$(hostname -s)($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
MpiDefault=pmi2
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=300
SlurmdTimeout=$SD_TIMEOUT
# how long slurmctld waits on one RPC, e.g. the ping of a node that vanished: with SlurmdTimeout,
# how soon a dead node's job ends (default 10 s)
MessageTimeout=5
KillWait=30
MailProg=/bin/true
EOF
  local i
  for i in $(seq "$1"); do
    echo "NodeName=n$i NodeAddr=$NET.$((10 + i)) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN"
  done
  echo "PartitionName=$PART Nodes=n[1-$1] Default=YES DefaultTime=30 MaxTime=INFINITE OverSubscribe=YES State=UP"
}

hosts_file() {  # hosts_file N: what every node's /etc/hosts says
  local i
  printf '127.0.0.1 localhost\n::1 localhost\n%s.1 %s\n' "$NET" "$(hostname -s)"
  for i in $(seq "$1"); do echo "$NET.$((10 + i)) n$i"; done
}

start_slurmd() {  # start_slurmd NODE: in the node's namespaces (nsenter, not `ip netns exec`,
  local node=$1 ns   # which remounts /sys and hides the cgroup fs that slurmd 22.05 needs)
  ns=$(netns_of "$node")
  alive "$RUN/slurmd-$node.pid" slurmd && return 0
  install -d "$DIR/state/d-$node" "$DIR/nodes/$node/private" "$DIR/private"
  nsenter --net="/run/netns/$ns" unshare --uts --ipc --mount --propagation private sh -c "
    hostname $node
    mount -t tmpfs -o size=2g,mode=1777 shm-$node /dev/shm
    mount --bind $DIR/hosts /etc/hosts
    mount --bind $DIR/nodes/$node/private $DIR/private
    exec /usr/sbin/slurmd -N $node" </dev/null 9>&- || die "slurmd on $node failed: $(tail -5 "$LOG/slurmd-$node.log")"
}

# ------------------------------------------------------------------------------------ readiness
# nodes idle and responding (sinfo marks a node that does not answer "idle*")
idle_nodes() { sinfo -h -N -p "$PART" -o '%N %t' 2>/dev/null | awk '$2 == "idle" {s++} END {print s + 0}'; }

wait_ready() {  # wait_ready N
  local i
  for (( i = 0; i < WAIT_S * 10; i++ )); do
    [ "$(idle_nodes)" = "$1" ] && return 0
    sleep 0.1
  done
  sinfo -N -l >&2 || true; tail -n 10 "$LOG"/slurm*.log >&2 || true
  die "not ready after ${WAIT_S}s: $(idle_nodes)/$1 nodes idle"
}

ready() {  # ready N: every daemon runs and N nodes are idle
  local i
  alive "$DIR/munge/munged.pid" munged && alive "$RUN/slurmctld.pid" slurmctld || return 1
  for i in $(seq "$1"); do alive "$RUN/slurmd-n$i.pid" slurmd || return 1; done
  [ "$(idle_nodes)" = "$1" ]
}

# ------------------------------------------------------------------------------------- commands
cmd_start() {
  local n=${1:-${HPC_BKD_MN_NODES:-2}} t0 i
  [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "node count must be 1..99, not '$n'" 2
  need_root; lock; check_tools
  t0=$(now)
  if [ "$(node_count)" = "$n" ] && ready "$n"; then log "up: $n nodes (${PART}), $(since "$t0")s"; return 0; fi
  [ "$(node_count)" = 0 ] && [ -z "$(nodes_up)" ] || { log "restarting (wanted $n nodes)"; do_stop; }
  install -d -m 0755 "$RUN" "$LOG" "$DIR/state/ctld"
  echo "$n" >"$DIR/nodes.count"
  slurm_conf "$n" >"$SLURM_CONF"
  hosts_file "$n" >"$DIR/hosts"
  net_up "$n"
  start_munge
  if ! alive "$RUN/slurmctld.pid" slurmctld; then
    # -c: no jobs from an earlier cluster (a requeued one would start again); job ids restart at 1
    /usr/sbin/slurmctld -c -i </dev/null 9>&- || die "slurmctld failed: $(tail -5 "$LOG/slurmctld.log")"
  fi
  for i in $(seq "$n"); do start_slurmd "n$i"; done
  wait_ready "$n"
  log "ready in $(since "$t0")s: $n nodes n[1-$n] ($NET.11-$NET.$((10 + n))), partition $PART, SLURM_CONF=$SLURM_CONF"
}

stop_pid() {  # stop_pid PIDFILE NAME: TERM, wait up to 10 s, KILL
  alive "$1" "$2" || { rm -f "$1"; return 0; }
  local p; p=$(<"$1"); kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 100); do running "$p" || break; sleep 0.1; done
  running "$p" && kill -KILL "$p" 2>/dev/null || true
  rm -f "$1"
}

do_stop() {
  local jobs f
  if alive "$RUN/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ') || jobs=""
    if [ -n "${jobs// /}" ]; then
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  for f in "$RUN"/slurmd-n*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
  net_down    # whatever still runs on a node (job tasks, step daemons) ends with its namespace
  stop_pid "$RUN/slurmctld.pid" slurmctld
  stop_pid "$DIR/munge/munged.pid" munged
  rm -f "$DIR/nodes.count"
}

cmd_stop() {
  need_root; lock
  do_stop
  if [ "${1:-}" = --purge ]; then rm -rf "$DIR/state" "$LOG" "$RUN" "$DIR/munge" "$DIR/nodes"; fi
  log "stopped"
}

cmd_status() {
  local n rc=0 i; n=$(node_count)
  if alive "$DIR/munge/munged.pid" munged; then echo "munged: running"; else echo "munged: not running"; rc=1; fi
  if alive "$RUN/slurmctld.pid" slurmctld; then echo "slurmctld: running"; else echo "slurmctld: not running"; rc=1; fi
  for i in $(seq "$n"); do
    if alive "$RUN/slurmd-n$i.pid" slurmd; then echo "slurmd n$i: running"; else echo "slurmd n$i: not running"; rc=1; fi
  done
  [ "$n" != 0 ] || { echo "no nodes"; return 1; }
  if [ $rc = 0 ] && ready "$n"; then echo "ready: $n nodes, partition $PART, SLURM_CONF=$SLURM_CONF"; return 0; fi
  sinfo -N 2>/dev/null || true
  return 1
}

cmd_env() {
  cat <<EOF
export SLURM_CONF=$SLURM_CONF
export HPC_BKD_MN_DIR=$DIR
export HPC_BKD_MN_NODES=$(node_count)
export HPC_BKD_MN_PARTITION=$PART
export HPC_BKD_MN_PRIVATE=$DIR/private
export HPC_BKD_MN_LOGS=$LOG
EOF
}

cmd_kill_node() {
  need_root; local node=$1
  [ -e "/run/netns/$(netns_of "$node")" ] || die "no node $node" 2
  ip link set "$PFX-$node" down          # the node vanishes from the network: no FIN, no RST
  kill_node_procs "$node" KILL           # slurmd, slurmstepd, job tasks: all at once
  wait_node_empty "$node" 100 || die "processes of $node survived SIGKILL"
  rm -f "$RUN/slurmd-$node.pid"
  log "node $node killed"
}

cmd_revive_node() {
  need_root; lock; local node=$1
  [ -e "/run/netns/$(netns_of "$node")" ] || die "no node $node" 2
  ip link set "$PFX-$node" up
  start_slurmd "$node"
  for _ in $(seq $((WAIT_S * 10))); do
    scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
    [ "$(sinfo -h -N -n "$node" -o %t 2>/dev/null)" = idle ] && { log "node $node back"; return 0; }
    sleep 0.2
  done
  die "node $node not idle after ${WAIT_S}s"
}

cmd_exec() {
  local node=$1 pid; shift
  pid=$(<"$RUN/slurmd-$node.pid") || die "no slurmd on $node"
  exec nsenter -t "$pid" --net --uts --ipc --mount "$@"
}

case "${1:-}" in
  start) [ $# -le 2 ] || die "usage: $0 start [N]" 2; cmd_start "${2:-}" ;;
  stop) [ $# -le 1 ] || [ "$2" = --purge ] || die "usage: $0 stop [--purge]" 2; cmd_stop "${2:-}" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  kill-node) [ $# = 2 ] || die "usage: $0 kill-node nI" 2; cmd_kill_node "$2" ;;
  revive-node) [ $# = 2 ] || die "usage: $0 revive-node nI" 2; cmd_revive_node "$2" ;;
  exec) [ $# -ge 3 ] || die "usage: $0 exec nI CMD..." 2; shift; cmd_exec "$@" ;;
  *) echo "usage: $0 start [N] | stop [--purge] | status | env | kill-node nI | revive-node nI | exec nI CMD..." >&2; exit 2 ;;
esac
