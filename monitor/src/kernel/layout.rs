//! The member offsets the kernel programs read, resolved from the running
//! kernel's BTF (see `monitor_common::KernelLayout`).

use anyhow::{Context as _, bail};
use monitor_common::KernelLayout;

use super::btf::{BtfError, KernelBtf, Member};

/// Resolves every offset, checking each member's size against what the
/// programs read so that a changed kernel fails loudly instead of reporting
/// wrong numbers.
pub fn resolve(btf: &KernelBtf) -> anyhow::Result<KernelLayout> {
    // struct sock is reached through tcp_sock's own member types rather than
    // by name: some kernels' BTF (Debian 6.1) holds more than one `struct
    // sock`, and the first by name is not the one TCP uses.
    let sock = |path: &str, sizes: &[u32]| {
        member(
            btf,
            "tcp_sock",
            &format!("inet_conn.icsk_inet.sk.{path}"),
            sizes,
        )
    };
    let tcp = |path: &str, sizes: &[u32]| member(btf, "tcp_sock", path, sizes);
    let net = |path: &str, sizes: &[u32]| member(btf, "net", path, sizes);

    let keepopen = btf
        .enumerator("sock_flags", "SOCK_KEEPOPEN")
        .context("cannot find how SO_KEEPALIVE is stored (enum sock_flags)")?;
    if !(0..64).contains(&keepopen) {
        bail!("SOCK_KEEPOPEN is bit {keepopen}, outside the 64-bit sk_flags");
    }

    Ok(KernelLayout {
        skc_family: sock("__sk_common.skc_family", &[2])?,
        skc_state: sock("__sk_common.skc_state", &[1])?,
        inet_sport: member(btf, "tcp_sock", "inet_conn.icsk_inet.inet_sport", &[2])?,
        skc_dport: sock("__sk_common.skc_dport", &[2])?,
        skc_daddr: sock("__sk_common.skc_daddr", &[4])?,
        skc_rcv_saddr: sock("__sk_common.skc_rcv_saddr", &[4])?,
        skc_v6_daddr: sock("__sk_common.skc_v6_daddr", &[16])?,
        skc_v6_rcv_saddr: sock("__sk_common.skc_v6_rcv_saddr", &[16])?,
        skc_net: sock("__sk_common.skc_net", &[8])?,
        // Moved into sock_common (as skc_flags) in 6.16.
        sk_flags: sock("sk_flags", &[8]).or_else(|_| sock("__sk_common.skc_flags", &[8]))?,
        keepalive_timer: keepalive_timer(btf)?,
        keepopen_bit: keepopen as u32,
        lsndtime: tcp("lsndtime", &[4])?,
        rcv_tstamp: tcp("rcv_tstamp", &[4])?,
        lrcvtime: tcp("inet_conn.icsk_ack.lrcvtime", &[4])?,
        probes_out: tcp("inet_conn.icsk_probes_out", &[1])?,
        keepalive_time: tcp("keepalive_time", &[4])?,
        keepalive_intvl: tcp("keepalive_intvl", &[4])?,
        keepalive_probes: tcp("keepalive_probes", &[1])?,
        net_inum: net("ns.inum", &[4])?,
        net_keepalive_time: net("ipv4.sysctl_tcp_keepalive_time", &[4])?,
        net_keepalive_intvl: net("ipv4.sysctl_tcp_keepalive_intvl", &[4])?,
        // An int before 5.19 and a u8 since; both are little-endian here, so
        // reading the first byte gives the value (it is at most 127).
        net_keepalive_probes: net("ipv4.sysctl_tcp_keepalive_probes", &[1, 4])?,
        sk_err: sock("sk_err", &[4])?,
        skb_head: member(btf, "sk_buff", "head", &[8])?,
        skb_network_header: member(btf, "sk_buff", "network_header", &[2])?,
        skb_transport_header: member(btf, "sk_buff", "transport_header", &[2])?,
        timer_function: member(btf, "timer_list", "function", &[8])?,
        skc_num: sock("__sk_common.skc_num", &[2])?,
        sk_uid: sock("sk_uid.val", &[4])?,
        socket_sk: member(btf, "socket", "sk", &[8])?,
        sk_protocol: sock("sk_protocol", &[2])?,
        // socket_lock_t.owned, an int.
        sk_lock_owned: sock("sk_lock.owned", &[4])?,
        icsk_retransmits: tcp("inet_conn.icsk_retransmits", &[1])?,
        total_retrans: tcp("total_retrans", &[4])?,
        retrans_stamp: tcp("retrans_stamp", &[4])?,
    })
}

