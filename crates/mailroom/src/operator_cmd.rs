//! `mailroom operator`: the Kubernetes operator. Connects to the API server (KUBECONFIG or the
//! pod's service account) and to the JetStream queue (for policy backlogs), serves
//! `/metrics`, `/healthz` and `/readyz`, and reconciles MailListeners and DeliveryPolicies,
//! optionally only while it holds the leader Lease.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Args;
use mailroom_config::{JetStreamQueueSpec, QueueSpec};
use mailroom_operator::controller::{self, Context, NamespaceQueue, QueueOpener};
use mailroom_operator::leader::LeaderElection;
use mailroom_operator::render::Settings;
use mailroom_telemetry::{LogFormat, Readiness, init_tracing, serve_http};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::open_queue_and_context;

/// Settings of `mailroom operator`; every flag also reads an environment variable, which is
/// how the Helm chart sets them.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Image of the inbound and outbound pods.
    #[arg(long, env = "MAILROOM_IMAGE", default_value = concat!("mailroom:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// imagePullPolicy of those pods (Always, IfNotPresent, Never).
    #[arg(long, env = "MAILROOM_IMAGE_PULL_POLICY")]
    image_pull_policy: Option<String>,
    /// NATS server URLs of the queue, comma-separated (ignored with --queue-config).
    #[arg(
        long,
        env = "MAILROOM_NATS_URL",
        value_delimiter = ',',
        default_value = "nats://nats:4222"
    )]
    nats_url: Vec<String>,
    /// A YAML file with the `queue.jetstream` settings the pods use (urls, stream,
    /// credentialsFile, tls, ...): file paths in it are paths inside the pods.
    #[arg(long, env = "MAILROOM_QUEUE_CONFIG")]
    queue_config: Option<PathBuf>,
    /// A Secret of this name in each resource's namespace is mounted in the pods at
    /// /etc/mailroom/queue (NATS credentials, CA).
    #[arg(long, env = "MAILROOM_QUEUE_SECRET")]
    queue_secret: Option<String>,
    /// Watch only these namespaces, comma-separated (default: all namespaces; then the
    /// operator needs cluster-wide permissions, else only Roles in these namespaces).
    #[arg(long, env = "MAILROOM_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "MAILROOM_OPERATOR_HTTP", default_value = "0.0.0.0:9326")]
    http: SocketAddr,
    /// Reconcile only while holding the Lease (for more than one replica).
    #[arg(long, env = "MAILROOM_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (default: the first watched namespace, else `default`).
    #[arg(long, env = "MAILROOM_LEADER_ELECT_NAMESPACE")]
    leader_elect_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "MAILROOM_LEADER_ELECT_LEASE",
        default_value = "mailroom-operator"
    )]
    leader_elect_lease: String,
    /// This replica's name in the Lease and in Events (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often each policy's backlog is read into its status.
    #[arg(long, env = "MAILROOM_BACKLOG_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    backlog_interval: std::time::Duration,
    /// Log level of the operator (error, warn, info, debug, trace or a filter).
    #[arg(long, env = "MAILROOM_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log level written into the pods' config.
    #[arg(long, env = "MAILROOM_POD_LOG_LEVEL", default_value = "info")]
    pod_log_level: String,
    /// Log as JSON lines.
    #[arg(long, env = "MAILROOM_LOG_JSON")]
    log_json: bool,
}

impl OperatorArgs {
    fn queue(&self) -> anyhow::Result<JetStreamQueueSpec> {
        let Some(path) = &self.queue_config else {
            return Ok(JetStreamQueueSpec {
                urls: self.nats_url.clone(),
                ..JetStreamQueueSpec::default()
            });
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--queue-config {}: cannot read", path.display()))?;
        let spec: JetStreamQueueSpec = serde_saphyr::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "--queue-config {}: not a queue.jetstream section: {e}",
                path.display()
            )
        })?;
        Ok(spec)
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    text.parse::<mailroom_config::HumanDuration>()
        .map(|d| d.as_duration())
        .map_err(|e| e.to_string())
}

