# Shared constants of the real node (sourced by node-up.sh, node-down.sh, smoke.sh and up.sh). Only one real node can
# run per host: the bridge name, its addresses and the containerd image store below are host-wide.
NODE_NAME=lft-node
NODE_BRIDGE=lft0                      # Linux bridge the CNI bridge plugin attaches pods to
NODE_GW=10.244.0.1                    # bridge gateway: node IP, kubelet, CoreDNS and the API server's advertised address
NODE_POD_CIDR=10.244.0.0/24
NODE_SVC_CIDR=10.96.0.0/16            # replaces kube-apiserver's default 10.0.0.0/24, only for the real-node cluster
NODE_API_SVC_IP=10.96.0.1             # ClusterIP of the `kubernetes` Service (first address of NODE_SVC_CIDR)
NODE_CNI_NET=lft-node-net             # CNI network name: also tags the bridge plugin's iptables rules
NODE_KUBELET_PORT=10250
NODE_CACHE=${LFT_NODE_CACHE:-$HOME/.cache/lorafinetune/node}   # persistent: image store, pause and base images
NODE_CONTAINERD_ROOT=$NODE_CACHE/containerd-root
NODE_PAUSE_IMAGE=localhost/lft-pause:3.10
# Host sysctls that the kubelet, the CNI bridge plugin or kube-proxy may write: saved at node start, put back at stop.
NODE_SYSCTLS="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys
  kernel.keys.root_maxbytes net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv4.conf.all.route_localnet
  net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables net.netfilter.nf_conntrack_max
  net.netfilter.nf_conntrack_tcp_timeout_established net.netfilter.nf_conntrack_tcp_timeout_close_wait"