/// Offset from the socket of the timer that `tcp_keepalive_timer` runs on:
/// the keepalive hook subtracts it from its `struct timer_list *`.
///
/// Upstream "tcp: introduce icsk->icsk_keepalive_timer" (net-next, 2025-11)
/// moved the keepalive timer out of `sock.sk_timer`, and stable kernels carry
/// it: Debian's 6.1.0-56 and 6.12.117 set up the keepalive handler at
/// sk + 1176 and sk + 1184 (`inet_csk_init_xmit_timers`), where BTF has
/// `icsk_keepalive_timer`, although BTF still has `sk_timer` (at 408 and
/// 448). Where the member exists it is the one; older kernels use `sk_timer`.
fn keepalive_timer(btf: &KernelBtf) -> anyhow::Result<u32> {
    match btf.member("tcp_sock", "inet_conn.icsk_keepalive_timer") {
        Ok(Member { offset, .. }) => Ok(offset),
        Err(BtfError::NoSuchMember { .. }) => {
            member(btf, "tcp_sock", "inet_conn.icsk_inet.sk.sk_timer", &[])
        }
        Err(e) => Err(e).context("idlemon cannot find the keepalive timer on this kernel"),
    }
}

/// One member's offset; `sizes` lists the accepted sizes (empty: any).
fn member(btf: &KernelBtf, ty: &str, path: &str, sizes: &[u32]) -> anyhow::Result<u32> {
    let Member { offset, size } = btf
        .member(ty, path)
        .with_context(|| format!("idlemon cannot read {ty}.{path} on this kernel"))?;
    if !sizes.is_empty() && !sizes.contains(&size) {
        bail!("{ty}.{path} is {size} bytes on this kernel, idlemon reads {sizes:?}");
    }
    Ok(offset)
}

#[cfg(test)]
mod tests {
    use super::super::btf::testing::Builder;
    use super::*;

    /// The socket structs as Debian's 6.1.0-56 BTF has them, reduced to the
    /// keepalive timer candidates (offsets and sizes are the real ones), with
    /// or without `icsk_keepalive_timer`.
    fn tcp_sock_btf(icsk_keepalive_timer: bool) -> KernelBtf {
        let mut b = Builder::default();
        let u64_ = b.int("u64", 8);
        let timer = b.structure(
            "timer_list",
            40,
            &[("expires", u64_, 16), ("function", u64_, 24)],
        );
        let sk_timers = b.union(
            "",
            40,
            &[("sk_timer", timer, 0), ("mptcp_retransmit_timer", timer, 0)],
        );
        let sock = b.structure("sock", 776, &[("", sk_timers, 408)]);
        let inet = b.structure("inet_sock", 992, &[("sk", sock, 0)]);
        let mut icsk_members = vec![("icsk_inet", inet, 0)];
        if icsk_keepalive_timer {
            let icsk_timers = b.union(
                "",
                40,
                &[
                    ("icsk_keepalive_timer", timer, 0),
                    ("mptcp_tout_timer", timer, 0),
                ],
            );
            icsk_members.push(("", icsk_timers, 1176));
        }
        let icsk = b.structure("inet_connection_sock", 1440, &icsk_members);
        b.structure("tcp_sock", 2280, &[("inet_conn", icsk, 0)]);
        KernelBtf::parse(b.build()).unwrap()
    }

    #[test]
    fn keepalive_timer_is_icsk_keepalive_timer_where_it_exists() {
        let btf = tcp_sock_btf(true);
        // The disused sk_timer is still there; the hook must not take it.
        assert_eq!(btf.member("sock", "sk_timer").unwrap().offset, 408);
        assert_eq!(keepalive_timer(&btf).unwrap(), 1176);
    }

    #[test]
    fn keepalive_timer_is_sk_timer_on_older_kernels() {
        assert_eq!(keepalive_timer(&tcp_sock_btf(false)).unwrap(), 408);
    }

    #[test]
    fn resolves_on_the_running_kernel() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            eprintln!("skipped: {} is not readable here", KernelBtf::VMLINUX);
            return;
        };
        let layout = resolve(&btf).expect("layout resolves");
        // struct sock begins with sock_common, whose first members are the
        // address pair; tcp_sock-only members lie past the end of sock.
        assert!(layout.skc_daddr < layout.skc_family);
        assert!(layout.lsndtime > layout.sk_flags);
        assert_eq!(layout.keepopen_bit, 3);
        assert_ne!(layout.net_keepalive_time, layout.net_keepalive_intvl);
        // sk_lock is a member of struct sock, after sock_common.
        assert!(layout.sk_lock_owned > layout.skc_family);
        assert!(layout.sk_lock_owned < layout.lsndtime);
        // icsk_retransmits sits beside icsk_probes_out (the same cache line,
        // which the walk reads anyway); the other two are tcp_sock's own.
        assert!(layout.icsk_retransmits.abs_diff(layout.probes_out) < 8);
        assert!(layout.total_retrans > layout.sk_flags);
        assert!(layout.retrans_stamp > layout.sk_flags);
    }
}
