//! Command line: `netbird-operator run`, `netbird-operator crd`, `--version`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::controller::{self, Context, Settings};
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::netbird::{ClientOptions, ProxySettings};
use crate::telemetry::{self, LogFormat};

#[derive(Parser, Debug)]
#[command(
    name = "netbird-operator",
    version,
    about = "Bootstraps self-hosted NetBird management servers and keeps their API token in a \
             Secret"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller (in-cluster, or with $KUBECONFIG / ~/.kube/config).
    Run(RunArgs),
    /// Print the NetbirdInstance CustomResourceDefinition as YAML.
    Crd {
        /// Print it as the Helm chart's template (installed and upgraded with the chart, kept on
        /// uninstall).
        #[arg(long)]
        helm: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Watch only these namespaces (repeat the flag, or separate them with commas; the
    /// environment variable takes a comma-separated list). Default: all namespaces.
    #[arg(long = "namespace", env = "WATCH_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter (RUST_LOG overrides it).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// NetbirdInstances reconciled at once. A pass mostly waits on the network, and a server that
    /// never answers holds its slot for the request timeout: with 8, forty hanging servers kept
    /// every other instance waiting (measured in `make bench`).
    #[arg(long, env = "CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    /// Connect timeout for NetBird, in seconds.
    #[arg(long, env = "NETBIRD_CONNECT_TIMEOUT", default_value_t = 5)]
    pub netbird_connect_timeout: u64,
    /// Whole-request timeout for NetBird, in seconds.
    #[arg(long, env = "NETBIRD_REQUEST_TIMEOUT", default_value_t = 30)]
    pub netbird_request_timeout: u64,
    /// Longest wait between retries of a failing instance, in seconds.
    #[arg(long, env = "MAX_BACKOFF", default_value_t = 300)]
    pub max_backoff: u64,
    /// How long the finalizer of `deletionPolicy: Delete` keeps trying to delete the token on the
    /// NetBird server, in seconds from the deletion request, before it lets the NetbirdInstance go.
    #[arg(long, env = "FINALIZER_TIMEOUT", default_value_t = 900)]
    pub finalizer_timeout: u64,
    /// After SIGTERM, how long a token write still failing keeps trying, in seconds (keep it
    /// below the pod's terminationGracePeriodSeconds; the chart sets it 10 s below).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value_t = 50)]
    pub shutdown_timeout: u64,
    /// Name of this replica in Events and in the leader Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Reconcile only while holding the Lease `netbird-operator-leader` (for more than one
    /// replica).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (default: the pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Key prefixes of spec.token.secretLabels and secretAnnotations to refuse besides the
    /// built-in ones (bootstrap.netbird.io/ and the well-known Secret copiers), for a Secret copier
    /// of this cluster: a NetbirdInstance with such a key is Stalled/InvalidSpec and its token
    /// Secret is not written (repeat the flag, or separate them with commas).
    #[arg(
        long = "refused-secret-key-prefixes",
        env = "REFUSED_SECRET_KEY_PREFIXES",
        value_delimiter = ','
    )]
    pub refused_secret_key_prefixes: Vec<String>,
}

pub async fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crd { helm } => {
            print!(
                "{}",
                if helm {
                    crate::crd::crd_helm_template()
                } else {
                    crate::crd::crd_yaml()
                }
            );
            ExitCode::SUCCESS
        }
        Command::Run(args) => match run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "netbird-operator stopped");
                eprintln!("netbird-operator: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Why `netbird-operator run` stopped with an error. Each message names what failed and its cause
/// once (the cause is not also a `source`).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to connect to Kubernetes (in-cluster or $KUBECONFIG): {0}")]
    Connect(kube::Error),
    #[error("failed to listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("failed to set up leader election (Lease {lease}): {error}")]
    LeaderElection {
        lease: String,
        error: kube_lease_manager::LeaseManagerError,
    },
    #[error("{0}")]
    Proxy(crate::netbird::ClientBuildError),
    #[error("leader election stopped")]
    LeaderElectionStopped,
    #[error("lost the leader Lease")]
    LostLease,
}

