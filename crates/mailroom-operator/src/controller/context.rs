//! What every reconcile shares: the client, the settings, each namespace's queue and
//! stores, and the per-object memory (backoff, autoscaler windows, traffic).

use super::*;

/// Opens the queue of one namespace (its stream, [`Settings::queue_for`]): the queue, and the
/// JetStream context its traffic-shaping state lives in.
pub type QueueOpener = Arc<
    dyn Fn(JetStreamQueueSpec) -> BoxFuture<'static, Result<NamespaceQueue, String>> + Send + Sync,
>;

/// One namespace's queue, as [`QueueOpener`] returns it.
#[derive(Clone)]
pub struct NamespaceQueue {
    /// The queue (backlogs).
    pub queue: Arc<dyn Queue>,
    /// Where the workers keep traffic-shaping state (rules in force), if anywhere.
    pub jetstream: Option<async_nats::jetstream::Context>,
}

/// Shared by every reconcile.
pub struct Context {
    pub(super) client: Client,
    pub(super) settings: Settings,
    recorder: Recorder,
    open_queue: QueueOpener,
    queues: tokio::sync::Mutex<HashMap<String, NamespaceQueue>>,
    pub(super) backlog_refresh: Duration,
    failures: Mutex<HashMap<String, u32>>,
    pub(super) stabilizers: Mutex<HashMap<String, autoscale::Stabilizer>>,
    pub(super) last_scale: Mutex<HashMap<String, ScaleDecision>>,
    traffic: Mutex<HashMap<String, crate::traffic::Tracker>>,
    shaping_stores: tokio::sync::Mutex<HashMap<String, Arc<KvStore>>>,
    stats_stores: tokio::sync::Mutex<HashMap<String, async_nats::jetstream::kv::Store>>,
}

impl Context {
    /// A context; `instance` names this operator replica in Events (its pod name).
    pub fn new(
        client: Client,
        settings: Settings,
        open_queue: QueueOpener,
        instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance,
            },
        );
        Self {
            client,
            settings,
            recorder,
            open_queue,
            queues: tokio::sync::Mutex::new(HashMap::new()),
            backlog_refresh: BACKLOG_REFRESH,
            failures: Mutex::new(HashMap::new()),
            stabilizers: Mutex::new(HashMap::new()),
            last_scale: Mutex::new(HashMap::new()),
            traffic: Mutex::new(HashMap::new()),
            shaping_stores: tokio::sync::Mutex::new(HashMap::new()),
            stats_stores: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// How often each policy's backlog is read into its status (default [`BACKLOG_REFRESH`]).
    #[must_use]
    pub fn with_backlog_refresh(mut self, every: Duration) -> Self {
        self.backlog_refresh = every;
        self
    }

    /// The queue of `namespace`, opened on first use.
    pub(super) async fn queue(&self, namespace: &str) -> Result<NamespaceQueue, Error> {
        let mut queues = self.queues.lock().await;
        if let Some(q) = queues.get(namespace) {
            return Ok(q.clone());
        }
        let spec = self.settings.queue_for(namespace);
        let opened = (self.open_queue)(spec.clone())
            .await
            .map_err(|e| Error::Queue(format!("stream {}: {e}", spec.stream)))?;
        queues.insert(namespace.to_owned(), opened.clone());
        Ok(opened)
    }

    /// The workers' shaping state of `policy` in `namespace` (opened once, then reused).
    pub(super) async fn shaping_store(
        &self,
        namespace: &str,
        policy: &str,
    ) -> Result<Arc<KvStore>, String> {
        let key = format!("{namespace}/{policy}");
        let mut stores = self.shaping_stores.lock().await;
        if let Some(store) = stores.get(&key) {
            return Ok(Arc::clone(store));
        }
        let js = self
            .queue(namespace)
            .await
            .map_err(|e| e.to_string())?
            .jetstream
            .ok_or("the queue has no JetStream context")?;
        let queue = self.settings.queue_for(namespace);
        let store = KvStore::open(&js, &queue.stream, policy, usize::from(queue.replicas))
            .await
            .map_err(|e| e.to_string())?;
        let store = Arc::new(store);
        stores.insert(key, Arc::clone(&store));
        Ok(store)
    }

    /// The rules in force and the last errors for `policy` in `namespace`, from the workers'
    /// shaping state; empty when unknown (logged; the store is opened again next time).
    pub(super) async fn shaping_state(
        &self,
        namespace: &str,
        policy: &str,
    ) -> (Vec<Override>, Vec<LastError>) {
        let read = async {
            let store = self.shaping_store(namespace, policy).await?;
            let rules = store.overrides().await.map_err(|e| e.to_string())?;
            let errors = store.last_errors().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((rules, errors))
        };
        match read.await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(policy, error = %e, "cannot read the shaping state");
                self.shaping_stores
                    .lock()
                    .await
                    .remove(&format!("{namespace}/{policy}"));
                (Vec::new(), Vec::new())
            }
        }
    }

    /// The listener counts bucket of `namespace` (opened once, then reused).
    pub(super) async fn stats_store(
        &self,
        namespace: &str,
    ) -> Result<async_nats::jetstream::kv::Store, String> {
        let mut stores = self.stats_stores.lock().await;
        if let Some(store) = stores.get(namespace) {
            return Ok(store.clone());
        }
        let js = self
            .queue(namespace)
            .await
            .map_err(|e| e.to_string())?
            .jetstream
            .ok_or("the queue has no JetStream context")?;
        let spec = self.settings.queue_for(namespace);
        let store = report::open(&js, &spec.stream, usize::from(spec.replicas)).await?;
        stores.insert(namespace.to_owned(), store.clone());
        Ok(store)
    }

    /// The listener's recent traffic from its pods' reported totals; `None` when they cannot
    /// be read (logged; the bucket is opened again next time).
    pub(super) async fn listener_traffic(
        &self,
        ml: &MailListener,
    ) -> Option<crate::crd::ListenerTraffic> {
        let namespace = ml.namespace().unwrap_or_default();
        let read = async {
            let store = self.stats_store(&namespace).await?;
            report::read(&store, &ml.name_any()).await
        };
        match read.await {
            Ok(readings) => Some(
                self.traffic
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(key(ml))
                    .or_default()
                    .observe(Instant::now(), &readings),
            ),
            Err(e) => {
                tracing::warn!(listener = %ml.name_any(), error = %e, "cannot read listener counts");
                self.stats_stores.lock().await.remove(&namespace);
                None
            }
        }
    }

    /// Records a failure of `key` and returns how long to wait before the next try.
    pub(super) fn backoff(&self, key: String) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        let shift = (*n - 1).min(6);
        Duration::from_secs(2u64 << shift).min(Duration::from_secs(120))
    }

    pub(super) fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }

    /// Publishes an Event. The recorder folds Events with the same reason and `action` into
    /// one series that keeps the first note, so `action` must tell distinct happenings apart
    /// (`Scale1To3`, `Rollout<checksum>`); repeated failures share `Reconcile`.
    pub(super) async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        (reason, action): (&str, String),
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action,
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}
