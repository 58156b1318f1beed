//! GPU busy time from NVML, the NVIDIA management library (`libnvidia-ml.so.1`, installed with
//! the driver), loaded at run time: no build-time dependency, and on a machine without the
//! library or a device [`Nvml::open`] returns `None` and nothing is recorded (never invented).
//!
//! NVML reports per device the share of the last sample period (1/6 s to 1 s, by product) in
//! which a kernel ran (`nvmlDeviceGetUtilizationRates`). A sampler integrates it once per second
//! into `citystream_gpu_busy_microseconds_total{device}`; the energy account shares each
//! interval's busy time among the `infer` stages whose model runs on the CUDA provider, by their
//! inference time. The figure is device-wide: other processes on the same GPU count too.

use std::ffi::c_void;
use std::os::raw::{c_int, c_uint};

use citystream_operators::Metrics;

type Init = unsafe extern "C" fn() -> c_int;
type Count = unsafe extern "C" fn(*mut c_uint) -> c_int;
type Handle = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type Utilization = unsafe extern "C" fn(*mut c_void, *mut Rates) -> c_int;

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Rates {
    gpu: c_uint,
    memory: c_uint,
}

/// An initialized NVML with its devices.
pub struct Nvml {
    devices: Vec<*mut c_void>,
    utilization: Utilization,
}

// SAFETY: NVML is thread-safe; the device handles are opaque and valid for the process's life.
unsafe impl Send for Nvml {}
// SAFETY: as above.
unsafe impl Sync for Nvml {}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvml").field("devices", &self.devices.len()).finish()
    }
}

/// `dlsym` as a typed function pointer.
///
/// # Safety
/// `T` must be the symbol's C signature.
unsafe fn symbol<T: Copy>(lib: *mut c_void, name: &std::ffi::CStr) -> Option<T> {
    // SAFETY: `lib` is a handle from dlopen; the name is NUL-terminated.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    // SAFETY: a non-null symbol of the caller-given signature (function pointers are pointer-sized).
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl Nvml {
    /// Loads NVML and lists its devices; `None` without the library, a device or on any error.
    pub fn open() -> Option<Nvml> {
        // SAFETY: dlopen with a constant name; the handle is kept for the process's life.
        let lib = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if lib.is_null() {
            return None;
        }
        // SAFETY: the signatures are NVML's (nvml.h, API v2).
        let (init, count, handle, utilization) = unsafe {
            (
                symbol::<Init>(lib, c"nvmlInit_v2")?,
                symbol::<Count>(lib, c"nvmlDeviceGetCount_v2")?,
                symbol::<Handle>(lib, c"nvmlDeviceGetHandleByIndex_v2")?,
                symbol::<Utilization>(lib, c"nvmlDeviceGetUtilizationRates")?,
            )
        };
        // SAFETY: NVML calls with valid out-pointers.
        unsafe {
            if init() != 0 {
                return None;
            }
            let mut n: c_uint = 0;
            if count(&mut n) != 0 || n == 0 {
                return None;
            }
            let mut devices = Vec::new();
            for i in 0..n {
                let mut d: *mut c_void = std::ptr::null_mut();
                if handle(i, &mut d) == 0 && !d.is_null() {
                    devices.push(d);
                }
            }
            (!devices.is_empty()).then_some(Nvml { devices, utilization })
        }
    }

    /// Per device, the share (0..=100) of the last sample period a kernel ran; `None` for a
    /// device that did not answer.
    pub fn busy_percent(&self) -> Vec<Option<u32>> {
        self.devices
            .iter()
            .map(|&d| {
                let mut r = Rates::default();
                // SAFETY: a device handle from NVML and a valid out-pointer.
                (unsafe { (self.utilization)(d, &mut r) } == 0).then_some(r.gpu.min(100))
            })
            .collect()
    }

    /// Samples every second until the task is aborted, adding busy time per device to
    /// `citystream_gpu_busy_microseconds_total`.
    pub fn sample(self, metrics: Metrics) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let counters: Vec<_> = (0..self.devices.len())
                .map(|i| {
                    metrics.counter(
                        "citystream_gpu_busy_microseconds_total",
                        "GPU time with a kernel running, per device (NVML, device-wide).",
                        &[("device", i.to_string().as_str())],
                    )
                })
                .collect();
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let mut last = std::time::Instant::now();
            loop {
                tick.tick().await;
                let dt = last.elapsed().as_micros() as u64;
                last = std::time::Instant::now();
                for (c, p) in counters.iter().zip(self.busy_percent()) {
                    if let Some(p) = p {
                        c.inc_by(dt * u64::from(p) / 100);
                    }
                }
            }
        })
    }
}

/// Per `infer` stage on the CUDA provider, its share of the GPU busy time: its inference time
/// on CUDA (`citystream_infer_cuda_micros_total`: its runs below `cuda_min_rows` run on the
/// CPU and take none) over that of all CUDA stages. Empty when none runs on CUDA.
pub fn cuda_shares(metrics: &Metrics) -> Vec<(String, f64)> {
    let label = |labels: &str, key: &str| citystream_operators::label_value(labels, key).map(str::to_owned);
    let stages: std::collections::BTreeSet<String> = metrics
        .series("citystream_model_info")
        .into_iter()
        .filter(|(l, v)| *v == 1.0 && label(l, "provider").as_deref() == Some("cuda"))
        .filter_map(|(l, _)| label(&l, "stage"))
        .collect();
    let micros: Vec<(String, f64)> = stages
        .into_iter()
        .map(|s| {
            let m = metrics.value("citystream_infer_cuda_micros_total", &[("stage", s.as_str())]).unwrap_or(0.0);
            (s, m)
        })
        .collect();
    let total: f64 = micros.iter().map(|m| m.1).sum();
    micros.into_iter().map(|(s, m)| (s, if total > 0.0 { m / total } else { 0.0 })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_nothing_is_measured_and_cpu_stages_get_no_share() {
        // this machine has no NVIDIA driver: absent, not zero
        if std::path::Path::new("/proc/driver/nvidia").exists() {
            return;
        }
        assert!(Nvml::open().is_none());
        let m = Metrics::new();
        m.gauge(
            "citystream_model_info",
            "x",
            &[("stage", "congestion"), ("role", "live"), ("model", "m"), ("sha256", "s"), ("provider", "cpu")],
        )
        .set(1.0);
        assert!(cuda_shares(&m).is_empty());
    }

    #[test]
    fn cuda_stages_share_the_busy_time_by_their_inference_time() {
        let m = Metrics::new();
        for (stage, provider, micros) in [("a", "cuda", 300.0), ("b", "cuda", 100.0), ("c", "cpu", 999.0)] {
            m.gauge(
                "citystream_model_info",
                "x",
                &[("stage", stage), ("role", "live"), ("model", "m"), ("sha256", "s"), ("provider", provider)],
            )
            .set(1.0);
            m.counter("citystream_infer_cuda_micros_total", "x", &[("stage", stage)]).inc_by(micros as u64);
        }
        assert_eq!(cuda_shares(&m), [("a".to_owned(), 0.75), ("b".to_owned(), 0.25)]);
    }
}
