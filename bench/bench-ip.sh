#!/usr/bin/env bash
# Prints a private address of this machine for benchmark daemons that
# refuse loopback (MooseFS, GlusterFS), creating it once on a veth pair
# (this kernel has no dummy interfaces). Everything stays on this machine.
set -euo pipefail
IF=cfsbench0 PEER=cfsbench1 IP=10.199.0.1
if ! ip -4 addr show dev "$IF" 2>/dev/null | grep -qF "$IP/"; then
  ip link show "$IF" >/dev/null 2>&1 || ip link add "$IF" type veth peer name "$PEER"
  ip addr add "$IP/24" dev "$IF" 2>/dev/null || true
  ip link set "$PEER" up
  ip link set "$IF" up
fi
echo "$IP"
