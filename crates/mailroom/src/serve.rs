//! `mailroom serve`, `inbound`, `outbound` and `check`: one process runs the listeners, the
//! delivery workers, or both, around one queue.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use mailroom_config::Config;
use mailroom_inbound::{InboundDeps, Listener, Shutdown, report};
use mailroom_outbound::shaping::{KvStore, MemoryStore, ShapingStore};
use mailroom_outbound::{Worker, WorkerDeps};
use mailroom_telemetry::{DeliveryLog, LogFormat, Readiness, init_tracing, serve_http};
use tokio_util::sync::CancellationToken;

use crate::backend::open_queue_and_context;
use crate::load_config;

/// Raises the open-files limit to the hard limit: every connection is a descriptor.
fn raise_nofile() {
    if let Ok((soft, hard)) = rlimit::Resource::NOFILE.get()
        && soft < hard
        && let Err(e) = rlimit::Resource::NOFILE.set(hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit");
    }
}

/// Validates everything `serve` would use, without binding or writing anything.
pub fn check(path: Option<&Path>) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let mut problems = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let hostname = config.listener_hostname(l);
        if let Err(e) =
            mailroom_inbound::ListenerContext::check(l, &format!("listeners[{i}]"), &hostname)
        {
            problems.push(e.to_string());
        }
    }
    let policies = config.effective_policies();
    for policy in &policies {
        if let Err(e) = Worker::check(policy, &config.effective_hostname()) {
            problems.push(e.to_string());
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    let origin = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "embedded default config".into());
    println!(
        "{origin}: ok ({} listener(s), {} delivery policy(ies))",
        config.listeners.len(),
        policies.len()
    );
    Ok(())
}

/// The file in the local spool directory that mirrors the rules' actions in force.
pub const RULES_FILE: &str = "rules.json";

/// What one process runs.
#[derive(Clone, Debug)]
struct Roles {
    listeners: bool,
    /// Delivery workers: none, or the policies to run (`None` = all).
    workers: Option<Option<String>>,
}

/// Loads a pod's config file, which must use the cluster queue.
fn load_pod_config(path: &Path, command: &str) -> anyhow::Result<Config> {
    let config = load_config(Some(path))?;
    if config.queue.jetstream.is_none() {
        anyhow::bail!(
            "{}: queue.jetstream: `mailroom {command}` runs in a pod and needs the cluster \
             queue; set queue.jetstream, or use `mailroom serve` for the local spool",
            path.display()
        );
    }
    Ok(config)
}

/// `mailroom inbound`: the listeners of an inbound pod; the queue must be the cluster's.
pub fn run_inbound(path: &Path) -> anyhow::Result<()> {
    let config = load_pod_config(path, "inbound")?;
    if config.listeners.is_empty() {
        anyhow::bail!(
            "{}: listeners: `mailroom inbound` needs at least one",
            path.display()
        );
    }
    let roles = Roles {
        listeners: true,
        workers: None,
    };
    start(config, roles)
}

/// `mailroom outbound`: the delivery workers of a pod; the queue must be the cluster's.
pub fn run_outbound(path: &Path, policy: Option<&str>) -> anyhow::Result<()> {
    let config = load_pod_config(path, "outbound")?;
    if let Some(name) = policy
        && !config.effective_policies().iter().any(|p| p.name == name)
    {
        anyhow::bail!(
            "{}: --policy {name}: no such policy in the file",
            path.display()
        );
    }
    let roles = Roles {
        listeners: false,
        workers: Some(policy.map(str::to_owned)),
    };
    start(config, roles)
}

/// Runs the listeners, the delivery workers and the embedded queue until SIGINT or SIGTERM.
pub fn run(path: Option<&Path>) -> anyhow::Result<()> {
    let roles = Roles {
        listeners: true,
        workers: Some(None),
    };
    start(load_config(path)?, roles)
}

/// The queue's lease time, from whichever backend is configured.
fn lease_time(config: &Config) -> Duration {
    match (&config.queue.jetstream, &config.queue.local) {
        (Some(js), _) => js.lease_time.as_duration(),
        (None, Some(local)) => local.lease_time.as_duration(),
        (None, None) => Duration::from_secs(300),
    }
}

fn start(config: Config, roles: Roles) -> anyhow::Result<()> {
    let format = match config.log.format {
        mailroom_config::LogFormat::Json => LogFormat::Json,
        _ => LogFormat::Text,
    };
    init_tracing(&config.log.level, format);
    raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(config, roles))
}

