#!/usr/bin/env python3
"""Netfilter state that the iptables tools cannot remove, listed and deleted over netlink (this host has neither the
`nft` nor the `nfacct` tool). The real node leaves two such things behind:

  - nfacct counters: kube-proxy (iptables mode) creates ct_state_invalid_dropped_pkts and localhost_nps_accepted_pkts
    for its metrics and never deletes them, not even with --cleanup;
  - nftables tables: Debian's iptables is iptables-nft, which creates the table (ip filter, ip6 nat, ...) on first use;
    removing every rule and chain leaves the empty table (and its base chains) in place.

  netfilter.py nfacct-list                    one counter name per line
  netfilter.py nfacct-delete NAME...          a missing counter is fine; one still used by a rule is an error
  netfilter.py tables                         "FAMILY NAME" per nftables table (FAMILY: ip, ip6)
  netfilter.py table-delete FAMILY NAME...    a missing table is fine
"""
import errno
import os
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
# nfnetlink_acct
NFNL_SUBSYS_ACCT, NFNL_MSG_ACCT_GET, NFNL_MSG_ACCT_DEL, NFACCT_NAME = 7, 1, 3, 1
# nf_tables
NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE, NFTA_TABLE_NAME = 10, 1, 2, 1
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
FAMILIES = {"ip": 2, "ip6": 10}


def nlmsg(msg_type, flags, family=0, res_id=0, payload=b"", seq=1):
    body = struct.pack("!BBH", family, 0, res_id) + payload  # nfgenmsg (res_id is big-endian)
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body


def attr(atype, value):
    a = struct.pack("=HH", 4 + len(value), atype) + value
    return a + b"\0" * (-len(a) % 4)


def talk(data, acks=1):
    """Send netlink messages; yield (family, attributes) of each reply until DONE, or until `acks` ACKs arrived.
    A netlink error raises OSError."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.bind((0, 0))
        s.send(data)
        while True:
            buf, off = s.recv(1 << 16), 0
            while off + 16 <= len(buf):
                length, mtype = struct.unpack_from("=IH", buf, off)
                msg = buf[off + 16:off + length]
                off += (length + 3) & ~3
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", msg)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    acks -= 1
                    if acks == 0:
                        return
                    continue
                yield msg[0], dict(attrs(msg[4:]))


def attrs(buf):
    off = 0
    while off + 4 <= len(buf):
        length, atype = struct.unpack_from("=HH", buf, off)
        yield atype & 0x7FFF, buf[off + 4:off + length]
        off += (length + 3) & ~3


def name(value):
    return value.rstrip(b"\0").decode()


def main():
    cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "nfacct-list":
        for _, a in talk(nlmsg(NFNL_SUBSYS_ACCT << 8 | NFNL_MSG_ACCT_GET, NLM_F_REQUEST | NLM_F_DUMP)):
            print(name(a[NFACCT_NAME]))
    elif cmd == "nfacct-delete":
        for n in args:
            try:
                list(talk(nlmsg(NFNL_SUBSYS_ACCT << 8 | NFNL_MSG_ACCT_DEL, NLM_F_REQUEST | NLM_F_ACK,
                                payload=attr(NFACCT_NAME, n.encode() + b"\0"))))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    sys.exit("nfacct delete %s: %s" % (n, e.strerror))
    elif cmd == "tables":
        for fam_name, fam in FAMILIES.items():
            for _, a in talk(nlmsg(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE, NLM_F_REQUEST | NLM_F_DUMP, fam)):
                print(fam_name, name(a[NFTA_TABLE_NAME]))
    elif cmd == "table-delete" and len(args) >= 2 and args[0] in FAMILIES:
        for n in args[1:]:
            # nf_tables changes go in a batch: BEGIN, the change, END
            data = (nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, res_id=NFNL_SUBSYS_NFTABLES, seq=1)
                    + nlmsg(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELTABLE, NLM_F_REQUEST | NLM_F_ACK,
                            FAMILIES[args[0]], payload=attr(NFTA_TABLE_NAME, n.encode() + b"\0"), seq=2)
                    + nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, res_id=NFNL_SUBSYS_NFTABLES, seq=3))
            try:
                list(talk(data))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    sys.exit("nft delete table %s %s: %s" % (args[0], n, e.strerror))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