/// The egress proxy for calls to NetBird, from `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY`: checked
/// and logged once at start-up.
fn netbird_proxy() -> Result<ProxySettings, RunError> {
    let proxy = ProxySettings::from_env();
    proxy.check().map_err(RunError::Proxy)?;
    if proxy.is_set() {
        info!(proxy = %proxy.describe(), "calls to NetBird go through the egress proxy");
    }
    Ok(proxy)
}

async fn run(args: RunArgs) -> Result<(), RunError> {
    telemetry::init(args.log_format, &args.log_level);
    crate::tls::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .map_err(RunError::Connect)?;
    let listener = http::bind(args.http_addr)
        .await
        .map_err(|error| RunError::Listen {
            addr: args.http_addr,
            error,
        })?;
    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::default());
    let settings = settings(&args)?;
    let settings_namespaces = settings.namespaces.clone();
    let ctx = Arc::new(Context::new(
        client,
        metrics.clone(),
        settings,
        shutdown.clone(),
    ));

    let store_slot: Arc<OnceLock<InstanceStore>> = Arc::default();
    let health = health_with_gauges(&store_slot, &metrics);
    let http_task = tokio::spawn(http::serve(
        listener,
        health.clone(),
        metrics,
        shutdown.clone(),
    ));

    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down");
        signals.cancel();
    });

    info!(
        version = env!("CARGO_PKG_VERSION"),
        namespaces = %describe_namespaces(&settings_namespaces),
        http = %args.http_addr,
        "netbird-operator starting"
    );
    let result = if args.leader_election {
        run_as_leader(&args, ctx, store_slot, health.clone()).await
    } else {
        let ready = health.clone();
        controller::run(ctx, store_slot, move || {
            info!("watches synced; ready");
            ready.set_ready();
        })
        .await;
        Ok(())
    };
    shutdown.cancel();
    let _ = http_task.await;
    result
}

/// The controller's settings from the command line (and the egress proxy from the environment).
fn settings(args: &RunArgs) -> Result<Settings, RunError> {
    Ok(Settings {
        namespaces: watched_namespaces(&args.namespaces),
        concurrency: args.concurrency.max(1),
        netbird: ClientOptions {
            connect_timeout: Duration::from_secs(args.netbird_connect_timeout.max(1)),
            request_timeout: Duration::from_secs(args.netbird_request_timeout.max(1)),
            proxy: netbird_proxy()?,
            ..ClientOptions::default()
        },
        instance_id: args.pod_name.clone(),
        max_backoff: Duration::from_secs(args.max_backoff.max(1)),
        finalizer_timeout: Duration::from_secs(args.finalizer_timeout),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        refused_secret_key_prefixes: args
            .refused_secret_key_prefixes
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        ..Settings::default()
    })
}

/// The health endpoints, refreshing the instance gauges from the controller's store.
fn health_with_gauges(
    store_slot: &Arc<OnceLock<InstanceStore>>,
    metrics: &Arc<Metrics>,
) -> Arc<Health> {
    let gauges_store = store_slot.clone();
    let gauges_metrics = metrics.clone();
    Arc::new(Health::new(move || {
        if let Some(store) = gauges_store.get() {
            let (r, n, u, up) = controller::instance_gauges(store);
            gauges_metrics.set_instances(r, n, u, up);
        }
    }))
}

/// The controller's store of NetbirdInstances (set once the controller runs).
type InstanceStore = kube::runtime::reflector::Store<crate::crd::NetbirdInstance>;

