//! The synthetic city: a road graph of corridors, a cell-transmission traffic model with a
//! triangular fundamental diagram, daily demand, weather, and incidents.
//!
//! Each corridor is a chain of segments (cells). Every `STEP_S` seconds the flow from one cell
//! to the next is `min(sending(upstream), receiving(downstream))` with
//! `sending = min(vf·k, C)` and `receiving = min(C, w·(kj − k))` per lane (Daganzo's cell
//! transmission model). An incident lowers a cell's capacity, so a queue forms there and
//! spreads upstream at the backward wave speed `w`; speed, flow and occupancy stay consistent
//! with the fundamental diagram by construction.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Simulation step (seconds). Satisfies the CFL condition `vf·dt ≤ L` for the segment lengths used.
pub const STEP_S: i64 = 10;
/// Jam density, vehicles per km per lane.
pub const JAM_DENSITY: f64 = 150.0;
/// Effective vehicle length seen by a loop detector (vehicle + loop), metres.
pub const EFFECTIVE_LENGTH_M: f64 = 6.5;

/// One road segment of the graph.
#[derive(Debug, Clone, Serialize)]
pub struct Segment {
    /// `seg-CC-II`: corridor and position.
    pub segment_id: String,
    /// Corridor number.
    pub corridor: usize,
    /// The segment vehicles come from (none at a corridor's entry).
    pub upstream: Option<String>,
    /// The segment vehicles go to (none at a corridor's exit).
    pub downstream: Option<String>,
    /// Latitude of the segment's midpoint.
    pub lat: f64,
    /// Longitude of the segment's midpoint.
    pub lon: f64,
    /// Length, metres.
    pub length_m: f64,
    /// Lanes.
    pub lanes: u8,
    /// Free-flow speed, km/h.
    pub free_speed_kmh: f64,
    /// Capacity, vehicles per hour per lane.
    pub capacity_vphpl: f64,
    /// The zone the segment lies in (camera zones and districts).
    pub zone_id: String,
}

/// An injected incident: ground truth for detectors and alert tests.
#[derive(Debug, Clone, Serialize)]
pub struct Incident {
    /// `inc-NNNN`.
    pub incident_id: String,
    /// The blocked segment.
    pub segment_id: String,
    /// Start (UTC ms).
    pub start_ms: i64,
    /// End (UTC ms).
    pub end_ms: i64,
    /// Remaining share of capacity while it lasts (0..1).
    pub capacity_factor: f64,
}

/// How an injected detector fault shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorFaultKind {
    /// The detector repeats its first reading of the fault.
    Stuck,
    /// The detector sends nothing.
    Silent,
}

/// An injected detector fault: ground truth for `sensor_health`.
#[derive(Debug, Clone, Serialize)]
pub struct DetectorFault {
    /// The detector, `det-{segment}-{lane}`.
    pub sensor_id: String,
    /// Index of its segment.
    pub segment: usize,
    /// Its lane.
    pub lane: u8,
    /// Stuck or silent.
    pub kind: DetectorFaultKind,
    /// Start (UTC ms).
    pub start_ms: i64,
    /// End (UTC ms).
    pub end_ms: i64,
}

/// Size and shape of the city.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CityConfig {
    /// Road segments in all (split into corridors of `segments_per_corridor`). Default 24.
    #[serde(default = "d_segments")]
    pub segments: usize,
    /// Segments per corridor. Default 8.
    #[serde(default = "d_per_corridor")]
    pub segments_per_corridor: usize,
    /// Lanes per segment (one detector each). Default 3.
    #[serde(default = "d_lanes")]
    pub lanes: u8,
    /// Cameras, placed on evenly spread segments. Default 12.
    #[serde(default = "d_cameras")]
    pub cameras: usize,
    /// Environmental stations. Default 6.
    #[serde(default = "d_stations")]
    pub stations: usize,
    /// Incidents per simulated day. Default 4.
    #[serde(default = "d_incidents")]
    pub incidents_per_day: f64,
    /// Latitude, longitude of the city's centre. Default 52.52, 13.405.
    #[serde(default = "d_origin")]
    pub origin: [f64; 2],
    /// Loop detectors per simulated day that fail for 20 to 90 minutes, half of them stuck
    /// (repeating one reading), half silent. Default 0.
    #[serde(default)]
    pub detector_faults_per_day: f64,
}

