//! The privacy budget of a release stream: what each release costs, what has been spent in
//! the current period, persisted before a release is emitted so a restart never resets it.
//!
//! Composition: Laplace releases compose by summing ε (basic composition; δ = 0). Gaussian
//! releases are accounted in zero-concentrated DP (Bun and Steinke 2016): a release with L2
//! sensitivity Δ and noise σ is ρ-zCDP with ρ = Δ² / (2σ²); ρ adds up; ρ-zCDP implies
//! (ρ + 2·sqrt(ρ·ln(1/δ)), δ)-DP for every δ > 0.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// ε of ρ-zCDP converted to (ε, δ)-DP.
pub fn zcdp_epsilon(rho: f64, delta: f64) -> f64 {
    if rho <= 0.0 {
        return 0.0;
    }
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// The largest ρ whose (ε, δ) conversion is at most `epsilon`: the inverse of
/// [`zcdp_epsilon`], `(sqrt(ε + ln(1/δ)) - sqrt(ln(1/δ)))²`.
pub fn zcdp_rho_for(epsilon: f64, delta: f64) -> f64 {
    let l = (1.0 / delta).ln();
    ((epsilon + l).sqrt() - l.sqrt()).powi(2)
}

/// What one release costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cost {
    /// Pure ε-DP.
    Pure {
        /// ε.
        epsilon: f64,
    },
    /// ρ-zCDP.
    Zcdp {
        /// ρ.
        rho: f64,
    },
}

/// Spent budget of one period, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// The event-time period (`floor(window_start / period)`).
    pub period: i64,
    /// Sum of ε of pure releases.
    pub epsilon: f64,
    /// Sum of ρ of zCDP releases.
    pub rho: f64,
    /// Releases made.
    pub releases: u64,
    /// Releases charged in this period whose noise is a function of their content (a keyed
    /// digest of it): releasing the same content again gives the same values and costs
    /// nothing more (a replay after a restore).
    #[serde(default)]
    pub released: Vec<String>,
}

impl Spent {
    /// The (ε, δ) guarantee of everything spent, for `delta` (pure and zCDP parts add).
    pub fn epsilon_at(&self, delta: f64) -> f64 {
        self.epsilon + zcdp_epsilon(self.rho, delta)
    }
}

/// The budget of one release stream per period per privacy unit.
#[derive(Debug)]
pub struct Accountant {
    path: PathBuf,
    /// Budget ε per period.
    pub epsilon: f64,
    /// Budget δ per period.
    pub delta: f64,
    period_ms: i64,
    spent: Spent,
}

/// Why a release was refused or the budget file failed.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The release would exceed the period's budget.
    #[error(
        "privacy budget exhausted for period {period}: spent ε = {spent:.4}, this release needs {cost:.4} more, budget ε = {budget}"
    )]
    Exhausted {
        /// The period.
        period: i64,
        /// ε spent so far.
        spent: f64,
        /// ε the release would add.
        cost: f64,
        /// The period's budget.
        budget: f64,
    },
    /// The budget file could not be read or written: releases stop rather than risk an
    /// unaccounted release.
    #[error("privacy budget file {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

impl Accountant {
    /// Opens (or starts) the budget persisted at `path`.
    pub fn open(path: &Path, epsilon: f64, delta: f64, period_ms: i64) -> Result<Self, BudgetError> {
        let io = |message: String| BudgetError::Io { path: path.to_owned(), message };
        let spent = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| io(format!("unreadable ({e}); refusing to guess")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Spent::default(),
            Err(e) => return Err(io(e.to_string())),
        };
        Ok(Self { path: path.to_owned(), epsilon, delta, period_ms: period_ms.max(1), spent })
    }

    /// What has been spent in the period of `ts_ms`.
    pub fn spent_at(&self, ts_ms: i64) -> Spent {
        let period = ts_ms.div_euclid(self.period_ms);
        if self.spent.period == period { self.spent.clone() } else { Spent { period, ..Spent::default() } }
    }

    /// Charges `cost` for a release at event time `ts_ms` and persists the new total (written,
    /// fsynced and renamed into place) before returning: call it before emitting the release.
    pub fn charge(&mut self, ts_ms: i64, cost: Cost) -> Result<Spent, BudgetError> {
        self.charge_release(ts_ms, None, cost).map(|(s, _)| s)
    }

    /// Like [`charge`](Self::charge) for a release whose values are a function of `content`
    /// (an id of the window and a keyed digest of its rows): one already charged in this
    /// period is not charged again. Returns the spent budget and whether this call charged.
    pub fn charge_release(
        &mut self,
        ts_ms: i64,
        content: Option<&str>,
        cost: Cost,
    ) -> Result<(Spent, bool), BudgetError> {
        let mut next = self.spent_at(ts_ms);
        if let Some(id) = content {
            if next.released.iter().any(|r| r == id) {
                return Ok((next, false));
            }
            next.released.push(id.to_owned());
        }
        match cost {
            Cost::Pure { epsilon } => next.epsilon += epsilon,
            Cost::Zcdp { rho } => next.rho += rho,
        }
        next.releases += 1;
        let total = next.epsilon_at(self.delta);
        if total > self.epsilon * (1.0 + 1e-12) {
            let before = self.spent_at(ts_ms).epsilon_at(self.delta);
            return Err(BudgetError::Exhausted {
                period: next.period,
                spent: before,
                cost: total - before,
                budget: self.epsilon,
            });
        }
        self.persist(&next)?;
        self.spent = next.clone();
        Ok((next, true))
    }

