//! Kafka's fetch on the wire: the Fetch request (version 11, no fetch session), its response,
//! and the record batches (magic 2) a partition's data is made of, decompressed (gzip, snappy
//! in both of its framings, lz4 frames, zstd) and, when reading committed data, without the
//! records of aborted transactions.
//!
//! Every read is bounds-checked: a malformed response or batch is an error, never a panic.

use std::io::Read as _;

/// The Fetch API key and the version spoken (the last one that names topics rather than topic
/// ids and needs no tagged fields; Kafka 4 serves 4 to 17).
const FETCH: i16 = 1;
const FETCH_VERSION: i16 = 11;

/// Largest record batch body decompressed, bytes: a batch that claims more is refused (a
/// broker validates what producers send, so only a corrupt log would).
pub const MAX_DECOMPRESSED: usize = 256 << 20;

/// A malformed response or record batch.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

type Result<T> = std::result::Result<T, WireError>;

fn err<T>(message: impl Into<String>) -> Result<T> {
    Err(WireError(message.into()))
}

/// A cursor over a response; every read is bounds-checked.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cur<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cur { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let Some(end) = self.at.checked_add(n).filter(|&e| e <= self.b.len()) else {
            return err(format!("truncated: {n} bytes wanted at {} of {}", self.at, self.b.len()));
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn i8(&mut self) -> Result<i8> {
        Ok(i8::from_be_bytes(self.array()?))
    }
    fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    /// A count of array elements (-1: null, read as none).
    fn count(&mut self) -> Result<usize> {
        Ok(usize::try_from(self.i32()?).unwrap_or(0))
    }
    fn string(&mut self) -> Result<&'a str> {
        let n = self.i16()?;
        let bytes = if n < 0 { &[][..] } else { self.take(n as usize)? };
        std::str::from_utf8(bytes).map_err(|_| WireError("a string that is not UTF-8".into()))
    }
    /// A zigzag varint (the record fields: six or more per record, most of one byte).
    #[inline]
    fn varint(&mut self) -> Result<i64> {
        let mut v: u64 = 0;
        let mut at = self.at;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.b.get(at) else { return err("truncated: a varint runs past the end") };
            at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                self.at = at;
                return Ok((v >> 1) as i64 ^ -((v & 1) as i64));
            }
        }
        err("a varint longer than 10 bytes")
    }
    /// Bytes of a varint length (-1: null, read as empty).
    fn var_bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.varint()?;
        if n < 0 {
            return Ok(&[]);
        }
        let n = usize::try_from(n).map_err(|_| WireError("a length past the address space".into()))?;
        self.take(n)
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
}

/// What a Fetch request asks for, besides its partitions.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    /// How long the broker may wait for `min_bytes`.
    pub max_wait_ms: i32,
    /// Bytes of the whole response (the first batch of the first partition comes whatever its size).
    pub max_bytes: i32,
    /// Bytes per partition (likewise).
    pub partition_bytes: i32,
    /// Only committed data (up to the last stable offset), with the aborted transactions listed.
    pub read_committed: bool,
}