/// Reconciles only while this replica holds the Lease. Losing it stops the process: the controller
/// stops taking work at once, and the pod restarts as a follower (the controller-runtime
/// convention), so two replicas never reconcile together for longer than the Lease's grace period.
async fn run_as_leader(
    args: &RunArgs,
    ctx: Arc<Context>,
    store_slot: Arc<OnceLock<InstanceStore>>,
    health: Arc<Health>,
) -> Result<(), RunError> {
    let namespace = args
        .leader_election_namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let identity = args
        .pod_name
        .clone()
        .unwrap_or_else(|| format!("netbird-operator-{}", std::process::id()));
    let lease = format!("{namespace}/{LEASE_NAME}");
    let leases: kube::Api<Lease> = kube::Api::namespaced(ctx.client.clone(), &namespace);
    let (mut leader, mut lease_task) =
        watch_lease(&ctx.client, &namespace, &identity, &lease).await?;
    // a follower is ready: it serves health and waits
    health.set_ready();
    info!(lease = %lease, identity = %identity, "waiting to become leader");
    if !wait_to_lead(
        &ctx,
        &leases,
        &namespace,
        &identity,
        &lease,
        &mut leader,
        &mut lease_task,
    )
    .await?
    {
        return Ok(());
    }
    info!(identity = %identity, "became leader; reconciling");
    let stopped = lead(ctx, store_slot, leader).await;
    // the renewals stop only now: a token write still retrying at SIGTERM kept the Lease
    lease_task.abort();
    let _ = lease_task.await;
    if let Some(e) = stopped {
        return Err(e);
    }
    // a normal stop (SIGTERM, the controller drained): free the Lease so that the next leader
    // need not wait for it to expire
    match release_lease(&leases, &identity).await {
        Ok(true) => info!(lease = %lease, "released the leader Lease"),
        Ok(false) => info!(lease = %lease, "the leader Lease was no longer ours; left as is"),
        Err(e) => warn!(lease = %lease, error = %e, "failed to release the leader Lease; the next \
                                                     leader takes it when it expires"),
    }
    Ok(())
}

/// The lease manager's task (it takes and renews the Lease).
type LeaseTask =
    tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>;

/// Waits as a follower until this replica leads (`true`) or a shutdown comes (`false`).
async fn wait_to_lead(
    ctx: &Context,
    leases: &kube::Api<Lease>,
    namespace: &str,
    identity: &str,
    lease: &str,
    leader: &mut tokio::sync::watch::Receiver<bool>,
    lease_task: &mut LeaseTask,
) -> Result<bool, RunError> {
    let shutdown = ctx.shutdown.clone();
    // the lease manager sleeps until the holder's Lease expires; a holder that stops normally
    // releases it, which a GET every second notices, and a new manager takes it at once
    let mut poll = tokio::time::interval(RELEASE_POLL);
    loop {
        if *leader.borrow_and_update() {
            return Ok(true);
        }
        tokio::select! {
            changed = leader.changed() => {
                if changed.is_err() {
                    return Err(RunError::LeaderElectionStopped);
                }
            }
            _ = poll.tick() => {
                if lease_is_free(leases).await {
                    info!(lease = %lease, "the leader released the Lease; taking it");
                    match watch_lease(&ctx.client, namespace, identity, lease).await {
                        Ok((new_leader, new_task)) => {
                            lease_task.abort();
                            let _ = (&mut *lease_task).await;
                            (*leader, *lease_task) = (new_leader, new_task);
                        }
                        Err(e) => warn!(error = %e, "failed to restart the lease manager"),
                    }
                }
            }
            _ = shutdown.cancelled() => {
                lease_task.abort();
                return Ok(false);
            }
        }
    }
}

/// Runs the controller while this replica leads; losing the Lease stops it (`LostLease`).
async fn lead(
    ctx: Arc<Context>,
    store_slot: Arc<OnceLock<InstanceStore>>,
    mut leader: tokio::sync::watch::Receiver<bool>,
) -> Option<RunError> {
    let stop = ctx.shutdown.clone();
    let args_shutdown_timeout = ctx.settings.shutdown_timeout;
    let lost = async move {
        loop {
            if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                return;
            }
        }
    };
    let controller = controller::run(ctx, store_slot, || info!("watches synced"));
    tokio::pin!(controller);
    let stopped = tokio::select! {
        _ = &mut controller => None,
        _ = lost => {
            error!("lost the leader Lease; stopping");
            // no new passes; a pass holding a token it just received may finish storing it, as at
            // a SIGTERM: its write gives up at the shutdown deadline and says loudly what is lost
            // (the margin lets that line be written before the process ends)
            stop.cancel();
            let wait = args_shutdown_timeout + std::time::Duration::from_secs(2);
            let _ = tokio::time::timeout(wait, &mut controller).await;
            Some(RunError::LostLease)
        }
    };
    stop.cancel();
    stopped
}

