//! The energy services a run starts beside its tasks: the grid intensity (and its Kafka
//! reader), the energy account and the carbon policy.

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{CarbonPolicyConfig, EnergyConfig, Intensity};
use crate::sink::compact::Positioned;
use crate::task::{AbortOnDrop, PipelineError, Service, ServiceContext};

/// The energy account: the signal that ends it, and its task.
type AccountTask =
    (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), crate::sink::parquet::ParquetSinkError>>);

/// The running energy services.
struct EnergyServices {
    _intensity_reader: Option<AbortOnDrop>,
    account: AccountTask,
    policy: Option<tokio::task::JoinHandle<()>>,
}

fn build_error(stage: &str, message: String) -> PipelineError {
    PipelineError::Build { stage: stage.into(), message }
}

/// Starts the energy account (`runtime.energy`) and the carbon policy (`runtime.carbon_policy`,
/// which needs the account's grid intensity); `None` when neither is configured.
pub(crate) fn start(
    energy: Option<&EnergyConfig>,
    policy: Option<&CarbonPolicyConfig>,
    ctx: ServiceContext<'_>,
) -> Result<Option<Box<dyn Service>>, PipelineError> {
    let Some(energy) = energy else {
        return match policy {
            Some(_) => Err(build_error(
                "runtime.carbon_policy",
                "the carbon policy needs `runtime.energy` for the grid intensity".into(),
            )),
            None => Ok(None),
        };
    };
    // one grid intensity for the account and the policy (a Kafka topic updates both)
    let intensity = Intensity::from_config(energy).map_err(|e| build_error("runtime.energy", e.to_string()))?;
    let _intensity_reader = match &energy.carbon_topic {
        #[cfg(feature = "kafka")]
        Some(t) => Some(AbortOnDrop(
            intensity.follow(t, ctx.metrics).map_err(|e| build_error("runtime.energy", e.to_string()))?,
        )),
        #[cfg(not(feature = "kafka"))]
        Some(_) => {
            return Err(build_error(
                "runtime.energy.carbon_topic",
                "this build has no Kafka support (feature `kafka`)".into(),
            ));
        }
        None => None,
    };
    let (done, ended) = tokio::sync::oneshot::channel();
    let account = tokio::spawn(super::run(energy.clone(), intensity.clone(), ctx.metrics.clone(), ctx.tasks, ended));
    let policy = policy.map(|p| {
        super::policy::set_initial_mode(p, &intensity, ctx.metrics);
        let positioned = match ctx.commits {
            Some(log) => Positioned::Committed(log),
            // no source commits (the simulator): a run is all or nothing
            None => Positioned::All,
        };
        tokio::spawn(super::run_policy(p.clone(), intensity, ctx.table_roots.to_vec(), positioned, ctx.metrics.clone()))
    });
    Ok(Some(Box::new(EnergyServices { _intensity_reader, account: (done, account), policy })))
}

impl Service for EnergyServices {
    /// Stops the policy, and lets the energy account write its last interval (10 s at most).
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        async move {
            if let Some(p) = self.policy {
                p.abort();
            }
            let (done, task) = self.account;
            let _ = done.send(());
            match tokio::time::timeout(std::time::Duration::from_secs(10), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!("energy account: {e}"),
                Ok(Err(e)) => tracing::error!("energy account task: {e}"),
                Err(_) => tracing::error!("energy account: the last interval took longer than 10 s"),
            }
        }
        .boxed()
    }
}