/// Writes a whole Fetch request (its size first) into `out`: `topics` are (topic, [(partition,
/// offset)]).
pub fn encode_fetch(
    out: &mut Vec<u8>,
    correlation: i32,
    client_id: &str,
    limits: FetchLimits,
    topics: &[(&str, Vec<(i32, i64)>)],
) {
    out.clear();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&FETCH.to_be_bytes());
    out.extend_from_slice(&FETCH_VERSION.to_be_bytes());
    out.extend_from_slice(&correlation.to_be_bytes());
    let client = &client_id.as_bytes()[..client_id.len().min(i16::MAX as usize)];
    out.extend_from_slice(&(client.len() as i16).to_be_bytes());
    out.extend_from_slice(client);
    out.extend_from_slice(&(-1i32).to_be_bytes()); // replica_id: a consumer
    out.extend_from_slice(&limits.max_wait_ms.to_be_bytes());
    out.extend_from_slice(&1i32.to_be_bytes()); // min_bytes
    out.extend_from_slice(&limits.max_bytes.to_be_bytes());
    out.push(u8::from(limits.read_committed)); // isolation_level
    out.extend_from_slice(&0i32.to_be_bytes()); // session_id
    out.extend_from_slice(&(-1i32).to_be_bytes()); // session_epoch: no session
    out.extend_from_slice(&(topics.len() as i32).to_be_bytes());
    for (topic, partitions) in topics {
        out.extend_from_slice(&(topic.len() as i16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(&(partitions.len() as i32).to_be_bytes());
        for &(p, offset) in partitions {
            out.extend_from_slice(&p.to_be_bytes());
            out.extend_from_slice(&(-1i32).to_be_bytes()); // current_leader_epoch: unknown
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&(-1i64).to_be_bytes()); // log_start_offset (followers only)
            out.extend_from_slice(&limits.partition_bytes.to_be_bytes());
        }
    }
    out.extend_from_slice(&0i32.to_be_bytes()); // forgotten_topics_data
    out.extend_from_slice(&0i16.to_be_bytes()); // rack_id: ""
    let n = (out.len() - 4) as i32;
    out[..4].copy_from_slice(&n.to_be_bytes());
}

/// One partition's part of a Fetch response.
#[derive(Debug)]
pub struct PartitionData<'a> {
    /// The partition's topic …
    pub topic: &'a str,
    /// … and number.
    pub partition: i32,
    /// Kafka's error code (0: none).
    pub error: i16,
    /// The offset after the last record replicated.
    pub high_watermark: i64,
    /// The offset before which every transaction is decided (read_committed reads up to it).
    pub last_stable_offset: i64,
    /// (producer id, first offset) of the aborted transactions in the data (read_committed).
    pub aborted: Vec<(i64, i64)>,
    /// Record batches; the last one may be cut at the byte limit.
    pub records: &'a [u8],
}

/// A Fetch response's body (after the correlation id): its top-level error code and its
/// partitions.
pub fn parse_fetch_response(body: &[u8]) -> Result<(i16, Vec<PartitionData<'_>>)> {
    let mut c = Cur::new(body);
    let _throttle_ms = c.i32()?;
    let error = c.i16()?;
    let _session = c.i32()?;
    let mut out = Vec::new();
    for _ in 0..c.count()? {
        let topic = c.string()?;
        for _ in 0..c.count()? {
            let partition = c.i32()?;
            let error = c.i16()?;
            let high_watermark = c.i64()?;
            let last_stable_offset = c.i64()?;
            let _log_start = c.i64()?;
            let n = c.i32()?;
            let mut aborted = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(1024));
            for _ in 0..n.max(0) {
                aborted.push((c.i64()?, c.i64()?));
            }
            let _preferred_read_replica = c.i32()?;
            let n = c.i32()?;
            let records = if n > 0 { c.take(n as usize)? } else { &[][..] };
            out.push(PartitionData { topic, partition, error, high_watermark, last_stable_offset, aborted, records });
        }
    }
    Ok((error, out))
}

/// Where the fetch after `set` (fetched from `from`) starts: past its last whole batch that
/// ends at or after `from` ([`RecordSet::next_offset`] once every record is read), from the
/// batch headers alone — so the next request can be sent before the records are read.
pub fn next_offset(set: &[u8], from: i64) -> i64 {
    // base offset (8), length (4), then leader epoch (4), magic (1), crc (4), attributes (2),
    // last offset delta (4)
    const LAST_DELTA_AT: usize = 12 + 4 + 1 + 4 + 2;
    let mut next = from;
    let mut at = 0usize;
    while set.len() - at >= LAST_DELTA_AT + 4 {
        let field = |i: usize, n: usize| &set[at + i..at + i + n];
        let base = i64::from_be_bytes(field(0, 8).try_into().unwrap_or_default());
        let Ok(len) = usize::try_from(i32::from_be_bytes(field(8, 4).try_into().unwrap_or_default())) else { break };
        if set.len() - at - 12 < len || len < LAST_DELTA_AT + 4 - 12 {
            break;
        }
        let last_delta = i32::from_be_bytes(field(LAST_DELTA_AT, 4).try_into().unwrap_or_default());
        let last = base.wrapping_add(i64::from(last_delta));
        if last >= from {
            next = next.max(last.wrapping_add(1));
        }
        at += 12 + len;
    }
    next
}

