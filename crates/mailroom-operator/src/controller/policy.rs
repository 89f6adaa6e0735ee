//! The `DeliveryPolicy` reconciler: workers, autoscaling, status and the drain finalizer.

use super::*;

fn policy_secrets(dp: &DeliveryPolicy) -> Vec<SecretUse<'_>> {
    let spec = &dp.spec;
    let mut uses = Vec::new();
    if let Some(secret) = &spec.dkim_secret_ref {
        uses.push(SecretUse {
            field: "spec.dkimSecretRef",
            secret,
            keys: spec
                .policy
                .dkim
                .iter()
                .enumerate()
                .map(|(i, d)| (format!("spec.dkim[{i}].keyFile"), d.key_file.clone()))
                .collect(),
            rolls: true,
        });
    }
    if let (Some(secret), Some(relay)) = (&spec.relay_secret_ref, &spec.policy.routing.relay) {
        let mut keys = Vec::new();
        if let Some(file) = &relay.password_file {
            keys.push(("spec.routing.relay.passwordFile".to_owned(), file.clone()));
        }
        if let Some(file) = &relay.ca_file {
            keys.push(("spec.routing.relay.caFile".to_owned(), file.clone()));
        }
        uses.push(SecretUse {
            field: "spec.relaySecretRef",
            secret,
            keys,
            rolls: true,
        });
    }
    uses
}

/// The worker count applied to a policy's Deployment, and the scaling decision when it changed.
struct Scaling {
    replicas: i32,
    decision: Option<ScaleDecision>,
}

/// The autoscaler's choice for `dp`: the recommendation for `backlog`, stabilised, from
/// `current` workers; without a backlog (queue unreachable) the current count within bounds.
fn scale(
    ctx: &Context,
    dp: &DeliveryPolicy,
    current: Option<i32>,
    backlog: Option<&QueueBacklog>,
) -> Scaling {
    let Some(backlog) = backlog else {
        return Scaling {
            replicas: render::worker_replicas(dp, current),
            decision: None,
        };
    };
    let rec = autoscale::recommend(&dp.spec, backlog);
    let window = dp.spec.workers.scale_down_window.as_duration();
    let replicas = match current {
        None => rec.replicas,
        Some(current) => ctx
            .stabilizers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key(dp))
            .or_default()
            .apply(Instant::now(), window, current, rec.replicas),
    };
    let mut reason = rec.reason;
    if replicas != rec.replicas {
        reason.push_str(&format!(
            "; keeping {replicas} for the scale-down window ({})",
            dp.spec.workers.scale_down_window
        ));
    }
    let mut last = ctx
        .last_scale
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let decision = if current == Some(replicas) {
        // The object this reconcile read may predate the status write of the one that
        // scaled; this replica's memory does not.
        last.get(&key(dp)).cloned()
    } else {
        let decision = ScaleDecision {
            time: now(),
            from: current.unwrap_or(0),
            to: replicas,
            reason,
        };
        last.insert(key(dp), decision.clone());
        Some(decision)
    };
    Scaling { replicas, decision }
}

async fn apply_policy(
    dp: &DeliveryPolicy,
    ctx: &Context,
    backlog: Option<&QueueBacklog>,
) -> Result<(Rollout, Scaling), Error> {
    let namespace = dp.namespace().unwrap_or_default();
    let digest = dereference(&ctx.client, &namespace, &policy_secrets(dp)).await?;
    let name = render::policy_child_name(&dp.name_any());
    let before = existing_deployment(&ctx.client, &namespace, &name).await?;
    let current = before
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    let scaling = scale(ctx, dp, current, backlog);
    let objects = render_policy(dp, &ctx.settings, scaling.replicas, &digest)?;
    apply(&ctx.client, &objects.config_map).await?;
    let reason = scaling
        .decision
        .as_ref()
        .filter(|d| Some(d.to) != current)
        .map(|d| d.reason.as_str());
    let deployment =
        apply_deployment(ctx, dp, before.as_ref(), &objects.deployment, reason).await?;
    Ok((Rollout::of(&deployment), scaling))
}

async fn policy_backlog(ctx: &Context, dp: &DeliveryPolicy) -> Result<QueueBacklog, Error> {
    let namespace = dp.namespace().unwrap_or_default();
    let mut backlogs = ctx
        .queue(&namespace)
        .await?
        .queue
        .backlogs()
        .await
        .map_err(|e| Error::Queue(e.to_string()))?;
    Ok(backlogs.remove(&dp.name_any()).unwrap_or_default())
}

