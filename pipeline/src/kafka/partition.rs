//! Which partition a keyed message belongs to: the Java clients' rule (murmur2 of the key
//! bytes, sign bit cleared, modulo the partition count), which the producers here use too
//! (librdkafka's `murmur2_random` partitioner), so a topic written by citystream and one
//! written by a Java service put a key in the same partition. The rule itself lives with the
//! operators (`decode` checks rows against it): [`citystream_operators::partitioning`].

pub use citystream_operators::partitioning::{murmur2, partition_of};

/// The producer setting that makes librdkafka choose partitions this way.
pub const PARTITIONER: (&str, &str) = ("partitioner", "murmur2_random");