/// One record read.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Its offset in the partition.
    pub offset: i64,
    /// Its time, ms: the producer's create time, or the broker's append time where the batch
    /// says so; `None` if it has none (-1).
    pub timestamp: Option<i64>,
    /// The value (empty for a null one).
    pub value: &'a [u8],
}

/// Decompression state reused from batch to batch.
pub struct Decoders {
    zstd: zstd::bulk::Decompressor<'static>,
    plain: Vec<u8>,
}

impl Decoders {
    /// Decoders with no buffer yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Decoders { zstd: zstd::bulk::Decompressor::new()?, plain: Vec::new() })
    }

    /// Decompresses `body` (codec `codec` of the batch attributes) into `self.plain`.
    fn decompress(&mut self, codec: i16, body: &[u8]) -> Result<()> {
        self.plain.clear();
        let limit = MAX_DECOMPRESSED as u64;
        let too_big = || WireError(format!("a record batch larger than {MAX_DECOMPRESSED} bytes decompressed"));
        match codec {
            1 => {
                let mut d = flate2::read::MultiGzDecoder::new(body).take(limit + 1);
                d.read_to_end(&mut self.plain).map_err(|e| WireError(format!("gzip: {e}")))?;
            }
            2 => self.snappy(body)?,
            3 => {
                let mut d = lz4_flex::frame::FrameDecoder::new(body).take(limit + 1);
                d.read_to_end(&mut self.plain).map_err(|e| WireError(format!("lz4: {e}")))?;
            }
            4 => {
                // one context for every batch where the frame gives its size; otherwise (or more
                // than one frame) a decoder of its own
                let size = zstd::zstd_safe::get_frame_content_size(body).ok().flatten().filter(|&n| n <= limit);
                let bulk = size.is_some_and(|n| {
                    self.plain.reserve(n as usize);
                    self.zstd.decompress_to_buffer(body, &mut self.plain).is_ok()
                });
                if !bulk {
                    self.plain.clear();
                    let d = zstd::stream::read::Decoder::new(body).map_err(|e| WireError(format!("zstd: {e}")))?;
                    d.take(limit + 1).read_to_end(&mut self.plain).map_err(|e| WireError(format!("zstd: {e}")))?;
                }
            }
            c => return err(format!("compression codec {c}, which Kafka does not define")),
        }
        if self.plain.len() > MAX_DECOMPRESSED {
            return Err(too_big());
        }
        Ok(())
    }

    /// Snappy as Kafka's clients write it: the Java client's xerial framing (a magic header,
    /// then blocks of a length and a raw snappy block), or one raw block (librdkafka).
    fn snappy(&mut self, body: &[u8]) -> Result<()> {
        const XERIAL: &[u8] = b"\x82SNAPPY\x00";
        let mut raw = snap::raw::Decoder::new();
        let mut block = |input: &[u8], plain: &mut Vec<u8>| -> Result<()> {
            let n = snap::raw::decompress_len(input).map_err(|e| WireError(format!("snappy: {e}")))?;
            if plain.len() + n > MAX_DECOMPRESSED {
                return err(format!("a record batch larger than {MAX_DECOMPRESSED} bytes decompressed"));
            }
            let at = plain.len();
            plain.resize(at + n, 0);
            raw.decompress(input, &mut plain[at..]).map_err(|e| WireError(format!("snappy: {e}")))?;
            Ok(())
        };
        if body.starts_with(XERIAL) {
            let mut c = Cur::new(body);
            c.take(XERIAL.len() + 8)?; // magic, version, compatible version
            while c.left() > 0 {
                let n = usize::try_from(c.i32()?).map_err(|_| WireError("snappy: a negative block size".into()))?;
                block(c.take(n)?, &mut self.plain)?;
            }
            Ok(())
        } else {
            block(body, &mut self.plain)
        }
    }
}

