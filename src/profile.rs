//! `autopar profile`: measures this machine and writes a cluster file that `autopar plan
//! --cluster FILE` prices plans with.
//!
//! Why: the presets rank plans by data-sheet peaks times estimated efficiencies; predicting
//! the step time a plan will take (within 10 %) needs the rates this machine achieves, through
//! the runtime the plan will run on. The measurements come from
//! [`autopar_runtime::measure`]; this module turns them into a [`Cluster`]:
//! - every (collective, group size) series becomes an alpha-beta fit
//!   ([`fit_alpha_beta`], the resharding formula's ring factors) on the intra-node link:
//!   `Mesh::on_cluster` gives it to the axes of that size, which the pricing then uses
//!   instead of the preset's link;
//! - the measured matmul and copy rates become the efficiencies against the base preset's
//!   peaks (`matmul_efficiency`, `matmul_efficiency_fp32`, `memory_efficiency`), so that the
//!   roofline keeps one rule and MFU keeps the data-sheet peak; a rate above the peak means
//!   the base preset is the wrong GPU, and is refused;
//! - the tiny-op time becomes `op_overhead_s`, paid by every op however small its shard;
//! - what is not measured comes from the base preset: peaks, HBM capacity, the inter-node
//!   network (one process sees one node), the link of group sizes not measured.

use crate::Error;
use autopar_runtime::measure::{self, MeasureDevice, MeasureOptions, Measurements};
use autopar_solver::cluster::{fit_alpha_beta, Cluster, CollectiveFit};
use autopar_solver::mesh::LinkKind;
use std::fmt::Write;

/// What `autopar profile` measures.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    pub device: MeasureDevice,
    /// Ranks to measure collectives over (default: every GPU; on the CPU, 2 threads).
    pub gpus: Option<usize>,
    /// The largest collective payload, bytes (default: 1 GiB on GPUs, 16 MiB on the CPU).
    pub max_bytes: Option<usize>,
    /// The preset (or cluster file) that supplies what is not measured.
    pub base: String,
}

/// A profile run: the cluster to write, and what it came from.
#[derive(Clone, Debug)]
pub struct Profiled {
    pub cluster: Cluster,
    pub base: Cluster,
    pub measurements: Measurements,
    /// Per fit in `cluster.collectives`: whether its bandwidth is a lower bound (times flat
    /// within noise) rather than fitted.
    pub bandwidth_bounded: Vec<bool>,
}

/// Measures (see the module doc) and builds the cluster.
pub fn profile(opts: &ProfileOptions) -> Result<Profiled, Error> {
    let base = Cluster::load(&opts.base).map_err(|e| Error::Usage(format!("--base: {e}")))?;
    let ranks = match (opts.gpus, opts.device) {
        (Some(n), _) => n,
        (None, MeasureDevice::Cpu) => 2,
        (None, MeasureDevice::Cuda) => {
            measure::cuda_devices().map_err(|e| Error::Run(e.to_string()))?
        }
    };
    let mut mo = MeasureOptions::new(opts.device, ranks);
    if let Some(b) = opts.max_bytes {
        mo.max_bytes = b;
    }
    let m = measure::measure(&mo).map_err(|e| match e {
        measure::MeasureError::Options(_) => Error::Usage(e.to_string()),
        _ => Error::Run(e.to_string()),
    })?;
    let (cluster, bandwidth_bounded) = cluster_from(&base, &m, &mo)?;
    Ok(Profiled {
        cluster,
        base,
        measurements: m,
        bandwidth_bounded,
    })
}