async fn serve(config: Config, roles: Roles) -> anyhow::Result<()> {
    let (queue, jetstream) = open_queue_and_context(&config.queue, None, false).await?;
    let delivery_log = DeliveryLog::open(config.log.delivery_log.as_deref().map(Path::new))?;
    let deps = InboundDeps {
        queue: Arc::clone(&queue),
        delivery_log,
        hostname: config.effective_hostname(),
        shared: match (&jetstream, &config.queue.jetstream) {
            (Some(js), Some(spec)) => Some(mailroom_plugins::SharedBackend {
                jetstream: js.clone(),
                stream: spec.stream.clone(),
                replicas: usize::from(spec.replicas),
            }),
            _ => None,
        },
    };
    let mut workers = Vec::new();
    if let Some(only) = &roles.workers {
        // The local spool's directory also keeps the rules' actions in force, for
        // `mailroom queue stats`.
        let memory: Arc<dyn ShapingStore> = Arc::new(match &config.queue.local {
            Some(local) => MemoryStore::with_file(Path::new(&local.path).join(RULES_FILE)),
            None => MemoryStore::default(),
        });
        for policy in config.effective_policies() {
            if only.as_ref().is_some_and(|name| *name != policy.name) {
                continue;
            }
            if policy.hold {
                tracing::info!(policy = %policy.name, "policy on hold: its mail stays queued");
                continue;
            }
            // Limits hold across the cluster when the queue is; in one process otherwise.
            let shaping: Arc<dyn ShapingStore> = match (&jetstream, &config.queue.jetstream) {
                (Some(js), Some(spec)) => Arc::new(
                    KvStore::open(js, &spec.stream, &policy.name, usize::from(spec.replicas))
                        .await
                        .with_context(|| {
                            format!("policies[{}]: traffic shaping state", policy.name)
                        })?,
                ),
                _ => Arc::clone(&memory),
            };
            let worker_deps = WorkerDeps {
                queue: Arc::clone(&queue),
                delivery_log: deps.delivery_log.clone(),
                hostname: config.effective_hostname(),
                lease_time: lease_time(&config),
                shaping,
            };
            workers.push(Worker::new(&policy, worker_deps)?);
        }
    }
    let mut listeners = Vec::new();
    let mut grace = Duration::from_secs(0);
    let listener_specs = if roles.listeners {
        config.listeners.as_slice()
    } else {
        &[]
    };
    for (i, spec) in listener_specs.iter().enumerate() {
        let l = Listener::bind(spec, &format!("listeners[{i}]"), &deps).await?;
        tracing::info!(listener = %spec.name, address = %l.local_addr()?, mode = ?spec.mode, "listening");
        grace = grace.max(spec.timeouts.shutdown_grace.as_duration());
        listeners.push(l);
    }
    let ready = Arc::new(AtomicBool::new(false));
    let readiness: Readiness = {
        let ready = Arc::clone(&ready);
        let queue = Arc::clone(&queue);
        Arc::new(move || {
            if !ready.load(Ordering::Acquire) {
                return Err("listeners not started".into());
            }
            if !queue.is_ready() {
                return Err(format!("queue ({}) unavailable", queue.backend()));
            }
            Ok(())
        })
    };
    let http_stop = CancellationToken::new();
    let http_addr = config.http.socket_addr();
    let (bound, http_task) = serve_http(http_addr, readiness, http_stop.clone()).await?;
    tracing::info!(address = %bound, "http endpoints /metrics /healthz /readyz");

    let shutdown = Shutdown::default();
    let tasks: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(l.run(shutdown.clone())))
        .collect();
    // With the cluster queue, the listeners' counts go to JetStream KV for the operator.
    let report_stop = CancellationToken::new();
    let report_task = match (&jetstream, &config.queue.jetstream) {
        (Some(js), Some(spec)) if !listener_specs.is_empty() => {
            match report::open(js, &spec.stream, usize::from(spec.replicas)).await {
                Ok(store) => Some(tokio::spawn(report::run(
                    store,
                    listener_specs.iter().map(|l| l.name.clone()).collect(),
                    mailroom_config::system_hostname(),
                    report_stop.clone(),
                ))),
                Err(e) => {
                    tracing::warn!(error = %e, "listener counts will not be reported");
                    None
                }
            }
        }
        _ => None,
    };
    let worker_stop = CancellationToken::new();
    // Deliveries still running at shutdown get this long; the queue hands out the rest again.
    let worker_grace = Duration::from_secs(20);
    let worker_tasks: Vec<_> = workers
        .into_iter()
        .map(|w| tokio::spawn(w.run(worker_stop.clone(), worker_grace)))
        .collect();
    ready.store(true, Ordering::Release);
    tracing::info!(
        queue = queue.backend(),
        listeners = listener_specs.len(),
        workers = worker_tasks.len(),
        "mailroom ready"
    );

    wait_for_signal().await;
    ready.store(false, Ordering::Release);
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections; open transactions may finish"
    );
    shutdown.stop.cancel();
    let abort = shutdown.abort.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        abort.cancel();
    });
    worker_stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    for t in worker_tasks {
        let _ = t.await;
    }
    report_stop.cancel();
    if let Some(t) = report_task {
        let _ = t.await;
    }
    http_stop.cancel();
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