/// Runs the operator until SIGINT or SIGTERM (or until it loses the leader Lease).
pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
    init_tracing(
        &args.log_level,
        if args.log_json {
            LogFormat::Json
        } else {
            LogFormat::Text
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(operate(args))
}

async fn operate(args: OperatorArgs) -> anyhow::Result<()> {
    let queue_spec = args.queue()?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG, or the pod's service account)")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(mailroom_config::system_hostname);
    let settings = Settings {
        image: args.image.clone(),
        image_pull_policy: args.image_pull_policy.clone(),
        queue: queue_spec,
        queue_secret: args.queue_secret.clone(),
        log_level: args.pod_log_level.clone(),
    };
    // Each namespace's queue is its own stream, opened when a resource there first needs it.
    let open_queue: QueueOpener = Arc::new(|spec: JetStreamQueueSpec| {
        Box::pin(async move {
            let queue = QueueSpec {
                local: None,
                jetstream: Some(spec),
            };
            let (queue, jetstream) = open_queue_and_context(&queue, None, true)
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok(NamespaceQueue { queue, jetstream })
        })
    });
    let ctx = Arc::new(
        Context::new(client.clone(), settings, open_queue, Some(identity.clone()))
            .with_backlog_refresh(args.backlog_interval),
    );

    let stop = CancellationToken::new();
    let started = Arc::new(AtomicBool::new(false));
    let readiness: Readiness = {
        let started = Arc::clone(&started);
        Arc::new(move || {
            if !started.load(Ordering::Acquire) {
                return Err("not started".into());
            }
            Ok(())
        })
    };
    let (bound, http_task) = serve_http(args.http, readiness, stop.clone()).await?;
    tracing::info!(address = %bound, "http endpoints /metrics /healthz /readyz");
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::serve::wait_for_signal().await;
            tracing::info!("signal received, stopping");
            stop.cancel();
        });
    }
    started.store(true, Ordering::Release);

    let result = if args.leader_elect {
        let namespace = args
            .leader_elect_namespace
            .clone()
            .or_else(|| args.watch_namespaces.first().cloned())
            .unwrap_or_else(|| "default".to_owned());
        lead_and_run(ctx, &args, client, namespace, identity, stop.clone()).await
    } else {
        tracing::info!(namespaces = ?args.watch_namespaces, "reconciling");
        controller::run(
            ctx,
            args.watch_namespaces.clone(),
            stop.clone().cancelled_owned(),
        )
        .await;
        Ok(())
    };
    stop.cancel();
    let _ = http_task.await;
    result
}

/// Reconciles while this replica holds the Lease. Losing it ends the process with an error
/// (the pod restarts and competes again), like client-go's leader election: two replicas never
/// reconcile at once.
async fn lead_and_run(
    ctx: Arc<Context>,
    args: &OperatorArgs,
    client: kube::Client,
    namespace: String,
    identity: String,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let election = LeaderElection::new(
        client,
        namespace.clone(),
        &args.leader_elect_lease,
        identity,
    );
    let (tx, mut rx) = watch::channel(false);
    let election_task = tokio::spawn(election.run(tx, stop.clone()));
    tracing::info!(lease = %args.leader_elect_lease, %namespace, "waiting for the leader Lease");
    let led = tokio::select! {
        _ = stop.cancelled() => false,
        led = rx.wait_for(|leading| *leading) => led.is_ok(),
    };
    if led {
        tracing::info!(namespaces = ?args.watch_namespaces, "leading: reconciling");
        let lost = CancellationToken::new();
        let until = {
            let (lost, stop) = (lost.clone(), stop.clone());
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = lost.cancelled() => {}
                }
            }
        };
        let watch_lost = {
            let lost = lost.clone();
            async move {
                let _ = rx.wait_for(|leading| !*leading).await;
                lost.cancel();
            }
        };
        tokio::select! {
            () = controller::run(Arc::clone(&ctx), args.watch_namespaces.clone(), until) => {}
            () = watch_lost => {}
        }
        if lost.is_cancelled() && !stop.is_cancelled() {
            stop.cancel();
            let _ = election_task.await;
            anyhow::bail!("lost the leader Lease; exiting so that one replica reconciles");
        }
    }
    stop.cancel();
    match election_task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("leader election"),
        Err(e) => Err(e).context("leader election task"),
    }
}
