//! How the native fetch reaches a broker without holding the consumer thread: the broker's host
//! name is resolved on a thread of its own ([`addresses`]), then a connect is begun without
//! waiting to each of its addresses in turn ([`connect_next`]) and finished once its socket is
//! writable ([`super::Fetcher::ready`]), and the socket made ready for the fetch's I/O
//! ([`ready_for_io`]).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// Resolves `host:port` to its addresses: the system's resolver ([`system_resolver`]), or a
/// stand-in in tests.
pub(super) type Resolver = fn(&str) -> std::io::Result<Vec<SocketAddr>>;

/// The system's resolver (`getaddrinfo`): it may wait as long as its own timeouts and retries
/// allow, for example on a DNS server that does not answer.
pub(super) fn system_resolver(address: &str) -> std::io::Result<Vec<SocketAddr>> {
    Ok(address.to_socket_addrs()?.collect())
}

/// A host name being resolved on a thread of its own.
pub(super) struct Resolution {
    answer: Receiver<std::io::Result<Vec<SocketAddr>>>,
    since: Instant,
}

/// The addresses to connect to for `address` (`host:port`), the first last (for
/// [`connect_next`]). An IP address is taken as it is. A host name is resolved by `resolver` on
/// a thread of its own, kept in `resolving`: `None` while it runs, so a resolver that waits holds
/// no round (the connect begins at the first call after its answer). A resolution with no answer
/// within `timeout` counts as a failure at each call until it answers (the broker backs off,
/// up to 10 s, so a late answer may wait that long to be used); its thread is not abandoned,
/// and its answer serves the next try: no second resolution starts for the address meanwhile.
/// (A thread whose broker moved to another address, or whose fetcher went, ends with the
/// system resolver's own timeouts, its answer dropped.)
pub(super) fn addresses(
    address: &str,
    resolving: &mut Option<Resolution>,
    resolver: Resolver,
    timeout: Duration,
) -> Option<std::io::Result<Vec<SocketAddr>>> {
    if let Some(addr) = ip_address(address) {
        return Some(Ok(vec![addr]));
    }
    let Some(resolution) = resolving else {
        let (answer, answered) = mpsc::sync_channel(1);
        let host = address.to_owned();
        let spawned = std::thread::Builder::new()
            .name("citystream-resolve".to_owned())
            // the receiver may be gone (the broker's address changed): the answer is dropped
            .spawn(move || drop(answer.send(resolver(&host))));
        return match spawned {
            Ok(_) => {
                *resolving = Some(Resolution { answer: answered, since: Instant::now() });
                None
            }
            Err(e) => Some(Err(std::io::Error::other(format!("starting the resolution of {address}: {e}")))),
        };
    };
    let answer = match resolution.answer.try_recv() {
        Ok(answer) => answer,
        Err(TryRecvError::Empty) if resolution.since.elapsed() < timeout => return None,
        Err(TryRecvError::Empty) => {
            return Some(Err(std::io::Error::other(format!(
                "{address} has not resolved in {:?}",
                resolution.since.elapsed()
            ))));
        }
        Err(TryRecvError::Disconnected) => Err(std::io::Error::other("its resolution ended without an answer")),
    };
    *resolving = None;
    Some(answer.and_then(|mut addrs| {
        if addrs.is_empty() {
            return Err(std::io::Error::other(format!("{address} resolves to no address")));
        }
        addrs.reverse();
        Ok(addrs)
    }))
}

/// `address` as an IP address and port: `1.2.3.4:9092`, and IPv6 with or without brackets
/// (`[::1]:9092`, or `::1:9092` as a broker's host and port are joined).
fn ip_address(address: &str) -> Option<SocketAddr> {
    if let Ok(addr) = address.parse() {
        return Some(addr);
    }
    let (host, port) = address.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some(SocketAddr::new(host.parse().ok()?, port.parse().ok()?))
}

/// Begins a plaintext connection, without waiting for it, to the next of `untried` that takes
/// one (taken off it; one that fails at once is followed by the next). Returns the socket, to
/// be finished once writable ([`super::Fetcher::ready`]), or the last address's error when
/// none takes one.
pub(super) fn connect_next(untried: &mut Vec<SocketAddr>) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let mut last = std::io::Error::other("no address left to try");
    while let Some(addr) = untried.pop() {
        let begun = Socket::new(Domain::for_address(addr), Type::STREAM, None).and_then(|socket| {
            socket.set_nonblocking(true)?;
            match socket.connect(&addr.into()) {
                Ok(()) => Ok(socket.into()),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket.into()),
                Err(e) => Err(e),
            }
        });
        match begun {
            Ok(begun) => return Ok(begun),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A connected socket made ready for the fetch: no Nagle delay, blocking writes (a request is
/// written whole) with a timeout, reads with one (the fetch reads without waiting, `recv_now`).
pub(super) fn ready_for_io(stream: &TcpStream, read_timeout: Duration, write_timeout: Duration) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(read_timeout))?;
    stream.set_write_timeout(Some(write_timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addresses_are_taken_as_they_are_and_host_names_are_not() {
        let v4: SocketAddr = "10.0.0.7:9092".parse().unwrap();
        let v6: SocketAddr = "[::1]:9092".parse().unwrap();
        assert_eq!(ip_address("10.0.0.7:9092"), Some(v4));
        assert_eq!(ip_address("[::1]:9092"), Some(v6));
        assert_eq!(ip_address("::1:9092"), Some(v6));
        assert_eq!(ip_address("kafka-0.kafka-headless:9092"), None);
        assert_eq!(ip_address("localhost:9092"), None);
        assert_eq!(ip_address("10.0.0.7"), None);
    }
}
