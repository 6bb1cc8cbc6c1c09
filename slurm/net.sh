# Sourced by slurm/common.sh (and tests): network settings derived from the environment.

# gloo_ifname_from_nccl SPEC: the interface list gloo should use, from an NCCL_SOCKET_IFNAME
# value. NCCL matches name prefixes ("ib" is ib0, ib1, ...), "=name" exactly, and "^name"
# excludes; gloo takes exact names only. Prints exact names (a prefix resolved against
# /sys/class/net, first match), or nothing for an exclusion list or a prefix no interface
# here has.
gloo_ifname_from_nccl() {
    local spec=$1 exact=0 name dev out=()
    [[ -z $spec || $spec == ^* ]] && return 0
    [[ $spec == =* ]] && { exact=1; spec=${spec#=}; }
    local -a names
    IFS=, read -ra names <<< "$spec"
    for name in "${names[@]}"; do
        [[ -z $name ]] && continue
        if (( exact )); then
            out+=("$name")
            continue
        fi
        for dev in "${NET_SYSFS:-/sys/class/net}/$name"*; do
            if [[ -e $dev ]]; then
                out+=("${dev##*/}")
                break
            fi
        done
    done
    local IFS=,
    echo "${out[*]}"
}

# The trainer's host-side gloo group (the preemption flag, async-save completion) runs
# beside NCCL and needs the interface between nodes too: on clusters whose hostname
# resolves to loopback or a management network, gloo without GLOO_SOCKET_IFNAME picks
# the wrong one. Default it to NCCL_SOCKET_IFNAME's interfaces; a value set wins.
default_gloo_ifname() {
    if [[ -z ${GLOO_SOCKET_IFNAME:-} && -n ${NCCL_SOCKET_IFNAME:-} ]]; then
        local ifname
        ifname=$(gloo_ifname_from_nccl "$NCCL_SOCKET_IFNAME")
        if [[ -n $ifname ]]; then
            export GLOO_SOCKET_IFNAME=$ifname
            echo "pretrain: GLOO_SOCKET_IFNAME=$ifname (from NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME)"
        fi
    fi
}
