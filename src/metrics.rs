//! Prometheus metrics. Labels are bounded sets (endpoint, status class, reason, condition type),
//! never error text; object names appear only on the per-instance series (`namespace`, `name`),
//! bounded by the number of NetbirdInstances and removed with them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};

use crate::netbird::{CallObserver, Endpoint, status_class};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub endpoint: &'static str,
    pub class: &'static str,
}

/// One NetbirdInstance. Bounded by the number of NetbirdInstances (what users alert on per
/// instance).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub namespace: String,
    pub name: String,
}

/// The condition types exported per NetbirdInstance: the ones the chart's alerts need.
pub const CONDITION_TYPES: [&str; 3] = ["Ready", "Stalled", "UpdateAvailable"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub ready: &'static str,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub netbird_requests: Family<CallLabels, Counter>,
    pub setup_calls: Counter,
    pub instances: Family<ReadyLabels, Gauge>,
    pub update_available: Gauge,
    /// `token_expiry_seconds`, per instance (see [`InstanceSeries`]).
    token_expiry: TokenExpiryGauges,
    /// Instances the passes keep something in memory about (backoff, verification, retry gate):
    /// returns to where it was when instances go away, whatever state they were in.
    pub remembered_instances: Gauge,
    /// `instance_condition`, three series per instance (see [`InstanceSeries`]).
    instance_condition: ConditionGauges,
    pub previous_token_in_use: Family<InstanceLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("netbird_operator");
        let r = &mut registry;
        let series = InstanceSeries::default();
        // registered in the order written here, the order of the exposition
        Self {
            reconciles: register(r, "reconciles", "Reconcile passes, by result (ok or error)"),
            reconcile_errors: register(
                r,
                "reconcile_errors",
                "Passes that ended not Ready, by condition reason (or the Kubernetes failure)",
            ),
            netbird_requests: register(
                r,
                "netbird_requests",
                "Calls to NetBird management servers, by endpoint and status class (error: no \
                 answer)",
            ),
            setup_calls: register(r, "setup_calls", "POST /api/setup calls made"),
            instances: register(r, "instances", "NetbirdInstances by Ready condition status"),
            update_available: register(
                r,
                "instances_update_available",
                "NetbirdInstances whose server reports a newer management release",
            ),
            token_expiry: register_as(
                r,
                TokenExpiryGauges(series.clone()),
                "token_expiry_seconds",
                "Seconds until the stored token expires, per NetbirdInstance (when the expiry is \
                 known)",
            ),
            remembered_instances: register(
                r,
                "remembered_instances",
                "NetbirdInstances the operator keeps per-instance memory about (a debugging \
                 figure: it follows the number of instances)",
            ),
            instance_condition: register_as(
                r,
                ConditionGauges(series),
                "instance_condition",
                "1 when the condition (Ready, Stalled, UpdateAvailable) of a NetbirdInstance is \
                 True, 0 when False or absent",
            ),
            previous_token_in_use: register(
                r,
                "previous_token_in_use",
                "1 while a consumer still uses the token a rotation replaced, with less than a \
                 quarter of its grace period left (restart the consumers of the token Secret); 0 \
                 while a replaced token is pending and followed; absent otherwise",
            ),
            registry,
        }
    }
}

/// A new metric, registered under `name` with `help` (the registry keeps a handle to it).
fn register<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    register_as(registry, M::default(), name, help)
}

/// `metric`, registered under `name` with `help`.
fn register_as<M: Metric + Clone>(registry: &mut Registry, metric: M, name: &str, help: &str) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// The per-instance series of `token_expiry_seconds` and `instance_condition`, one map entry per
/// instance (a Family per metric kept a map entry, a copy of the labels and a shared gauge per
/// series: about 0.8 KiB per instance for its four series, with 10,000 instances). Encoded as the
/// Families were: the same series, labels and values.
#[derive(Clone, Debug, Default)]
struct InstanceSeries(Arc<Mutex<HashMap<InstanceLabels, Series>>>);

