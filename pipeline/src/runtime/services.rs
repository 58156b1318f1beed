//! The services a run starts beside its tasks: the grid intensity (and its Kafka reader), the
//! energy account and the carbon policy.

use crate::config::PipelinePlan;
use crate::task::{AbortOnDrop, PipelineError};

/// The energy account: the signal that ends it, and its task.
type EnergyTask = (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), String>>);

/// The running services; [`stop`](Self::stop) ends them after the tasks.
pub(super) struct Services {
    _intensity_reader: Option<AbortOnDrop>,
    energy: Option<EnergyTask>,
    policy: Option<tokio::task::JoinHandle<()>>,
}

impl Services {
    /// Starts what `plan.runtime` asks for.
    pub(super) fn start(
        plan: &PipelinePlan,
        metrics: &citystream_operators::Metrics,
        parquet_roots: &[std::path::PathBuf],
        commit_log: &crate::sink::compact::CommitLog,
    ) -> Result<Self, PipelineError> {
        // one grid intensity for the account and the policy (a Kafka topic updates both)
        let intensity = match &plan.runtime.energy {
            Some(e) => Some(
                crate::energy::Intensity::from_config(e)
                    .map_err(|message| PipelineError::Build { stage: "runtime.energy".into(), message })?,
            ),
            None => None,
        };
        let _intensity_reader: Option<AbortOnDrop> =
            match (&intensity, plan.runtime.energy.as_ref().and_then(|e| e.carbon_topic.as_ref())) {
                #[cfg(feature = "kafka")]
                (Some(i), Some(t)) => Some(AbortOnDrop(
                    i.follow(t, metrics)
                        .map_err(|message| PipelineError::Build { stage: "runtime.energy".into(), message })?,
                )),
                #[cfg(not(feature = "kafka"))]
                (Some(_), Some(_)) => {
                    return Err(PipelineError::Build {
                        stage: "runtime.energy.carbon_topic".into(),
                        message: "this build has no Kafka support (feature `kafka`)".into(),
                    });
                }
                _ => None,
            };
        let energy = plan.runtime.energy.clone().zip(intensity.clone()).map(|(cfg, intensity)| {
            let mut tasks: Vec<(String, Vec<(String, String)>)> = Vec::new();
            for s in &plan.sources {
                let outs =
                    s.outputs.iter().map(|o| ("citystream_source_events_total".to_owned(), o.name.clone())).collect();
                tasks.push((s.name.clone(), outs));
            }
            for st in &plan.stages {
                let outs =
                    st.outputs.iter().map(|o| ("citystream_stage_rows_out_total".to_owned(), o.name.clone())).collect();
                tasks.push((st.name.clone(), outs));
            }
            for sk in &plan.sinks {
                tasks.push((sk.name.clone(), Vec::new()));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            (tx, tokio::spawn(crate::energy::run(cfg, intensity, metrics.clone(), tasks, rx)))
        });
        let policy = match (&plan.runtime.carbon_policy, &intensity) {
            (Some(p), Some(intensity)) => {
                let intensity = intensity.clone();
                let positioned = if crate::config::plan::any_committing(&plan.sources) {
                    crate::sink::compact::Positioned::Committed(commit_log.clone())
                } else {
                    // a source without commits (the simulator): a run is all or nothing
                    crate::sink::compact::Positioned::All
                };
                Some(tokio::spawn(crate::energy::run_policy(
                    p.clone(),
                    intensity,
                    parquet_roots.to_vec(),
                    positioned,
                    metrics.clone(),
                )))
            }
            (Some(_), None) => {
                return Err(PipelineError::Build {
                    stage: "runtime.carbon_policy".into(),
                    message: "the carbon policy needs `runtime.energy` for the grid intensity".into(),
                });
            }
            _ => None,
        };
        Ok(Self { _intensity_reader, energy, policy })
    }

    /// Stops the policy, and lets the energy account write its last interval (10 s at most).
    pub(super) async fn stop(self) {
        if let Some(p) = self.policy {
            p.abort();
        }
        if let Some((done, task)) = self.energy {
            let _ = done.send(());
            match tokio::time::timeout(std::time::Duration::from_secs(10), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!("energy account: {e}"),
                Ok(Err(e)) => tracing::error!("energy account task: {e}"),
                Err(_) => tracing::error!("energy account: the last interval took longer than 10 s"),
            }
        }
    }
}