fn d_segments() -> usize {
    24
}
fn d_per_corridor() -> usize {
    8
}
fn d_lanes() -> u8 {
    3
}
fn d_cameras() -> usize {
    12
}
fn d_stations() -> usize {
    6
}
fn d_incidents() -> f64 {
    4.0
}
fn d_origin() -> [f64; 2] {
    [52.52, 13.405]
}

impl Default for CityConfig {
    fn default() -> Self {
        Self {
            segments: d_segments(),
            segments_per_corridor: d_per_corridor(),
            lanes: d_lanes(),
            cameras: d_cameras(),
            stations: d_stations(),
            incidents_per_day: d_incidents(),
            origin: d_origin(),
            detector_faults_per_day: 0.0,
        }
    }
}

/// Weather state shared by the city.
#[derive(Debug, Clone, Copy, Default)]
pub struct Weather {
    /// Rain intensity, mm/h (0 when dry).
    pub rain_mm_h: f64,
    /// Remaining rain, seconds.
    rain_left_s: i64,
}

/// The road network and its traffic state.
#[derive(Debug)]
pub struct City {
    /// Segments, corridor by corridor, upstream first.
    pub segments: Vec<Segment>,
    /// Density per segment, vehicles/km/lane.
    pub density: Vec<f64>,
    /// Outflow per segment during the last step, vehicles/h/lane.
    pub outflow: Vec<f64>,
    /// Demand multiplier per segment (its share of the corridor's traffic).
    demand_factor: Vec<f64>,
    /// Slowly varying demand noise per corridor (AR(1)).
    demand_noise: Vec<f64>,
    /// Incidents, sorted by start.
    pub incidents: Vec<Incident>,
    /// Detector faults, sorted by start ([`City::plan_detector_faults`]).
    pub detector_faults: Vec<DetectorFault>,
    /// Current weather.
    pub weather: Weather,
}

/// A random stretch of the simulated `days` from `start_ms`: a day, a start `hours` at most
/// after 06:00 of it, and a length of `minutes.0` plus up to `minutes.1` minutes; (start, end)
/// in UTC ms.
fn random_span(rng: &mut ChaCha8Rng, start_ms: i64, days: f64, hours: f64, minutes: (f64, f64)) -> (i64, i64) {
    let day = (rng.random::<f64>() * days.max(1e-9)).floor();
    let hour = 6.0 + hours * rng.random::<f64>();
    let start = start_ms + ((day * 24.0 + hour) * 3_600_000.0) as i64;
    let length = minutes.0 + minutes.1 * rng.random::<f64>();
    (start, start + (length * 60_000.0) as i64)
}

/// Share of the daily peak demand at `hour` (0..24, fractional): night trough, morning and
/// evening peaks, daytime plateau.
pub fn daily_profile(hour: f64, weekend: bool) -> f64 {
    let bump = |h0: f64, w: f64| (-((hour - h0) / w).powi(2)).exp();
    let p = if weekend {
        0.12 + 0.45 * bump(13.0, 3.5) + 0.2 * bump(18.0, 2.0)
    } else {
        0.10 + 0.85 * bump(8.0, 1.1) + 0.80 * bump(17.5, 1.4) + 0.35 * bump(12.5, 3.0)
    };
    p.min(1.05)
}