/// Where the records of the batch at hand are.
#[derive(Clone, Copy)]
enum Body {
    /// In the record set itself (uncompressed), from..to.
    Set(usize, usize),
    /// In the decoders' buffer.
    Plain,
}

/// The records of one partition's record set, at or after a fetch offset, in order (a lending
/// iterator: [`RecordSet::next`]). Control batches (transaction markers) are skipped, and so —
/// when the set was fetched reading committed data — are the batches of the aborted
/// transactions the response listed. A batch it cannot decompress, or the rest of one whose
/// records do not parse, is skipped too and reported ([`RecordSet::skipped`]); a batch whose
/// header does not parse is an error (where it ends is unknown).
pub struct RecordSet<'a> {
    set: Cur<'a>,
    from: i64,
    dec: &'a mut Decoders,
    /// After the last whole batch read (where the next fetch starts).
    next_offset: i64,
    /// (producer id, first offset) of aborted transactions not reached yet, by first offset.
    aborted: Vec<(i64, i64)>,
    /// Producers whose aborted transaction the batches read are in.
    aborting: Vec<i64>,
    /// The batch at hand: its records, how many are left, its base offset and times.
    body: Body,
    at: usize,
    left: i32,
    base: i64,
    base_ts: i64,
    max_ts: i64,
    log_append_time: bool,
    /// Batches (or their rest) skipped because they could not be decompressed or their records
    /// did not parse: (first offset, last offset, why).
    pub skipped: Vec<(i64, i64, String)>,
}

impl<'a> RecordSet<'a> {
    /// The records of `set` at or after `from`; `aborted` as the response listed it (empty when
    /// reading uncommitted data).
    pub fn new(set: &'a [u8], from: i64, aborted: &[(i64, i64)], dec: &'a mut Decoders) -> Self {
        let mut aborted = aborted.to_vec();
        aborted.sort_by_key(|&(_, first)| std::cmp::Reverse(first));
        RecordSet {
            set: Cur::new(set),
            from,
            dec,
            next_offset: from,
            aborted,
            aborting: Vec::new(),
            body: Body::Plain,
            at: 0,
            left: 0,
            base: 0,
            base_ts: 0,
            max_ts: 0,
            log_append_time: false,
            skipped: Vec::new(),
        }
    }

