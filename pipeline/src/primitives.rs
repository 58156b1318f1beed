//! Config primitives every component's YAML uses: environment-expanded strings, durations
//! and stream references. A leaf: it imports nothing of the pipeline, so connectors, the
//! control center and the energy account own their config types without importing the planner.

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

pub use citystream_operators::{Duration, EnvString};

/// One stream reference or a list of them, each with its location in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs(pub Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for Inputs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrMany(Vec<Spanned<String>>, bool);
        impl<'de> Deserialize<'de> for OneOrMany {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = OneOrMany;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a stream name such as `city.traffic`, or a list of them")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                        Ok(OneOrMany(vec![Spanned::new(v.to_owned(), Location::UNKNOWN, Location::UNKNOWN)], true))
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                        let mut v = Vec::new();
                        while let Some(item) = seq.next_element::<Spanned<String>>()? {
                            v.push(item);
                        }
                        Ok(OneOrMany(v, false))
                    }
                }
                d.deserialize_any(V)
            }
        }
        let spanned = Spanned::<OneOrMany>::deserialize(d)?;
        let OneOrMany(mut items, single) = spanned.value;
        if single {
            items[0].referenced = spanned.referenced;
            items[0].defined = spanned.defined;
        }
        Ok(Inputs(items))
    }
}
