//! A stand-in Kafka broker for tests, speaking just enough of the protocol (ApiVersions v3,
//! Metadata v1) for a librdkafka client to learn it, and able to answer as a KRaft broker does
//! while its controller has it fenced: metadata naming no broker and no partition leader.
//! Every other request goes unanswered.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

const API_METADATA: i16 = 3;
const API_VERSIONS: i16 = 18;
/// The node id the broker gives itself.
pub(crate) const NODE_ID: i32 = 1;
/// The one topic (one partition) its metadata names.
pub(crate) const TOPIC: &str = "fenced-broker-topic";

/// The broker: a listener on a thread of its own, one thread per connection. It lives as long
/// as the test process (the threads are not joined).
pub(crate) struct FencedBroker {
    address: String,
    fenced: Arc<AtomicBool>,
}

impl FencedBroker {
    /// A broker on a free port of 127.0.0.1, not fenced.
    pub(crate) fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the stand-in broker");
        let address = listener.local_addr().expect("its address");
        let fenced = Arc::new(AtomicBool::new(false));
        let shared = fenced.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let fenced = shared.clone();
                std::thread::spawn(move || serve(conn, address.port(), &fenced));
            }
        });
        FencedBroker { address: address.to_string(), fenced }
    }

    /// `host:port`, for `bootstrap.servers`.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// From now on, metadata names no broker and no leader (`true`) or this broker (`false`).
    pub(crate) fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::SeqCst);
    }
}

/// Answers requests on `conn` until it closes.
fn serve(mut conn: TcpStream, port: u16, fenced: &AtomicBool) {
    loop {
        let mut size = [0u8; 4];
        if conn.read_exact(&mut size).is_err() {
            return;
        }
        let mut request = vec![0u8; i32::from_be_bytes(size).max(0) as usize];
        if conn.read_exact(&mut request).is_err() || request.len() < 8 {
            return;
        }
        let api_key = i16::from_be_bytes([request[0], request[1]]);
        let correlation_id = i32::from_be_bytes([request[4], request[5], request[6], request[7]]);
        let body = match api_key {
            API_VERSIONS => api_versions(),
            API_METADATA => metadata(port, fenced.load(Ordering::SeqCst)),
            _ => continue,
        };
        let mut frame = Vec::with_capacity(body.len() + 8);
        frame.extend(((body.len() + 4) as i32).to_be_bytes());
        frame.extend(correlation_id.to_be_bytes());
        frame.extend(body);
        if conn.write_all(&frame).is_err() {
            return;
        }
    }
}

/// ApiVersions v3's answer (a flexible body after a v0 header): ApiVersions 0-3, Metadata 0-1.
fn api_versions() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(0i16.to_be_bytes());
    b.push(3); // compact array: two entries
    for (key, max) in [(API_VERSIONS, 3i16), (API_METADATA, 1)] {
        b.extend(key.to_be_bytes());
        b.extend(0i16.to_be_bytes());
        b.extend(max.to_be_bytes());
        b.push(0); // no tagged fields
    }
    b.extend(0i32.to_be_bytes()); // throttle time
    b.push(0);
    b
}

/// Metadata v1's answer: this broker and the topic's partition led by it, or, `fenced`, no
/// broker and no leader.
fn metadata(port: u16, fenced: bool) -> Vec<u8> {
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as i16).to_be_bytes());
        b.extend(s.as_bytes());
    };
    let mut b = Vec::new();
    if fenced {
        b.extend(0i32.to_be_bytes());
    } else {
        b.extend(1i32.to_be_bytes());
        b.extend(NODE_ID.to_be_bytes());
        string(&mut b, "127.0.0.1");
        b.extend(i32::from(port).to_be_bytes());
        b.extend((-1i16).to_be_bytes()); // no rack
    }
    b.extend((if fenced { -1 } else { NODE_ID }).to_be_bytes()); // controller
    b.extend(1i32.to_be_bytes());
    b.extend(0i16.to_be_bytes());
    string(&mut b, TOPIC);
    b.push(0); // not internal
    b.extend(1i32.to_be_bytes());
    b.extend((if fenced { 5i16 } else { 0 }).to_be_bytes()); // LEADER_NOT_AVAILABLE
    b.extend(0i32.to_be_bytes());
    let leader = if fenced { -1 } else { NODE_ID };
    b.extend(leader.to_be_bytes());
    for _ in 0..2 {
        // replicas, then in-sync replicas
        b.extend(1i32.to_be_bytes());
        b.extend(NODE_ID.to_be_bytes());
    }
    b
}