    /// The ledger as it stands: what the operator's state carries, so that the budget moves with
    /// a task whose state is restored on another machine (another `budget_dir`).
    pub fn ledger(&self) -> &Spent {
        &self.spent
    }

    /// Takes `other` (a ledger restored from the operator's state) where it is further than
    /// the file's: a later period, or more releases in the same one. Both are records of one
    /// release history (releases are deterministic, and charged before they are emitted), so
    /// the further one holds the other: the budget is never under-counted. Returns whether it
    /// was taken (then persisted).
    pub fn adopt(&mut self, other: Spent) -> Result<bool, BudgetError> {
        if (other.period, other.releases) <= (self.spent.period, self.spent.releases) {
            return Ok(false);
        }
        self.persist(&other)?;
        self.spent = other;
        Ok(true)
    }

    fn persist(&self, s: &Spent) -> Result<(), BudgetError> {
        use std::io::Write;
        let io = |e: std::io::Error| BudgetError::Io { path: self.path.clone(), message: e.to_string() };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec(s).expect("plain numbers serialize")).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zcdp_conversion_matches_the_closed_form_and_inverts() {
        // ρ = 0.5, δ = 1e-5: ε = 0.5 + 2·sqrt(0.5·ln(1e5)) = 0.5 + 2·2.3992... = 5.2985
        let e = zcdp_epsilon(0.5, 1e-5);
        assert!((e - (0.5 + 2.0 * (0.5f64 * 100_000f64.ln()).sqrt())).abs() < 1e-12);
        assert!((e - 5.298_526).abs() < 1e-5, "{e}");
        for eps in [0.1, 1.0, 3.0] {
            assert!((zcdp_epsilon(zcdp_rho_for(eps, 1e-6), 1e-6) - eps).abs() < 1e-9);
        }
    }

    #[test]
    fn laplace_releases_add_up_and_stop_at_the_budget_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budget.json");
        let day = 86_400_000;
        let mut a = Accountant::open(&path, 1.0, 1e-6, day).unwrap();
        for i in 0..4 {
            let s = a.charge(i * 1000, Cost::Pure { epsilon: 0.25 }).unwrap();
            assert!((s.epsilon - 0.25 * (i + 1) as f64).abs() < 1e-12);
        }
        // a restart reads what was spent
        let mut b = Accountant::open(&path, 1.0, 1e-6, day).unwrap();
        assert!(matches!(b.charge(5000, Cost::Pure { epsilon: 0.25 }), Err(BudgetError::Exhausted { .. })));
        // the next day starts afresh
        assert_eq!(b.charge(day + 1, Cost::Pure { epsilon: 0.25 }).unwrap().releases, 1);
    }

    #[test]
    fn the_same_release_replayed_is_charged_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        let mut a = Accountant::open(&path, 1.0, 1e-6, 86_400_000).unwrap();
        let cost = Cost::Pure { epsilon: 0.25 };
        assert!(a.charge_release(0, Some("0:aa"), cost).unwrap().1);
        // after a restart, the replay of the same window with the same content
        let mut b = Accountant::open(&path, 1.0, 1e-6, 86_400_000).unwrap();
        let (spent, charged) = b.charge_release(0, Some("0:aa"), cost).unwrap();
        assert!(!charged && (spent.epsilon - 0.25).abs() < 1e-12 && spent.releases == 1);
        // other content in the same window is another release
        assert!(b.charge_release(0, Some("0:bb"), cost).unwrap().1);
        assert!((b.spent_at(0).epsilon - 0.5).abs() < 1e-12);
        // without a content id, every call charges
        assert!(b.charge_release(0, None, cost).unwrap().1);
        assert!((b.spent_at(0).epsilon - 0.75).abs() < 1e-12);
    }

    #[test]
    fn gaussian_releases_compose_in_zcdp() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Accountant::open(&dir.path().join("b.json"), 10.0, 1e-6, 86_400_000).unwrap();
        let rho = zcdp_rho_for(1.0, 1e-6);
        // k releases of ρ cost ε(kρ), far less than k·1 (basic composition)
        let mut k = 0;
        while a.charge(0, Cost::Zcdp { rho }).is_ok() {
            k += 1;
        }
        assert!(k > 20, "zCDP fits {k} releases of ε = 1 each into ε = 10");
        let spent = a.spent_at(0);
        assert!(spent.epsilon_at(1e-6) <= 10.0 && zcdp_epsilon((k + 1) as f64 * rho, 1e-6) > 10.0);
    }

    #[test]
    fn an_unreadable_budget_file_stops_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        std::fs::write(&path, b"{broken").unwrap();
        assert!(matches!(Accountant::open(&path, 1.0, 1e-6, 1), Err(BudgetError::Io { .. })));
    }
}