    /// The offset after the last whole batch read: where the next fetch starts (a batch cut at
    /// the response's byte limit is fetched again).
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The next record at or after the fetch offset, `None` after the last one.
    #[allow(clippy::should_implement_trait)] // lending: the record borrows the set
    pub fn next(&mut self) -> Result<Option<Record<'_>>> {
        // the record's place is found first and borrowed last (a borrow returned from a loop
        // would hold `self` for the loop's later turns)
        let (offset, ts, value) = loop {
            if self.left == 0 {
                if !self.next_batch()? {
                    return Ok(None);
                }
                continue;
            }
            self.left -= 1;
            match self.record() {
                Ok(Some(r)) => break r,
                Ok(None) => {}
                Err(e) => {
                    // the records read stay read; the rest of the batch is skipped (its
                    // offsets are behind `next_offset` already)
                    self.skipped.push((self.base, self.next_offset - 1, e.0));
                    self.left = 0;
                }
            }
        };
        let ts = if self.log_append_time { self.max_ts } else { self.base_ts.wrapping_add(ts) };
        let value = &self.body_bytes()[value];
        Ok(Some(Record { offset, timestamp: (ts >= 0).then_some(ts), value }))
    }

    /// Reads the batch's next record: its offset, time delta and where its value lies, or
    /// `None` for one before the fetch offset.
    fn record(&mut self) -> Result<Option<(i64, i64, std::ops::Range<usize>)>> {
        let body = self.body_bytes();
        let mut r = Cur { b: body, at: self.at };
        let _len = r.varint()?;
        let _attributes = r.i8()?;
        let ts_delta = r.varint()?;
        let offset = self.base.wrapping_add(r.varint()?);
        let _key = r.var_bytes()?;
        let value_len = r.var_bytes()?.len();
        let value = r.at - value_len..r.at;
        for _ in 0..r.varint()?.max(0) {
            r.var_bytes()?;
            r.var_bytes()?;
        }
        let (at, len) = (r.at, body.len());
        self.at = at;
        if self.left == 0 && at != len {
            return err(format!("{} bytes after the last record", len - at));
        }
        Ok((offset >= self.from).then_some((offset, ts_delta, value)))
    }

    /// The records of the batch at hand.
    fn body_bytes(&self) -> &[u8] {
        match self.body {
            Body::Set(from, to) => &self.set.b[from..to],
            Body::Plain => &self.dec.plain[..],
        }
    }

    /// Moves to the next batch with records to read; false at the end of the set (or at a
    /// batch cut at the byte limit).
    fn next_batch(&mut self) -> Result<bool> {
        loop {
            if self.set.left() < 12 {
                return Ok(false);
            }
            let base = self.set.i64()?;
            let len = usize::try_from(self.set.i32()?).map_err(|_| WireError("a negative batch length".into()))?;
            if self.set.left() < len {
                // cut at the byte limit: fetched again from its start
                self.set.at = self.set.b.len();
                return Ok(false);
            }
            let batch_at = self.set.at;
            let mut b = Cur::new(self.set.take(len)?);
            let _leader_epoch = b.i32()?;
            let magic = b.i8()?;
            if magic != 2 {
                return err(format!(
                    "a record batch of magic {magic} at offset {base}: the native fetch reads magic 2 (Kafka 0.11 \
                     on) only; `fetch: librdkafka` reads older message sets"
                ));
            }
            let _crc = b.i32()?;
            let attributes = b.i16()?;
            let last_delta = b.i32()?;
            let base_ts = b.i64()?;
            let max_ts = b.i64()?;
            let producer = b.i64()?;
            let _producer_epoch = b.i16()?;
            let _base_sequence = b.i32()?;
            let count = b.i32()?;
            let last = base.wrapping_add(i64::from(last_delta));
            if last < self.from {
                continue; // wholly before the fetch offset
            }
            self.next_offset = self.next_offset.max(last.wrapping_add(1));
            // the aborted transactions that start by this batch's last offset
            while let Some(&(pid, first)) = self.aborted.last()
                && first <= last
            {
                self.aborted.pop();
                self.aborting.push(pid);
            }
            let transactional = attributes & 0x10 != 0;
            if attributes & 0x20 != 0 {
                // a control batch: an abort marker ends its producer's aborted transaction
                let mut r = Cur::new(b.take(b.left())?);
                if transactional && count > 0 && r.varint().is_ok() && r.i8().is_ok() && r.varint().is_ok() {
                    let _ = r.varint();
                    if let Ok(key) = r.var_bytes()
                        && key.len() >= 4
                        && key[2..4] == [0, 0]
                    {
                        self.aborting.retain(|&p| p != producer);
                    }
                }
                continue;
            }
            if transactional && self.aborting.contains(&producer) {
                continue; // part of an aborted transaction
            }
            let body_at = batch_at + b.at;
            let body = &self.set.b[body_at..batch_at + len];
            let codec = attributes & 0x7;
            self.body = if codec == 0 {
                Body::Set(body_at, batch_at + len)
            } else {
                match self.dec.decompress(codec, body) {
                    Ok(()) => Body::Plain,
                    Err(e) => {
                        self.skipped.push((base, last, e.0));
                        continue;
                    }
                }
            };
            self.at = 0;
            self.left = count.max(0);
            self.base = base;
            self.base_ts = base_ts;
            self.max_ts = max_ts;
            self.log_append_time = attributes & 0x8 != 0;
            if self.left > 0 {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            let b = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    /// A record batch of `values` from `base`, compressed with `codec`, with `attributes`
    /// besides (0x10 transactional, 0x20 control) and `producer`'s id.
    pub(crate) fn batch(base: i64, values: &[&[u8]], codec: i16, attributes: i16, producer: i64) -> Vec<u8> {
        use std::io::Write as _;
        let mut records = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut r = vec![0u8];
            varint(&mut r, i as i64 * 10);
            varint(&mut r, i as i64);
            if attributes & 0x20 != 0 {
                // a control record: its key is (version 0, type), its value the marker
                varint(&mut r, 4);
                r.extend_from_slice(&[0, 0, 0, v[0]]);
                varint(&mut r, 0);
            } else {
                varint(&mut r, -1);
                varint(&mut r, v.len() as i64);
                r.extend_from_slice(v);
            }
            varint(&mut r, 1);
            varint(&mut r, 1);
            r.push(b'h');
            varint(&mut r, 0);
            varint(&mut records, r.len() as i64);
            records.extend_from_slice(&r);
        }
        let records = match codec {
            0 => records,
            1 => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&records).unwrap();
                e.finish().unwrap()
            }
            2 => snap::raw::Encoder::new().compress_vec(&records).unwrap(),
            3 => {
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                e.write_all(&records).unwrap();
                e.finish().unwrap()
            }
            4 => zstd::bulk::compress(&records, 3).unwrap(),
            _ => unreachable!(),
        };
        let mut b = Vec::new();
        b.extend_from_slice(&0i32.to_be_bytes());
        b.push(2);
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&(codec | attributes).to_be_bytes());
        b.extend_from_slice(&(values.len() as i32 - 1).to_be_bytes());
        b.extend_from_slice(&1_000i64.to_be_bytes());
        b.extend_from_slice(&1_000i64.to_be_bytes());
        b.extend_from_slice(&producer.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i32.to_be_bytes());
        b.extend_from_slice(&(values.len() as i32).to_be_bytes());
        b.extend_from_slice(&records);
        let mut out = base.to_be_bytes().to_vec();
        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
        out.extend_from_slice(&b);
        out
    }

    /// The records (offset, value), the next offset and why batches were skipped.
    type Read = (Vec<(i64, Vec<u8>)>, i64, Vec<String>);

    fn read(set: &[u8], from: i64, aborted: &[(i64, i64)]) -> Result<Read> {
        let mut dec = Decoders::new().unwrap();
        let mut rs = RecordSet::new(set, from, aborted, &mut dec);
        let mut out = Vec::new();
        while let Some(r) = rs.next()? {
            out.push((r.offset, r.value.to_vec()));
        }
        Ok((out, rs.next_offset(), rs.skipped.into_iter().map(|(.., why)| why).collect()))
    }

    fn values(records: &[(i64, Vec<u8>)]) -> Vec<&str> {
        records.iter().map(|(_, v)| std::str::from_utf8(v).unwrap()).collect()
    }

    #[test]
    fn every_codec_is_read_and_a_cut_last_batch_is_left_for_the_next_fetch() {
        let mut set = batch(0, &[b"a", b"bb"], 0, 0, -1);
        set.extend(batch(2, &[b"gz", b"gzip"], 1, 0, -1));
        set.extend(batch(4, &[b"snappy"], 2, 0, -1));
        set.extend(batch(5, &[b"lz4", b"lz4!"], 3, 0, -1));
        set.extend(batch(7, &[b"zstd"], 4, 0, -1));
        let cut = batch(8, &[b"ff"], 0, 0, -1);
        set.extend_from_slice(&cut[..cut.len() - 3]);
        let (records, next, skipped) = read(&set, 0, &[]).unwrap();
        assert_eq!(next_offset(&set, 0), next, "the headers alone tell where the next fetch starts");
        assert_eq!(next_offset(&set, 3), next);
        assert_eq!(next_offset(&set[..20], 0), 0, "no whole batch");
        assert_eq!(values(&records), ["a", "bb", "gz", "gzip", "snappy", "lz4", "lz4!", "zstd"]);
        assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>());
        assert_eq!((next, skipped.len()), (8, 0), "the cut batch is fetched again from its start");
    }

    #[test]
    fn the_java_clients_framed_snappy_is_read() {
        let mut set = batch(0, &[b"java", b"snappy"], 0, 0, -1);
        // re-frame the records as xerial blocks of at most 5 bytes of input each
        let records_at = 12 + 49;
        let records = set[records_at..].to_vec();
        let mut framed = b"\x82SNAPPY\x00".to_vec();
        framed.extend_from_slice(&1i32.to_be_bytes());
        framed.extend_from_slice(&1i32.to_be_bytes());
        for chunk in records.chunks(5) {
            let block = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
            framed.extend_from_slice(&(block.len() as i32).to_be_bytes());
            framed.extend_from_slice(&block);
        }
        set.truncate(records_at);
        set.extend_from_slice(&framed);
        set[12 + 4 + 1 + 4..12 + 4 + 1 + 4 + 2].copy_from_slice(&2i16.to_be_bytes());
        let len = (set.len() - 12) as i32;
        set[8..12].copy_from_slice(&len.to_be_bytes());
        let (records, next, _) = read(&set, 0, &[]).unwrap();
        assert_eq!(values(&records), ["java", "snappy"]);
        assert_eq!(next, 2);
    }

    #[test]
    fn records_before_the_fetch_offset_and_control_batches_are_skipped() {
        let mut set = batch(10, &[b"x", b"y", b"z"], 0, 0, -1);
        set.extend(batch(13, &[&[1]], 0, 0x30, 7));
        set.extend(batch(14, &[b"w"], 4, 0, -1));
        let (records, next, _) = read(&set, 11, &[]).unwrap();
        assert_eq!(values(&records), ["y", "z", "w"]);
        assert_eq!(next, 15);
    }

    #[test]
    fn an_aborted_transaction_is_skipped_and_a_committed_one_read() {
        // producer 7 aborts offsets 0-1 (marker at 2); producer 8 commits 3 (marker at 4);
        // producer 7 then writes 5 in a transaction of its own that commits (marker at 6)
        let mut set = batch(0, &[b"aborted-1", b"aborted-2"], 4, 0x10, 7);
        set.extend(batch(2, &[&[0]], 0, 0x30, 7));
        set.extend(batch(3, &[b"committed"], 0, 0x10, 8));
        set.extend(batch(4, &[&[1]], 0, 0x30, 8));
        set.extend(batch(5, &[b"committed-later"], 0, 0x10, 7));
        set.extend(batch(6, &[&[1]], 0, 0x30, 7));
        let (records, next, _) = read(&set, 0, &[(7, 0)]).unwrap();
        assert_eq!(values(&records), ["committed", "committed-later"]);
        assert_eq!((next, next_offset(&set, 0)), (7, 7), "past the last marker");
        // read uncommitted (no aborted list): everything but the markers
        let (records, ..) = read(&set, 0, &[]).unwrap();
        assert_eq!(records.len(), 4);
    }

    #[test]
    fn a_batch_that_does_not_decompress_is_skipped_and_reported() {
        // a zstd batch whose body is not zstd
        let mut bad = batch(0, &[b"a"], 4, 0, -1);
        bad.truncate(12 + 49);
        bad.extend_from_slice(b"not zstd at all");
        let len = (bad.len() - 12) as i32;
        bad[8..12].copy_from_slice(&len.to_be_bytes());
        bad.extend(batch(1, &[b"b"], 0, 0, -1));
        let (records, next, skipped) = read(&bad, 0, &[]).unwrap();
        assert_eq!(values(&records), ["b"]);
        assert_eq!((next, skipped.len()), (2, 1));
    }

    #[test]
    fn a_batch_claiming_more_records_than_it_holds_is_skipped_past_what_it_holds() {
        let mut set = batch(0, &[b"a"], 0, 0, -1);
        let count_at = 12 + 4 + 1 + 4 + 2 + 4 + 8 + 8 + 8 + 2 + 4;
        set[count_at..count_at + 4].copy_from_slice(&2i32.to_be_bytes());
        set.extend(batch(1, &[b"b"], 0, 0, -1));
        let (records, next, skipped) = read(&set, 0, &[]).unwrap();
        assert_eq!(values(&records), ["a", "b"], "the record it holds, then the next batch");
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("truncated"), "{skipped:?}");
        assert_eq!(next, 2);
    }

    #[test]
    fn a_batch_header_that_does_not_parse_is_an_error() {
        let mut set = batch(0, &[b"a"], 0, 0, -1);
        set[12 + 4] = 1; // magic 1
        let e = read(&set, 0, &[]).unwrap_err();
        assert!(e.0.contains("magic 1"), "{e}");
    }

    #[test]
    fn a_request_and_a_response_round_trip_their_fields() {
        let mut req = Vec::new();
        let limits =
            FetchLimits { max_wait_ms: 100, max_bytes: 1 << 20, partition_bytes: 1 << 16, read_committed: true };
        encode_fetch(&mut req, 42, "c", limits, &[("t", vec![(0, 5), (2, 9)])]);
        assert_eq!(i32::from_be_bytes(req[..4].try_into().unwrap()) as usize, req.len() - 4);
        assert_eq!(&req[4..8], &[0, 1, 0, 11], "Fetch v11");
        // a response with one partition and a record set
        let set = batch(5, &[b"v"], 0, 0, -1);
        let mut resp = Vec::new();
        resp.extend_from_slice(&0i32.to_be_bytes());
        resp.extend_from_slice(&0i16.to_be_bytes());
        resp.extend_from_slice(&0i32.to_be_bytes());
        resp.extend_from_slice(&1i32.to_be_bytes());
        resp.extend_from_slice(&1i16.to_be_bytes());
        resp.push(b't');
        resp.extend_from_slice(&1i32.to_be_bytes());
        resp.extend_from_slice(&2i32.to_be_bytes());
        resp.extend_from_slice(&0i16.to_be_bytes());
        resp.extend_from_slice(&6i64.to_be_bytes());
        resp.extend_from_slice(&6i64.to_be_bytes());
        resp.extend_from_slice(&0i64.to_be_bytes());
        resp.extend_from_slice(&1i32.to_be_bytes());
        resp.extend_from_slice(&3i64.to_be_bytes());
        resp.extend_from_slice(&4i64.to_be_bytes());
        resp.extend_from_slice(&(-1i32).to_be_bytes());
        resp.extend_from_slice(&(set.len() as i32).to_be_bytes());
        resp.extend_from_slice(&set);
        let (error, parts) = parse_fetch_response(&resp).unwrap();
        assert_eq!(error, 0);
        assert_eq!(parts.len(), 1);
        let p = &parts[0];
        assert_eq!((p.topic, p.partition, p.high_watermark, p.aborted.clone()), ("t", 2, 6, vec![(3, 4)]));
        assert_eq!(p.records, &set[..]);
        // cut anywhere: an error, not a panic
        for n in 0..resp.len() - set.len() {
            assert!(parse_fetch_response(&resp[..n]).is_err(), "cut at {n}");
        }
    }
}