impl City {
    /// Lays out the city and draws its incidents for `[start_ms, end_ms)`.
    pub fn new(cfg: &CityConfig, rng: &mut ChaCha8Rng, start_ms: i64, end_ms: i64) -> Self {
        let per = cfg.segments_per_corridor.max(1);
        let corridors = cfg.segments.div_ceil(per);
        let mut segments = Vec::with_capacity(cfg.segments);
        for i in 0..cfg.segments {
            let (c, pos) = (i / per, i % per);
            let len_in_corridor = per.min(cfg.segments - c * per);
            let id = |p: usize| format!("seg-{c:02}-{p:02}");
            // Corridors alternate east-west and north-south, spaced 800 m apart.
            let length_m = 400.0 + 200.0 * rng.random::<f64>();
            let along = (pos as f64 - len_in_corridor as f64 / 2.0) * 500.0;
            let across = (c as f64 - corridors as f64 / 2.0) * 800.0;
            let (dx, dy) = if c % 2 == 0 { (along, across) } else { (across, along) };
            let lat = cfg.origin[0] + dy / 111_320.0;
            let lon = cfg.origin[1] + dx / (111_320.0 * cfg.origin[0].to_radians().cos());
            let arterial = c % 3 == 0;
            segments.push(Segment {
                segment_id: id(pos),
                corridor: c,
                upstream: (pos > 0).then(|| id(pos - 1)),
                downstream: (pos + 1 < len_in_corridor).then(|| id(pos + 1)),
                lat,
                lon,
                length_m,
                lanes: cfg.lanes.max(1),
                free_speed_kmh: if arterial { 70.0 } else { 50.0 },
                capacity_vphpl: if arterial { 1800.0 } else { 1500.0 },
                zone_id: format!("zone-{:02}", i / 4),
            });
        }
        let demand_factor = (0..segments.len()).map(|_| 0.9 + 0.15 * rng.random::<f64>()).collect();
        let days = (end_ms - start_ms) as f64 / 86_400_000.0;
        let n_incidents = (cfg.incidents_per_day * days).round() as usize;
        let mut incidents: Vec<Incident> = (0..n_incidents)
            .map(|_| {
                let (start, end) = random_span(rng, start_ms, days, 16.0, (10.0, 35.0));
                Incident {
                    incident_id: String::new(),
                    segment_id: segments[rng.random_range(0..segments.len())].segment_id.clone(),
                    start_ms: start,
                    end_ms: end,
                    capacity_factor: 0.15 + 0.3 * rng.random::<f64>(),
                }
            })
            .filter(|i| i.start_ms < end_ms)
            .collect();
        incidents.sort_by_key(|i| i.start_ms);
        for (n, inc) in incidents.iter_mut().enumerate() {
            inc.incident_id = format!("inc-{n:04}");
        }
        let n = segments.len();
        City {
            segments,
            density: vec![8.0; n],
            outflow: vec![0.0; n],
            demand_factor,
            demand_noise: vec![0.0; corridors],
            incidents,
            detector_faults: Vec::new(),
            weather: Weather::default(),
        }
    }

