//! Deserialization of `type`-tagged maps without buffering.
//!
//! serde's internally tagged enums buffer the whole map before choosing a variant, which loses
//! the line, column and key path of every error inside. Here `type` must be the first key: its
//! value picks the variant, and the rest of the map streams straight into the variant's struct
//! (so `deny_unknown_fields`, locations and key paths all keep working). A stage's `input` key
//! is taken out of the stream on the way, so operator configs need not know about wiring.

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::Spanned;

use super::{Inputs, OperatorSpec, SinkConfig, SourceConfig, StageConfig};

/// The rest of a map after `type`, minus an `input` key (captured into `input` when asked).
struct Rest<'a, A> {
    map: &'a mut A,
    input: Option<&'a mut Option<Inputs>>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Rest<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.map.next_key::<String>()? else { return Ok(None) };
            if key == "type" {
                return Err(de::Error::custom("`type` is given twice"));
            }
            if key == "input"
                && let Some(slot) = self.input.as_deref_mut()
            {
                if slot.is_some() {
                    return Err(de::Error::custom("`input` is given twice"));
                }
                *slot = Some(self.map.next_value::<Inputs>()?);
                continue;
            }
            return seed.deserialize(key.into_deserializer()).map(Some);
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

pub(super) fn rest<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    map: &mut A,
    input: Option<&mut Option<Inputs>>,
) -> Result<T, A::Error> {
    T::deserialize(de::value::MapAccessDeserializer::new(Rest { map, input }))
}

/// Reads the first key, which must be `type`, and its value.
fn read_type<'de, A: MapAccess<'de>>(map: &mut A, what: &str) -> Result<Spanned<String>, A::Error> {
    match map.next_key::<String>()? {
        Some(k) if k == "type" => map.next_value::<Spanned<String>>(),
        Some(k) => Err(de::Error::custom(format!("the first key of a {what} must be `type`, found `{k}`"))),
        None => Err(de::Error::custom(format!("a {what} needs a `type`"))),
    }
}

struct TaggedVisitor<T>(&'static str, std::marker::PhantomData<T>);

macro_rules! tagged {
    ($ty:ty, $what:literal, |$map:ident, $tag:ident| $body:expr) => {
        impl<'de> Visitor<'de> for TaggedVisitor<$ty> {
            type Value = $ty;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a {} (a map whose first key is `type`)", self.0)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut $map: A) -> Result<$ty, A::Error> {
                let $tag = read_type(&mut $map, $what)?;
                let map = &mut $map;
                let _ = map;
                $body
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_map(TaggedVisitor::<$ty>($what, std::marker::PhantomData))
            }
        }
    };
}

tagged!(SourceConfig, "source", |map, tag| match tag.value.as_str() {
    "simulator" => Ok(SourceConfig::Simulator(Box::new(rest(&mut map, None)?))),
    #[cfg(feature = "kafka")]
    "kafka" => Ok(SourceConfig::Kafka(Box::new(rest(&mut map, None)?))),
    "files" => Ok(SourceConfig::Files(Box::new(rest(&mut map, None)?))),
    other => Err(de::Error::unknown_variant(other, SourceConfig::TYPES)),
});

tagged!(SinkConfig, "sink", |map, tag| match tag.value.as_str() {
    "parquet" => Ok(SinkConfig::Parquet(rest(&mut map, None)?)),
    "control_center" => Ok(SinkConfig::ControlCenter(Box::new(rest(&mut map, None)?))),
    #[cfg(feature = "kafka")]
    "kafka" => Ok(SinkConfig::Kafka(rest(&mut map, None)?)),
    other => Err(de::Error::unknown_variant(other, SinkConfig::TYPES)),
});

tagged!(StageConfig, "stage", |map, tag| {
    let mut input = None;
    let op = OperatorSpec::parse(tag.value.as_str(), &mut map, &mut input)?;
    let input = input.ok_or_else(|| de::Error::missing_field("input"))?;
    Ok(StageConfig { input, op, location: tag.referenced })
});
