#!/usr/bin/env python3
"""Read `iptables-save` (or `ip6tables-save`) output on stdin and print an `iptables-restore --noflush` script that
removes what the real node left behind, and nothing else:

  - every KUBE-* chain (kubelet: KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT; kube-proxy: whatever its
    --cleanup mode missed), with the rules of other chains that jump to them;
  - the CNI-* chains of our own CNI network (the bridge plugin's ipMasq chains, whose jump rule carries the comment
    `name: "<network>" id: "<container>"`), so chains of other CNI users on the host (podman) stay.

  iptables-save | iptables-cleanup.py lft-node-net | iptables-restore --noflush
"""
import re
import sys


def main():
    network = sys.argv[1]
    tables, table = {}, None
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {"chains": [], "rules": []})
        elif line.startswith(":") and table is not None:
            table["chains"].append(line[1:].split()[0])
        elif line.startswith("-A ") and table is not None:
            table["rules"].append(line)

    out = []
    ours = 'name: \\"%s\\"' % network
    for name, t in tables.items():
        targets = {c for c in t["chains"] if c.startswith("KUBE-")}
        for rule in t["rules"]:
            m = re.search(r" -[jg] (CNI-\S+)", rule)
            if m and ours in rule:
                targets.add(m.group(1))
        if not targets:
            continue
        out.append("*" + name)
        for rule in t["rules"]:
            chain = rule.split()[1]
            m = re.search(r" -[jg] (\S+)", rule)
            if chain not in targets and m and m.group(1) in targets:
                out.append("-D" + rule[2:])
        out += ["-F " + c for c in sorted(targets)] + ["-X " + c for c in sorted(targets)] + ["COMMIT"]
    print("\n".join(out))


if __name__ == "__main__":
    main()