/// The values of one instance's series.
#[derive(Clone, Copy, Debug, Default)]
struct Series {
    /// `token_expiry_seconds`, when set.
    token_expiry: Option<i64>,
    /// `instance_condition`, when set: bit i is 1 when `CONDITION_TYPES[i]` is True.
    conditions: Option<u8>,
}

impl InstanceSeries {
    fn lock(&self) -> MutexGuard<'_, HashMap<InstanceLabels, Series>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the series of `instance` (an instance left with none is removed).
    fn update(&self, instance: &InstanceLabels, f: impl FnOnce(&mut Series)) {
        let mut map = self.lock();
        if let Some(series) = map.get_mut(instance) {
            f(series);
            if series.token_expiry.is_none() && series.conditions.is_none() {
                map.remove(instance);
            }
        } else {
            let mut series = Series::default();
            f(&mut series);
            if series.token_expiry.is_some() || series.conditions.is_some() {
                map.insert(instance.clone(), series);
            }
        }
    }
}

/// The labels of a per-instance series, as the Families encoded them.
fn instance_labels(instance: &InstanceLabels) -> [(&'static str, &str); 2] {
    [
        ("namespace", instance.namespace.as_str()),
        ("name", instance.name.as_str()),
    ]
}

/// `token_expiry_seconds`: a gauge per instance whose token's expiry is known.
#[derive(Clone, Debug)]
struct TokenExpiryGauges(InstanceSeries);

impl EncodeMetric for TokenExpiryGauges {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (instance, series) in self.0.lock().iter() {
            if let Some(seconds) = series.token_expiry {
                let labels = instance_labels(instance);
                encoder.encode_family(&labels)?.encode_gauge(&seconds)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        !self.0.lock().values().any(|s| s.token_expiry.is_some())
    }
}

/// `instance_condition`: a gauge per instance and condition type of [`CONDITION_TYPES`].
#[derive(Clone, Debug)]
struct ConditionGauges(InstanceSeries);

impl EncodeMetric for ConditionGauges {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (instance, series) in self.0.lock().iter() {
            let Some(bits) = series.conditions else {
                continue;
            };
            for (i, condition) in CONDITION_TYPES.into_iter().enumerate() {
                let [namespace, name] = instance_labels(instance);
                let labels = [namespace, name, ("condition", condition)];
                let value = i64::from((bits >> i) & 1);
                encoder.encode_family(&labels)?.encode_gauge(&value)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        !self.0.lock().values().any(|s| s.conditions.is_some())
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Sets the per-state instance gauges (computed from the informer's cache at scrape time).
    pub fn set_instances(&self, ready: i64, not_ready: i64, unknown: i64, update_available: i64) {
        self.instances
            .get_or_create(&ReadyLabels { ready: "true" })
            .set(ready);
        self.instances
            .get_or_create(&ReadyLabels { ready: "false" })
            .set(not_ready);
        self.instances
            .get_or_create(&ReadyLabels { ready: "unknown" })
            .set(unknown);
        self.update_available.set(update_available);
    }

    /// Sets the per-instance condition gauges from the status a pass wrote.
    pub fn set_conditions(&self, instance: &InstanceLabels, conditions: &[Condition]) {
        let mut bits = 0u8;
        for (i, condition) in CONDITION_TYPES.into_iter().enumerate() {
            let is_true = conditions
                .iter()
                .any(|c| c.type_ == condition && c.status == "True");
            bits |= u8::from(is_true) << i;
        }
        self.instance_condition
            .0
            .update(instance, |s| s.conditions = Some(bits));
    }

    /// Sets the per-instance token expiry gauge (seconds until the token expires), or removes it
    /// (`None`: the expiry is not known).
    pub fn set_token_expiry(&self, instance: &InstanceLabels, seconds: Option<i64>) {
        self.token_expiry
            .0
            .update(instance, |s| s.token_expiry = seconds);
    }

    /// Removes every per-instance series of a NetbirdInstance that is gone.
    pub fn forget_instance(&self, instance: &InstanceLabels) {
        self.previous_token_in_use.remove(instance);
        self.token_expiry.0.lock().remove(instance);
    }
}

impl CallObserver for Metrics {
    fn observe(&self, endpoint: Endpoint, status: Option<u16>) {
        self.netbird_requests
            .get_or_create(&CallLabels {
                endpoint: endpoint.as_str(),
                class: status_class(status),
            })
            .inc();
        if endpoint == Endpoint::Setup {
            self.setup_calls.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "Any".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            ),
        }
    }

    #[test]
    fn instance_conditions_are_exported_per_instance_and_forgotten() {
        let m = Metrics::default();
        let nb = InstanceLabels {
            namespace: "netbird".into(),
            name: "nb".into(),
        };
        m.set_conditions(
            &nb,
            &[condition("Ready", "False"), condition("Stalled", "True")],
        );
        let text = m.encode();
        let series = r#"netbird_operator_instance_condition{namespace="netbird",name="nb","#;
        for line in [
            format!(r#"{series}condition="Ready"}} 0"#),
            format!(r#"{series}condition="Stalled"}} 1"#),
            format!(r#"{series}condition="UpdateAvailable"}} 0"#),
        ] {
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        // Stalled is removed when false: the gauge follows
        m.set_conditions(
            &nb,
            &[
                condition("Ready", "True"),
                condition("UpdateAvailable", "True"),
            ],
        );
        let text = m.encode();
        assert!(text.contains(r#"condition="Ready"} 1"#), "{text}");
        assert!(text.contains(r#"condition="Stalled"} 0"#), "{text}");
        assert!(text.contains(r#"condition="UpdateAvailable"} 1"#), "{text}");
        m.set_token_expiry(&nb, Some(3600));
        let expiry = r#"netbird_operator_token_expiry_seconds{namespace="netbird",name="nb"} 3600"#;
        assert!(m.encode().contains(expiry));
        m.forget_instance(&nb);
        let text = m.encode();
        assert!(
            !text.contains(r#"name="nb""#),
            "series left after forget:\n{text}"
        );
    }

    /// The four series of an instance (Ready True, a known token expiry), with 10,000 instances:
    /// kept in one map entry per instance, against a Family per metric (what they were).
    #[test]
    fn footprint_of_the_per_instance_series() {
        use crate::footprint::kept_by;
        const N: usize = 10_000;
        let labels = |i: usize| InstanceLabels {
            namespace: "scale-10000".into(),
            name: format!("s{i}"),
        };
        let conditions = [
            condition("Ready", "True"),
            condition("SetupComplete", "True"),
            condition("TokenAvailable", "True"),
            condition("UpdateAvailable", "False"),
        ];
        let m = Metrics::default();
        let (_, now) = kept_by(|| {
            for i in 0..N {
                m.set_conditions(&labels(i), &conditions);
                m.set_token_expiry(&labels(i), Some(3600));
            }
        });
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct ConditionLabels {
            namespace: String,
            name: String,
            condition: &'static str,
        }
        let (families, before) = kept_by(|| {
            let conditions = Family::<ConditionLabels, Gauge>::default();
            let expiry = Family::<InstanceLabels, Gauge>::default();
            for i in 0..N {
                for condition in CONDITION_TYPES {
                    let InstanceLabels { namespace, name } = labels(i);
                    conditions
                        .get_or_create(&ConditionLabels {
                            namespace,
                            name,
                            condition,
                        })
                        .set(1);
                }
                expiry.get_or_create(&labels(i)).set(3600);
            }
            (conditions, expiry)
        });
        drop(families);
        eprintln!(
            "per-instance series: {} bytes per instance (a Family per metric: {})",
            now / N as isize,
            before / N as isize
        );
        assert!(now < before / 3, "{now} against {before}");
    }
}