    /// Plans `per_day` detector faults per day between `start_ms` and `end_ms` from `seed`, on
    /// a generator of their own: the rest of the simulation is the same with or without them.
    pub fn plan_detector_faults(&mut self, per_day: f64, seed: u64, start_ms: i64, end_ms: i64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x005e_750a_fa17);
        let days = (end_ms - start_ms) as f64 / 86_400_000.0;
        let n = (per_day * days).round() as usize;
        let mut faults: Vec<DetectorFault> = (0..n)
            .map(|k| {
                let (start, end) = random_span(&mut rng, start_ms, days, 15.0, (20.0, 70.0));
                let segment = rng.random_range(0..self.segments.len());
                let lane = rng.random_range(1..=self.segments[segment].lanes.max(1));
                DetectorFault {
                    sensor_id: format!("det-{}-{lane}", self.segments[segment].segment_id),
                    segment,
                    lane,
                    kind: if k % 2 == 0 { DetectorFaultKind::Stuck } else { DetectorFaultKind::Silent },
                    start_ms: start,
                    end_ms: end,
                }
            })
            .filter(|f| f.start_ms < end_ms)
            .collect();
        faults.sort_by_key(|f| f.start_ms);
        self.detector_faults = faults;
    }

    /// The fault of the detector on lane `lane` of segment `i` at `t_ms`, if any.
    pub fn detector_fault_at(&self, i: usize, lane: u8, t_ms: i64) -> Option<&DetectorFault> {
        self.detector_faults.iter().find(|f| f.segment == i && f.lane == lane && f.start_ms <= t_ms && t_ms < f.end_ms)
    }

    /// The incident active on segment `i` at `t_ms`, if any.
    pub fn incident_at(&self, i: usize, t_ms: i64) -> Option<&Incident> {
        let id = &self.segments[i].segment_id;
        self.incidents.iter().find(|inc| inc.start_ms <= t_ms && t_ms < inc.end_ms && &inc.segment_id == id)
    }

    /// Capacity of segment `i` (veh/h/lane) in the current weather.
    fn capacity(&self, i: usize) -> f64 {
        let rain = if self.weather.rain_mm_h > 0.0 { 0.92 } else { 1.0 };
        self.segments[i].capacity_vphpl * rain
    }

    /// What segment `i` can discharge at its downstream end: its capacity, cut by an incident
    /// there. Only the discharge is cut, so vehicles keep entering the segment, it fills up
    /// (detectors on it see the queue) and the queue then spreads upstream.
    fn discharge(&self, i: usize, t_ms: i64) -> f64 {
        self.capacity(i) * self.incident_at(i, t_ms).map_or(1.0, |x| x.capacity_factor)
    }

    fn free_speed(&self, i: usize) -> f64 {
        let rain = if self.weather.rain_mm_h > 0.0 { 0.9 } else { 1.0 };
        self.segments[i].free_speed_kmh * rain
    }

    /// Speed (km/h) on segment `i` from the fundamental diagram at its current density.
    pub fn speed(&self, i: usize, _t_ms: i64) -> f64 {
        let k = self.density[i].max(0.1);
        let vf = self.free_speed(i);
        let c = self.capacity(i);
        let kc = c / vf;
        if k <= kc {
            vf
        } else {
            // congested branch of the triangular diagram through (kc, C) and (kj, 0)
            let w = c / (JAM_DENSITY - kc);
            (w * (JAM_DENSITY - k) / k).clamp(1.0, vf)
        }
    }

    /// Advances traffic and weather by one step ending at `t_ms + STEP_S`.
    pub fn step(&mut self, rng: &mut ChaCha8Rng, t_ms: i64) {
        self.step_weather(rng);
        let dt_h = STEP_S as f64 / 3600.0;
        let hour = (t_ms.rem_euclid(86_400_000)) as f64 / 3_600_000.0;
        let weekday = ((t_ms.div_euclid(86_400_000) + 4) % 7) as u8; // 1970-01-01 was a Thursday
        let weekend = weekday >= 5;
        for noise in &mut self.demand_noise {
            *noise = 0.98 * *noise + 0.02 * (rng.random::<f64>() - 0.5) * 2.0;
        }
        let n = self.segments.len();
        let mut inflow = vec![0.0; n];
        let mut outflow = vec![0.0; n];
        for i in 0..n {
            let vf = self.free_speed(i);
            let sending = (vf * self.density[i]).min(self.discharge(i, t_ms));
            let receiving = |j: usize| {
                let cj = self.capacity(j);
                let w = cj / (JAM_DENSITY - cj / self.free_speed(j));
                cj.min(w * (JAM_DENSITY - self.density[j]))
            };
            let seg = &self.segments[i];
            if seg.upstream.is_none() {
                // corridor entry: demand, limited by what the first cell can receive
                let peak = seg.capacity_vphpl;
                let corridor_noise = 1.0 + 0.15 * self.demand_noise[seg.corridor];
                let demand = peak * daily_profile(hour, weekend) * self.demand_factor[i] * corridor_noise;
                inflow[i] = demand.min(receiving(i)).max(0.0);
            }
            let q = if seg.downstream.is_some() { sending.min(receiving(i + 1)) } else { sending };
            outflow[i] = q.max(0.0);
            if seg.downstream.is_some() {
                inflow[i + 1] = outflow[i];
            }
        }
        for i in 0..n {
            let len_km = self.segments[i].length_m / 1000.0;
            self.density[i] = (self.density[i] + dt_h / len_km * (inflow[i] - outflow[i])).clamp(0.0, JAM_DENSITY);
        }
        self.outflow = outflow;
    }

    fn step_weather(&mut self, rng: &mut ChaCha8Rng) {
        let w = &mut self.weather;
        if w.rain_left_s > 0 {
            w.rain_left_s -= STEP_S;
            if w.rain_left_s <= 0 {
                w.rain_mm_h = 0.0;
            }
        } else if rng.random::<f64>() < 0.06 * STEP_S as f64 / 3600.0 {
            // about one shower every 17 hours, lasting 1 to 4 hours
            w.rain_left_s = rng.random_range(3600..4 * 3600);
            w.rain_mm_h = 0.5 + 7.5 * rng.random::<f64>().powi(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const DAY: i64 = 86_400_000;
    const MONDAY: i64 = 1_772_409_600_000; // 2026-03-02T00:00:00Z

    #[test]
    fn profile_has_two_weekday_peaks() {
        assert!(daily_profile(8.0, false) > 0.8 && daily_profile(17.5, false) > 0.75);
        assert!(daily_profile(3.0, false) < 0.2);
        assert!(daily_profile(8.0, true) < daily_profile(8.0, false));
    }

    #[test]
    fn graph_links_corridor_neighbours() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let city = City::new(
            &CityConfig { segments: 10, segments_per_corridor: 4, ..CityConfig::default() },
            &mut rng,
            MONDAY,
            MONDAY + DAY,
        );
        assert_eq!(city.segments.len(), 10);
        assert_eq!(city.segments[1].upstream.as_deref(), Some("seg-00-00"));
        assert_eq!(city.segments[1].downstream.as_deref(), Some("seg-00-02"));
        assert_eq!(city.segments[3].downstream, None);
        assert_eq!(city.segments[8].segment_id, "seg-02-00");
        assert_eq!(city.segments[9].downstream, None, "last corridor is short");
    }

    #[test]
    fn incident_queue_spreads_upstream_and_clears() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let cfg = CityConfig { segments: 8, incidents_per_day: 0.0, ..CityConfig::default() };
        let mut city = City::new(&cfg, &mut rng, MONDAY, MONDAY + DAY);
        let start = MONDAY + 8 * 3_600_000;
        city.incidents.push(Incident {
            incident_id: "inc-test".into(),
            segment_id: "seg-00-05".into(),
            start_ms: start,
            end_ms: start + 30 * 60_000,
            capacity_factor: 0.3,
        });
        let mut t = MONDAY + 6 * 3_600_000;
        while t < start {
            city.step(&mut rng, t);
            t += STEP_S * 1000;
        }
        let before: Vec<f64> = (0..8).map(|i| city.speed(i, start - 1)).collect();
        while t < start + 25 * 60_000 {
            city.step(&mut rng, t);
            t += STEP_S * 1000;
        }
        let during: Vec<f64> = (0..8).map(|i| city.speed(i, t)).collect();
        assert!(during[5] < 0.5 * before[5], "blocked segment slows: {before:?} -> {during:?}");
        assert!(during[4] < 0.6 * before[4], "queue spreads to the upstream neighbour: {during:?}");
        assert!(during[7] > 0.8 * before[7], "downstream stays free: {during:?}");
        // occupancy consistent with the diagram: congested density is well above critical
        assert!(city.density[5] > 40.0, "{:?}", city.density);
        while t < start + 120 * 60_000 {
            city.step(&mut rng, t);
            t += STEP_S * 1000;
        }
        assert!(city.speed(4, t) > 0.8 * before[4], "the queue dissolves after the incident");
    }
}
