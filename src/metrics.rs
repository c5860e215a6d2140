//! Prometheus metrics. Labels are bounded sets (endpoint, status class, reason, condition type),
//! never error text; object names appear only on the per-instance series (`namespace`, `name`),
//! bounded by the number of NetbirdInstances and removed with them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::encoding::EncodeLabelSet;
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

/// One condition of one NetbirdInstance (`condition` is one of [`CONDITION_TYPES`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub name: String,
    pub condition: &'static str,
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
    pub token_expiry: Family<InstanceLabels, Gauge>,
    /// Instances the passes keep something in memory about (backoff, verification, retry gate):
    /// returns to where it was when instances go away, whatever state they were in.
    pub remembered_instances: Gauge,
    pub instance_condition: Family<ConditionLabels, Gauge>,
    pub previous_token_in_use: Family<InstanceLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("netbird_operator");
        let r = &mut registry;
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
            token_expiry: register(
                r,
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
            instance_condition: register(
                r,
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
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
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
        for condition in CONDITION_TYPES {
            let is_true = conditions
                .iter()
                .any(|c| c.type_ == condition && c.status == "True");
            self.instance_condition
                .get_or_create(&ConditionLabels {
                    namespace: instance.namespace.clone(),
                    name: instance.name.clone(),
                    condition,
                })
                .set(i64::from(is_true));
        }
    }

    /// Removes every per-instance series of a NetbirdInstance that is gone.
    pub fn forget_instance(&self, instance: &InstanceLabels) {
        self.token_expiry.remove(instance);
        self.previous_token_in_use.remove(instance);
        for condition in CONDITION_TYPES {
            self.instance_condition.remove(&ConditionLabels {
                namespace: instance.namespace.clone(),
                name: instance.name.clone(),
                condition,
            });
        }
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
        m.token_expiry.get_or_create(&nb).set(3600);
        m.forget_instance(&nb);
        let text = m.encode();
        assert!(
            !text.contains(r#"name="nb""#),
            "series left after forget:\n{text}"
        );
    }
}
