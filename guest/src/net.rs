//! Network interfaces: loopback always, eth0 (QEMU user networking's addresses) on request.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// The guest's address, gateway and DNS server under QEMU user networking (slirp).
const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// `/etc/resolv.conf` of a build with network access.
pub const RESOLV_CONF: &str = "nameserver 10.0.2.3\n";

#[derive(Debug, thiserror::Error)]
#[error("{what} on {ifname}")]
pub struct NetError {
    what: &'static str,
    ifname: &'static str,
    #[source]
    source: Errno,
}

/// The kernel's `struct rtentry` (net/route.h), which the libc crate lacks for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes and plain data; the kernel reads
    // a sockaddr_in out of these ioctl fields when sa_family is AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

struct Iface {
    sock: OwnedFd,
    name: &'static str,
}

impl Iface {
    fn new(name: &'static str) -> Result<Self, NetError> {
        let sock = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|source| NetError {
            what: "open an AF_INET socket",
            ifname: name,
            source,
        })?;
        Ok(Self { sock, name })
    }

    fn ifreq(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(self.name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }

    fn ioctl<T>(
        &self,
        what: &'static str,
        request: libc::c_ulong,
        arg: &mut T,
    ) -> Result<(), NetError> {
        // SAFETY: `arg` is the structure the kernel expects for `request` (ifreq or rtentry),
        // valid for reads and writes for the duration of the call.
        let rc = unsafe { libc::ioctl(self.sock.as_raw_fd(), request, arg as *mut T) };
        Errno::result(rc).map(drop).map_err(|source| NetError {
            what,
            ifname: self.name,
            source,
        })
    }

    fn up(&self) -> Result<(), NetError> {
        let mut req = self.ifreq();
        self.ioctl("get flags", libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl("set flags", libc::SIOCSIFFLAGS, &mut req)
    }

    fn set_addr(&self, addr: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), NetError> {
        let mut req = self.ifreq();
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        self.ioctl("set address", libc::SIOCSIFADDR, &mut req)?;
        let mut req = self.ifreq();
        req.ifr_ifru.ifru_netmask = sockaddr(netmask);
        self.ioctl("set netmask", libc::SIOCSIFNETMASK, &mut req)
    }

    fn default_route(&self, gateway: Ipv4Addr) -> Result<(), NetError> {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gateway),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl("add the default route", libc::SIOCADDRT, &mut rt)
    }
}

/// Brings the loopback interface up; builds that test servers need it.
pub fn loopback_up() -> Result<(), NetError> {
    Iface::new("lo")?.up()
}

/// Configures eth0 with user networking's fixed addresses and a default route.
pub fn eth0_up() -> Result<(), NetError> {
    let eth0 = Iface::new("eth0")?;
    eth0.set_addr(ADDRESS, NETMASK)?;
    eth0.up()?;
    eth0.default_route(GATEWAY)
}