/// The cluster `m` describes, on top of `base` (module doc); with, per fit, whether its
/// bandwidth is only a bound.
pub fn cluster_from(
    base: &Cluster,
    m: &Measurements,
    mo: &MeasureOptions,
) -> Result<(Cluster, Vec<bool>), Error> {
    let mut c = base.clone();
    let efficiency = |what: &str, measured: f64, peak: f64, field: &str| {
        let e = measured / peak;
        if e > 0.0 && e <= 1.0 {
            Ok(e)
        } else {
            Err(Error::Run(format!(
                "measured {what} {measured:.4e} is not within the {} preset's {field} {peak:.4e}: \
                 is --base the GPU measured ({})?",
                base.name, m.device_name
            )))
        }
    };
    c.matmul_efficiency = efficiency(
        "bf16 matmul FLOP/s",
        m.matmul_flops_bf16,
        base.peak_flops_bf16,
        "peak_flops_bf16",
    )?;
    c.matmul_efficiency_fp32 = Some(efficiency(
        "fp32 matmul FLOP/s",
        m.matmul_flops_fp32,
        base.peak_flops_fp32,
        "peak_flops_fp32",
    )?);
    c.memory_efficiency = efficiency(
        "copy bandwidth (bytes/s)",
        m.copy_bandwidth,
        base.hbm_bandwidth,
        "hbm_bandwidth",
    )?;
    c.op_overhead_s = m.launch_s;
    c.gpus_per_node = m.devices.max(1);
    c.collectives.clear();
    let mut bounded = vec![];
    for s in &m.collectives {
        let f = fit_alpha_beta(s.op, s.group_size, &s.samples)
            .map_err(|e| Error::Run(format!("fitting the measured times: {e}")))?;
        let lo = s.samples.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = s.samples.iter().map(|p| p.0).fold(0.0, f64::max);
        c.collectives.push(CollectiveFit {
            op: s.op,
            group_size: s.group_size,
            link: LinkKind::IntraNode,
            alpha_s: f.alpha_s,
            bandwidth: f.bandwidth,
            max_rel_residual: Some(f.max_rel_residual),
            bytes_range: Some([lo, hi]),
            samples: s.samples.iter().map(|&(b, t)| [b, t]).collect(),
        });
        bounded.push(f.bandwidth_bounded);
    }
    let groups: Vec<String> = measure::group_sizes(mo.ranks)
        .iter()
        .map(|n| n.to_string())
        .collect();
    let device = match mo.device {
        MeasureDevice::Cpu => "CPU threads (in-process collectives)".to_string(),
        MeasureDevice::Cuda => format!("{} GPUs ({})", mo.ranks, m.device_name),
    };
    c.name = format!("{}+profile", base.name);
    c.source = format!(
        "measured by autopar profile on {device} in {:.1} s: collectives over groups of {} from \
         {} to {} (fits in `collectives`), bf16 and fp32 matmul {n}x{n}x{n}, a {} copy, a \
         one-element add for op_overhead_s; peaks, capacity, the inter-node network and the \
         links of unmeasured group sizes are the {} preset's: {}",
        m.seconds,
        if groups.is_empty() {
            "(none: one rank)".to_string()
        } else {
            groups.join(", ")
        },
        crate::format_bytes(measure::MIN_BYTES as f64),
        crate::format_bytes(mo.max_bytes as f64),
        crate::format_bytes(mo.copy_bytes as f64),
        base.name,
        base.source,
        n = mo.matmul_n,
    );
    c.validate()
        .map_err(|e| Error::Run(format!("the measured cluster is invalid: {e}")))?;
    Ok((c, bounded))
}