/// When the oldest entry of each listed destination's domains was accepted; empty (the
/// status then shows no ages) when the queue cannot say.
async fn oldest_queued(
    ctx: &Context,
    dp: &DeliveryPolicy,
    groups: &[status::DestinationGroup],
) -> std::collections::BTreeMap<String, u64> {
    let domains: Vec<String> = groups.iter().flat_map(|g| g.domains.clone()).collect();
    if domains.is_empty() {
        return Default::default();
    }
    let namespace = dp.namespace().unwrap_or_default();
    let result = match ctx.queue(&namespace).await {
        Ok(q) => q
            .queue
            .oldest_queued(&dp.name_any(), &domains)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    result.unwrap_or_else(|error| {
        tracing::warn!(policy = %dp.name_any(), %error, "cannot read the oldest queued entries");
        Default::default()
    })
}

fn status_backlog(b: &QueueBacklog) -> Backlog {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Backlog {
        ready: count(b.ready),
        deferred: count(b.deferred),
        leased: count(b.leased),
    }
}

async fn policy_status(
    dp: &DeliveryPolicy,
    ctx: &Context,
    result: &Result<(Rollout, Scaling), Error>,
    backlog: Option<&QueueBacklog>,
) -> Result<(), Error> {
    let current = dp.status.clone();
    let mut status = current.clone().unwrap_or_default();
    let outcome = match result {
        Ok((rollout, scaling)) => {
            status.replicas = Some(rollout.replicas);
            status.ready_replicas = Some(rollout.ready);
            status.desired_replicas = Some(scaling.replicas);
            if let Some(decision) = &scaling.decision {
                status.last_scale = Some(decision.clone());
            }
            Outcome::Applied(*rollout)
        }
        Err(e) => e.outcome(),
    };
    if let Some(b) = backlog {
        status.backlog = Some(status_backlog(b));
        let (rules, errors) = ctx
            .shaping_state(&dp.namespace().unwrap_or_default(), &dp.name_any())
            .await;
        let groups = status::destination_groups(&dp.spec, b, &rules);
        let oldest = oldest_queued(ctx, dp, &groups).await;
        status.destinations =
            status::destinations(&groups, &rules, &errors, &oldest, mailroom_queue::now_ms());
    }
    status.observed_generation = dp.metadata.generation;
    status.conditions = status::conditions(
        previous_conditions(current.as_ref().map(|s| &s.conditions)),
        dp.metadata.generation,
        "workers",
        &outcome,
        now(),
    );
    write_status::<DeliveryPolicy, DeliveryPolicyStatus>(&ctx.client, dp, current.as_ref(), &status)
        .await
}

async fn policy_apply_event(dp: Arc<DeliveryPolicy>, ctx: &Context) -> Result<Action, Error> {
    // Without the backlog (queue unreachable) the workers keep their count and the rollout
    // goes on: a queue outage must not stop configuration changes.
    let backlog = match policy_backlog(ctx, &dp).await {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(policy = %dp.name_any(), error = %e, "cannot read the backlog");
            None
        }
    };
    let result = apply_policy(&dp, ctx, backlog.as_ref()).await;
    policy_status(&dp, ctx, &result, backlog.as_ref()).await?;
    result.map(|_| Action::requeue(ctx.backlog_refresh))
}

async fn policy_cleanup(dp: Arc<DeliveryPolicy>, ctx: &Context) -> Result<Action, Error> {
    let forced = dp
        .annotations()
        .get(FORCE_DELETE_ANNOTATION)
        .is_some_and(|v| v == "true");
    let backlog = match policy_backlog(ctx, &dp).await {
        Ok(b) => b,
        Err(e) if forced => {
            tracing::warn!(policy = %dp.name_any(), error = %e, "forced deletion without reading the backlog");
            QueueBacklog::default()
        }
        Err(e) => {
            let blocked = Error::DeletionBlocked(format!(
                "deletion waits: the queue backlog cannot be read ({e}); annotate \
                 {FORCE_DELETE_ANNOTATION}=true to delete anyway"
            ));
            policy_status(&dp, ctx, &Err(blocked), None).await?;
            return Err(Error::DeletionBlocked(e.to_string()));
        }
    };
    let left = backlog.ready + backlog.deferred + backlog.leased;
    if left > 0 && !forced {
        let message = format!(
            "deletion waits for {left} queued messages ({} ready, {} deferred, {} in delivery) \
             to leave; annotate {FORCE_DELETE_ANNOTATION}=true to delete anyway",
            backlog.ready, backlog.deferred, backlog.leased
        );
        policy_status(
            &dp,
            ctx,
            &Err(Error::DeletionBlocked(message.clone())),
            Some(&backlog),
        )
        .await?;
        return Err(Error::DeletionBlocked(message));
    }
    if left > 0 {
        ctx.event(
            &*dp,
            EventType::Warning,
            ("ForcedDeletion", "Delete".to_owned()),
            format!("deleted with {left} messages still queued ({FORCE_DELETE_ANNOTATION})"),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Reconciles one `DeliveryPolicy` (with its finalizer).
pub async fn reconcile_policy(dp: Arc<DeliveryPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    observed(&*dp, &ctx, "DeliveryPolicy", async {
        let api: Api<DeliveryPolicy> =
            Api::namespaced(ctx.client.clone(), &dp.namespace().unwrap_or_default());
        finalizer(&api, QUEUE_FINALIZER, dp.clone(), |event| async {
            match event {
                Finalize::Apply(dp) => policy_apply_event(dp, &ctx).await,
                Finalize::Cleanup(dp) => policy_cleanup(dp, &ctx).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    })
    .await
}

pub(super) fn policy_secret_names(dp: &DeliveryPolicy) -> Vec<&str> {
    secret_names(policy_secrets(dp))
}