/// Name of the leader Lease (in the release namespace).
pub const LEASE_NAME: &str = "netbird-operator-leader";
/// How often a follower looks whether the leader released the Lease.
const RELEASE_POLL: Duration = Duration::from_secs(1);

/// Starts the lease manager: a task that takes the Lease when free or expired and renews it while
/// held; the channel says whether this replica holds it.
async fn watch_lease(
    client: &kube::Client,
    namespace: &str,
    identity: &str,
    lease: &str,
) -> Result<
    (
        tokio::sync::watch::Receiver<bool>,
        tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
    ),
    RunError,
> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await
        .map_err(|error| RunError::LeaderElection {
            lease: lease.to_string(),
            error,
        })?;
    Ok(manager.watch().await)
}

/// Whether the Lease has no holder (released).
async fn lease_is_free(leases: &kube::Api<Lease>) -> bool {
    match leases.get_opt(LEASE_NAME).await {
        Ok(Some(l)) => l
            .spec
            .and_then(|s| s.holder_identity)
            .is_none_or(|h| h.is_empty()),
        _ => false,
    }
}

/// Clears the Lease's holder if it is still `identity`, with optimistic concurrency (the patch
/// carries the resourceVersion read: a replica that took the Lease meanwhile keeps it). Whether it
/// was released.
pub async fn release_lease(leases: &kube::Api<Lease>, identity: &str) -> Result<bool, kube::Error> {
    let Some(current) = leases.get_opt(LEASE_NAME).await? else {
        return Ok(false);
    };
    let holder = current
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref());
    if holder != Some(identity) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "spec": {"holderIdentity": null, "acquireTime": null, "renewTime": null,
            "leaseDurationSeconds": null},
    });
    match leases
        .patch(
            LEASE_NAME,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The namespaces to watch from the flag's values: trimmed, without empty entries (the chart
/// passes an empty `WATCH_NAMESPACE` for all namespaces), sorted, each once. Empty: all.
pub fn watched_namespaces(values: &[String]) -> Vec<String> {
    let mut namespaces: Vec<String> = values
        .iter()
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    namespaces
}

fn describe_namespaces(namespaces: &[String]) -> String {
    if namespaces.is_empty() {
        "(all)".into()
    } else {
        namespaces.join(",")
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces(args: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(["netbird-operator", "run"].iter().chain(args))
            .expect("valid arguments");
        let Command::Run(run) = cli.command else {
            panic!("not run");
        };
        watched_namespaces(&run.namespaces)
    }

    #[test]
    fn namespace_flag_is_repeatable_and_takes_commas() {
        // WATCH_NAMESPACE is read by the same argument (the chart sets it; the as_installed suite
        // runs the binary with a comma-separated value)
        if std::env::var_os("WATCH_NAMESPACE").is_some() {
            return;
        }
        assert!(namespaces(&[]).is_empty(), "default: all namespaces");
        assert_eq!(namespaces(&["--namespace", "a"]), ["a"]);
        assert_eq!(
            namespaces(&["--namespace", "b", "--namespace", "a"]),
            ["a", "b"]
        );
        assert_eq!(namespaces(&["--namespace", "b,a,b"]), ["a", "b"]);
        assert_eq!(
            namespaces(&["--namespace=c", "--namespace", "a,b"]),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn empty_and_blank_entries_mean_nothing() {
        let v =
            |s: &[&str]| watched_namespaces(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert!(
            v(&[""]).is_empty(),
            "the chart's empty WATCH_NAMESPACE: all namespaces"
        );
        assert!(v(&["", " "]).is_empty());
        assert_eq!(v(&[" a", "b ", "", "a"]), ["a", "b"]);
    }
}
