//! The live per-location raise levels that calibration sets and rules read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Live per-location raise levels, per rule, shared by one pipeline's `alert` stages and its
/// control center: calibration writes them, the rules read them (a version number tells a
/// rule when to copy its part again, so a batch costs one atomic load).
#[derive(Debug, Clone, Default)]
pub struct ThresholdBoard {
    levels: Arc<RwLock<BTreeMap<String, BTreeMap<String, f64>>>>,
    version: Arc<AtomicU64>,
}

impl ThresholdBoard {
    /// Sets (`Some`) or removes (`None`) the live raise level of `rule` at `location`.
    pub fn set(&self, rule: &str, location: &str, level: Option<f64>) {
        let mut m = self.levels.write().unwrap_or_else(|e| e.into_inner());
        match level {
            Some(v) => {
                m.entry(rule.to_owned()).or_default().insert(location.to_owned(), v);
            }
            None => {
                if let Some(r) = m.get_mut(rule) {
                    r.remove(location);
                    if r.is_empty() {
                        m.remove(rule);
                    }
                }
            }
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The live level of `rule` at `location`, if one is set.
    pub fn get(&self, rule: &str, location: &str) -> Option<f64> {
        self.levels.read().unwrap_or_else(|e| e.into_inner()).get(rule).and_then(|r| r.get(location)).copied()
    }

    /// Every live level: rule → location → level.
    pub fn all(&self) -> BTreeMap<String, BTreeMap<String, f64>> {
        self.levels.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes with every `set`.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub(super) fn rule(&self, rule: &str) -> BTreeMap<String, f64> {
        self.levels.read().unwrap_or_else(|e| e.into_inner()).get(rule).cloned().unwrap_or_default()
    }
}
