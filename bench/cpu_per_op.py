#!/usr/bin/env python3
"""CPU time the cluster (daemons and mount) spends per namespace operation.

Starts a fresh `cfs up` from the binaries in BINDIR, runs N operations of
one thread for each phase (create+write 1 KiB+close, unlink, mkdir and
rmdir in the root), and prints ops/s and the daemons' and mount's CPU
time (utime+stime from /proc/<pid>/stat) per operation, including the
background work each one leaves (replication, apply on every replica),
settled by a sync and a second's wait. CPU per operation is steadier
than ops/s on a shared, noisy machine.

Usage: bench/cpu_per_op.py BINDIR [N] [--split]   (e.g. /var/tmp/cfs-target/release)
--split also prints, per phase, each process's CPU per operation by
thread name (tokio workers, shard threads, FUSE threads).
"""
import os, sys, time, subprocess, tempfile, shutil
bindir = sys.argv[1]
args = [a for a in sys.argv[2:] if not a.startswith('--')]
n = int(args[0]) if args else 1000
split = '--split' in sys.argv
D = tempfile.mkdtemp(dir='/var/tmp', prefix='cpuop.')
cfs = f'{bindir}/cfs'
subprocess.run([cfs, 'up', '--dir', f'{D}/c', '--mount', f'{D}/m'], check=True, stdout=subprocess.DEVNULL)
time.sleep(2)
def pids():
    out = subprocess.run(['pgrep', '-f', f'{D}/'], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]
def cpu(ps):
    t = 0
    for p in ps:
        try:
            f = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
            t += int(f[11]) + int(f[12])
        except FileNotFoundError:
            pass
    return t / os.sysconf('SC_CLK_TCK')
def by_thread(p):
    out = {}
    try:
        tasks = os.listdir(f'/proc/{p}/task')
    except FileNotFoundError:
        return out
    for t in tasks:
        try:
            st = open(f'/proc/{p}/task/{t}/stat').read()
        except FileNotFoundError:
            continue
        comm = st[st.index('(') + 1:st.rindex(')')]
        f = st.rsplit(')', 1)[1].split()
        out[(comm, t)] = int(f[11]) + int(f[12])
    return out
def role(p):
    cmd = open(f'/proc/{p}/cmdline').read().split('\0')
    return 'mount' if 'mount' in cmd else 'node ' + next((c.split('/node-')[1].split('/')[0] for c in cmd if '/node-' in c), '?')
def selfcpu():
    r = os.times(); return r.user + r.system
try:
    w = f'{D}/m/w'; os.mkdir(w)
    res = {}
    for phase in ['create', 'unlink', 'mkdir', 'rmdir']:
        ps = pids(); c0 = cpu(ps); s0 = selfcpu(); t0 = time.time()
        th0 = {p: by_thread(p) for p in ps}
        for i in range(n):
            if phase == 'create':
                with open(f'{w}/f{i}', 'wb') as f: f.write(b'x' * 1024)
            elif phase == 'unlink': os.unlink(f'{w}/f{i}')
            elif phase == 'mkdir': os.mkdir(f'{D}/m/d{i}')
            else: os.rmdir(f'{D}/m/d{i}')
        el = time.time() - t0
        os.sync(); time.sleep(1.0)
        c1 = cpu(ps); s1 = selfcpu()
        print(f'{phase}: {n/el:.0f} ops/s, cfs CPU {1e6*(c1-c0)/n:.0f} us/op, caller {1e6*(s1-s0)/n:.0f} us/op', flush=True)
        if split:
            tck = os.sysconf('SC_CLK_TCK')
            for p in ps:
                th1 = by_thread(p)
                agg = {}
                for (comm, t), v in th0[p].items():
                    agg[comm] = agg.get(comm, 0) + th1.get((comm, t), v) - v
                total = sum(agg.values())
                parts = ', '.join(f'{c} {1e6*v/tck/n:.0f}' for c, v in sorted(agg.items(), key=lambda x: -x[1]) if v > 0)
                print(f'  {role(p)}: {1e6*total/tck/n:.0f} us/op ({parts})', flush=True)
finally:
    # Always stopped, even when the output pipe closes early.
    subprocess.run([cfs, 'down', '--dir', f'{D}/c'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(['umount', '-l', f'{D}/m'], stderr=subprocess.DEVNULL)
    shutil.rmtree(D, ignore_errors=True)
