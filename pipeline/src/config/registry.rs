//! The operator registry: every stage `type` in one list, with its config type, a one-line
//! summary and whether its parameters can change while it runs.
//!
//! From the list the [`registry!`] macro makes [`OperatorSpec`] (the parsed `type` and config
//! of a stage), its `TYPES`, the `type` → config parsing of a stage map, the config behind the
//! common [`OperatorConfig`] interface and the live-change rule. Adding an operator is its own
//! file (in `operators/` or `models/`, implementing `OperatorConfig`, and `live_change` when
//! it can be retuned) plus one line here; `tests::every_registered_type_is_recognised_refuses_unknown_keys_and_is_documented`
//! checks each entry.

use citystream_models::{California7Config, FeaturesConfig, InferConfig};
use citystream_operators::LiveChangeError;
use citystream_operators::OperatorConfig;
use citystream_operators::admit::AdmitConfig;
use citystream_operators::alert::AlertConfig;
use citystream_operators::compress::CompressConfig;
use citystream_operators::decode::DecodeConfig;
use citystream_operators::dedup::DedupConfig;
use citystream_operators::dp::DpConfig;
use citystream_operators::filter::FilterConfig;
use citystream_operators::health::SensorHealthConfig;
use citystream_operators::project::ProjectConfig;
use citystream_operators::window::WindowConfig;
use citystream_operators::zstd_column::ZstdConfig;
use serde::de::{self, MapAccess};

use super::Inputs;

macro_rules! registry {
    ($($tag:literal => $variant:ident($cfg:ty), live: $live:ident, $summary:literal;)*) => {
        /// What a stage does, tagged by `type` (one variant per registry entry).
        #[derive(Debug, Clone, PartialEq)]
        pub enum OperatorSpec {
            $(
                #[doc = concat!("`type: ", $tag, "`: ", $summary)]
                $variant(Box<$cfg>),
            )*
        }

        impl OperatorSpec {
            /// Every stage `type`, in registry order.
            pub const TYPES: &'static [&'static str] = &[$($tag),*];

            /// Each stage `type` with its one-line summary.
            pub const SUMMARIES: &'static [(&'static str, &'static str)] = &[$(($tag, $summary)),*];

            /// The operator's configuration behind its common interface.
            pub fn config(&self) -> &dyn OperatorConfig {
                match self {
                    $(OperatorSpec::$variant(c) => c.as_ref(),)*
                }
            }

            /// The `type` name.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(OperatorSpec::$variant(_) => $tag,)*
                }
            }

            /// The config of a stage of type `tag` from the rest of its map (`input` is taken
            /// out of the stream into `input`).
            pub(super) fn parse<'de, A: MapAccess<'de>>(
                tag: &str,
                map: &mut A,
                input: &mut Option<Inputs>,
            ) -> Result<Self, A::Error> {
                match tag {
                    $($tag => Ok(OperatorSpec::$variant(Box::new(super::tagged::rest(map, Some(input))?))),)*
                    other => Err(de::Error::unknown_variant(other, Self::TYPES)),
                }
            }

            /// For two configs of one type: `None` when the type has no live parameters, else
            /// whether `new` can replace `self` while running.
            fn live_change_same_type(&self, new: &OperatorSpec) -> Option<Result<(), LiveChangeError>> {
                match (self, new) {
                    $((OperatorSpec::$variant(a), OperatorSpec::$variant(b)) => registry!(@live $live a b),)*
                    _ => None,
                }
            }
        }
    };
    (@live yes $a:ident $b:ident) => { Some($a.live_change($b)) };
    (@live no $a:ident $b:ident) => {{
        let _ = ($a, $b);
        None
    }};
}

registry! {
    "decode" => Decode(DecodeConfig), live: no, "JSON to typed rows, dead letters and late events";
    "filter" => Filter(FilterConfig), live: yes, "keep rows matching every condition";
    "project" => Project(ProjectConfig), live: no, "keep, order and rename columns";
    "dedup" => Dedup(DedupConfig), live: yes, "drop exact and content duplicates within a horizon";
    "window" => Window(WindowConfig), live: yes, "event-time windows and aggregates per key";
    "compress" => Compress(CompressConfig), live: yes, "swinging-door or deadband compression with an error bound";
    "admit" => Admit(AdmitConfig), live: yes, "rate limits per stream and per key";
    "sensor_health" => SensorHealth(SensorHealthConfig), live: no, "stuck and silent devices: their readings withheld, their status as rows";
    "zstd" => Zstd(ZstdConfig), live: no, "zstd-compress a binary column";
    "dp_aggregate" => DpAggregate(DpConfig), live: no, "differentially private counts, sums and means per window";
    "features" => Features(FeaturesConfig), live: no, "model input rows from one-minute traffic windows and the road graph";
    "infer" => Infer(InferConfig), live: yes, "an ONNX model over feature rows (ONNX Runtime)";
    "california7" => California7(California7Config), live: no, "the model-free California #7 incident detector";
    "alert" => Alert(AlertConfig), live: yes, "an alert rule (hysteresis, duration, suppression, storm limit)";
}

impl OperatorSpec {
    /// The configuration as `Any`, for [`Operator::retune`](citystream_operators::Operator::retune).
    pub fn as_any(&self) -> &dyn std::any::Any {
        self.config()
    }

    /// Whether a running stage configured as `self` can switch to `new` without a restart:
    /// `Ok(true)` if something changed and can be applied live, `Ok(false)` if nothing changed,
    /// and the reason otherwise.
    pub fn live_change(&self, new: &OperatorSpec) -> Result<bool, LiveChangeError> {
        if self == new {
            return Ok(false);
        }
        if self.type_name() != new.type_name() {
            return Err(LiveChangeError::TypeChanged { from: self.type_name(), to: new.type_name() });
        }
        match self.live_change_same_type(new) {
            Some(r) => r.map(|()| true),
            None => Err(LiveChangeError::NotTunable(self.type_name())),
        }
    }
}
