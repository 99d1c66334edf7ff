# shellcheck shell=bash
# Sourced by the cluster launch scripts (scripts/benchmark_7B/*.sh, scripts/benchmark_70B/*.sh):
#   launch_on_hosts DEFAULT_HOSTFILE NPROC_PER_NODE SCRIPT.py ARGS...
# checks the hostfile ($HOSTFILE if set, else DEFAULT_HOSTFILE) and that every host in it answers
# password-less SSH, then runs `colossalai run` on those hosts from the repository root. A refusal is
# one line `error: ...` and exit 2, before anything starts. The launch's own exit status is the
# script's: `colossalai run` exits 1 when any node's torchrun fails (a rank's exit code is not passed
# on); the checks are here because it exits 0, having started nothing, for a missing hostfile.
# SSH_PORT=N: the hosts' sshd port (also given to colossalai run as --ssh-port); else ssh's default
# or ~/.ssh/config.

launch_refuse() {
  echo "error: $1" >&2
  exit 2
}

# The hosts of a hostfile, one per line: blank lines and '#' comments (hosts.txt.example's) left out.
hostfile_hosts() {
  sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e 's/^[[:space:]]*//' "$1" | grep -v '^$' || true
}

# colossalai run starts these hosts' processes itself, without SSH (its HostInfo.is_host_localhost).
is_local_host() {
  case "$1" in
    localhost | 127.0.0.1 | 0.0.0.0 | "${HOSTNAME:-localhost}") return 0 ;;
    *) return 1 ;;
  esac
}

# Refuse (exit 2) unless $1 exists, names at least one host, none twice, and each answers SSH.
check_hostfile() {
  local hostfile=$1 host reason seen=" "
  [ -f "$hostfile" ] ||
    launch_refuse "hostfile $hostfile does not exist: copy scripts/hosts.txt.example there and list your nodes (or name one with HOSTFILE=...)"
  local hosts
  hosts=$(hostfile_hosts "$hostfile")
  [ -n "$hosts" ] || launch_refuse "hostfile $hostfile lists no host: write one host name or IP per line"
  while read -r host; do
    case "$seen" in *" $host "*) launch_refuse "hostfile $hostfile lists host $host twice: list each node once" ;; esac
    seen="$seen$host "
    is_local_host "$host" && continue
    # BatchMode: fail at once instead of asking for a password or a host key, as the launcher would
    if ! reason=$(ssh -n -o BatchMode=yes -o ConnectTimeout=5 ${SSH_PORT:+-p "$SSH_PORT"} "$host" true 2>&1); then
      reason=$(printf '%s\n' "$reason" | tr -d '\r' | grep -v '^$' | tail -1)
      launch_refuse "host $host in hostfile $hostfile does not answer password-less ssh (${reason:-no message}): every host must accept 'ssh -o BatchMode=yes ${SSH_PORT:+-p $SSH_PORT }$host true' from this one"
    fi
  done <<<"$hosts"
}

launch_on_hosts() {
  local hostfile=${HOSTFILE:-$1} nproc=$2
  shift 2
  check_hostfile "$hostfile"
  command -v colossalai >/dev/null ||
    launch_refuse "colossalai is not on PATH: activate the recipe's venv first (source .venv/bin/activate)"
  local hosts
  hosts=$(hostfile_hosts "$hostfile" | paste -sd, -)
  cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2 # the repository root, where the scripts and runs/ are
  export OMP_NUM_THREADS=8
  # --host with the checked list (not --hostfile): the launcher would take a comment line for a host
  exec colossalai run --nproc_per_node "$nproc" --host "$hosts" ${SSH_PORT:+--ssh-port "$SSH_PORT"} "$@"
}