impl Profiled {
    /// The table `autopar profile` prints: one row per fit, then the compute rates.
    pub fn table(&self) -> String {
        let (c, m, b) = (&self.cluster, &self.measurements, &self.base);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<15} {:>5} {:>10} {:>10} {:>9}",
            "collective", "group", "alpha us", "GB/s", "residual"
        );
        for (f, &bounded) in c.collectives.iter().zip(&self.bandwidth_bounded) {
            let _ = writeln!(
                s,
                "{:<15} {:>5} {:>10.2} {:>10.2}{} {:>8.1}%",
                f.op.name(),
                f.group_size,
                f.alpha_s * 1e6,
                f.bandwidth / 1e9,
                if bounded { "*" } else { " " },
                f.max_rel_residual.unwrap_or(0.0) * 100.0
            );
        }
        if self.bandwidth_bounded.iter().any(|&x| x) {
            let _ = writeln!(
                s,
                "* times did not grow with the size: the bandwidth is a lower bound (raise --max-bytes)"
            );
        }
        let rows = [
            (
                "matmul bf16",
                m.matmul_flops_bf16 / 1e12,
                "TFLOP/s",
                c.matmul_efficiency,
                b.peak_flops_bf16 / 1e12,
            ),
            (
                "matmul fp32",
                m.matmul_flops_fp32 / 1e12,
                "TFLOP/s",
                c.matmul_efficiency_of(true),
                b.peak_flops_fp32 / 1e12,
            ),
            (
                "HBM copy",
                m.copy_bandwidth / 1e9,
                "GB/s",
                c.memory_efficiency,
                b.hbm_bandwidth / 1e9,
            ),
        ];
        for (what, value, unit, eff, peak) in rows {
            let _ = writeln!(
                s,
                "{what:<12} {value:>10.2} {unit:<8} ({:.1}% of the {} peak {peak:.1})",
                eff * 100.0,
                b.name
            );
        }
        let _ = writeln!(
            s,
            "{:<12} {:>10.2} us per op (launch and dispatch of a one-element add)",
            "launch",
            m.launch_s * 1e6
        );
        let _ = write!(
            s,
            "measured in {:.1} s on {} ({} device{} on this machine)",
            m.seconds,
            m.device_name,
            m.devices,
            if m.devices == 1 { "" } else { "s" }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use autopar_runtime::measure::CollectiveSeries;
    use autopar_solver::cluster::CollectiveKind;

    fn measurements() -> Measurements {
        let series = |op: CollectiveKind, n: usize| CollectiveSeries {
            op,
            group_size: n,
            samples: (0..11)
                .map(|k| {
                    let b = 1024.0 * 4f64.powi(k);
                    (b, op.seconds(n, 10e-6, 300e9, b))
                })
                .collect(),
        };
        Measurements {
            device_name: "NVIDIA H100 80GB HBM3".into(),
            devices: 4,
            collectives: CollectiveKind::ALL
                .iter()
                .flat_map(|&op| [series(op, 2), series(op, 4)])
                .collect(),
            matmul_flops_bf16: 700e12,
            matmul_flops_fp32: 50e12,
            copy_bandwidth: 3e12,
            launch_s: 5e-6,
            seconds: 20.0,
        }
    }

    #[test]
    fn measurements_become_a_cluster() {
        let base = Cluster::preset("h100").expect("preset");
        let mo = MeasureOptions::new(MeasureDevice::Cuda, 4);
        let (c, bounded) = cluster_from(&base, &measurements(), &mo).expect("cluster");
        assert_eq!(c.collectives.len(), 8);
        assert!(bounded.iter().all(|&b| !b));
        for f in &c.collectives {
            assert!((f.alpha_s - 10e-6).abs() < 1e-12, "{f:?}");
            assert!((f.bandwidth - 300e9).abs() / 300e9 < 1e-9, "{f:?}");
            assert_eq!(f.link, LinkKind::IntraNode);
        }
        assert!((c.matmul_efficiency * base.peak_flops_bf16 - 700e12).abs() < 1.0);
        assert!((c.matmul_efficiency_of(true) * 67e12 - 50e12).abs() < 1.0);
        assert!((c.memory_efficiency * base.hbm_bandwidth - 3e12).abs() < 1.0);
        assert_eq!((c.op_overhead_s, c.gpus_per_node), (5e-6, 4));
        assert_eq!(c.peak_flops_bf16, base.peak_flops_bf16);
        assert!(c.source.contains("groups of 2, 4"), "{}", c.source);
        assert_eq!(
            Cluster::from_json(&c.to_json(), "<json>").expect("round trip"),
            c
        );
        let p = Profiled {
            cluster: c,
            base,
            measurements: measurements(),
            bandwidth_bounded: bounded,
        };
        let t = p.table();
        assert!(
            t.contains("all-reduce          2      10.00     300.00"),
            "{t}"
        );
        assert!(
            t.contains("matmul bf16      700.00 TFLOP/s  (70.7% of the h100 peak 989.4)"),
            "{t}"
        );
        assert!(t.contains("5.00 us per op"), "{t}");
    }

    #[test]
    fn a_rate_above_the_base_peak_is_refused() {
        let base = Cluster::preset("a100").expect("preset");
        let mo = MeasureOptions::new(MeasureDevice::Cuda, 4);
        let e = cluster_from(&base, &measurements(), &mo).expect_err("h100 rates on a100");
        assert!(
            e.to_string().contains("a100 preset's peak_flops_bf16"),
            "{e}"
        );
    }
}
