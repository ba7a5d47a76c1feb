#!/usr/bin/env bash
# Machine facts recorded with every benchmark result (markdown on stdout):
# CPU, cores, kernel, mitigations, relevant sysctls, limits, RPS, commit.
set -u
sysctl_or() { sysctl -n "$1" 2>/dev/null || echo "n/a"; }
echo "| fact | value |"
echo "|---|---|"
echo "| date | $(date -u +%FT%TZ) |"
echo "| host | $(hostname) |"
echo "| cpu | $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') |"
echo "| cores online | $(nproc --all) |"
echo "| kernel | $(uname -r) |"
for v in spectre_v2 spec_rstack_overflow retbleed; do
  f=/sys/devices/system/cpu/vulnerabilities/$v
  [ -r "$f" ] && echo "| mitigation $v | $(cat "$f") |"
done
echo "| memory | $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo) |"
echo "| open files (soft/hard) | $(ulimit -Sn)/$(ulimit -Hn) |"
for k in net.core.somaxconn net.ipv4.tcp_max_syn_backlog net.core.netdev_max_backlog \
         net.ipv4.ip_local_port_range net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_wmem \
         fs.file-max fs.nr_open; do
  echo "| $k | $(sysctl_or $k | tr '\t' ' ') |"
done
rps=$(cat /sys/class/net/lo/queues/rx-0/rps_cpus 2>/dev/null || echo n/a)
echo "| lo rps_cpus (this netns) | $rps |"
root=$(cd "$(dirname "$0")/.." && pwd)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$root" status --porcelain 2>/dev/null | grep -q . && echo "+dirty" || true)
echo "| commit | $commit$dirty |"
echo "| rustc | $(rustc --version 2>/dev/null || echo n/a) |"
