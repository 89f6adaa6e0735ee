//! The `MailListener` reconciler.

use super::*;

fn listener_secrets(ml: &MailListener) -> Vec<SecretUse<'_>> {
    let spec = &ml.spec;
    let mut uses = Vec::new();
    if let (Some(secret), Some(tls)) = (&spec.tls_secret_ref, &spec.listener.tls) {
        uses.push(SecretUse {
            field: "spec.tlsSecretRef",
            secret,
            keys: vec![
                ("spec.tls.certFile".to_owned(), tls.cert_file.clone()),
                ("spec.tls.keyFile".to_owned(), tls.key_file.clone()),
            ],
            // The server reloads its certificate files when they change.
            rolls: false,
        });
    }
    if let (Some(secret), Some(auth)) = (&spec.users_secret_ref, &spec.listener.auth) {
        uses.push(SecretUse {
            field: "spec.usersSecretRef",
            secret,
            keys: vec![("spec.auth.usersFile".to_owned(), auth.users_file.clone())],
            rolls: true,
        });
    }
    uses
}

async fn apply_listener(
    ml: &MailListener,
    ctx: &Context,
) -> Result<(Rollout, Option<String>), Error> {
    let namespace = ml.namespace().unwrap_or_default();
    let digest = dereference(&ctx.client, &namespace, &listener_secrets(ml)).await?;
    let objects = render_listener(ml, &ctx.settings, &digest)?;
    let before =
        existing_deployment(&ctx.client, &namespace, &objects.deployment.name_any()).await?;
    apply(&ctx.client, &objects.config_map).await?;
    let service = apply(&ctx.client, &objects.service).await?;
    apply(&ctx.client, &objects.pdb).await?;
    let deployment = apply_deployment(ctx, ml, before.as_ref(), &objects.deployment, None).await?;
    Ok((Rollout::of(&deployment), service_address(&service)))
}

/// The load balancer's address, else the cluster IP.
fn service_address(service: &Service) -> Option<String> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|list| list.first());
    ingress
        .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .or_else(|| service.spec.as_ref().and_then(|s| s.cluster_ip.clone()))
        .filter(|a| !a.is_empty() && a != "None")
}

/// Reconciles one `MailListener`.
pub async fn reconcile_listener(ml: Arc<MailListener>, ctx: Arc<Context>) -> Result<Action, Error> {
    observed(&*ml, &ctx, "MailListener", async {
        let result = apply_listener(&ml, &ctx).await;
        let current = ml.status.clone();
        let previous = current.as_ref().map(|s| &s.conditions);
        let mut status = current.clone().unwrap_or_default();
        let outcome = match &result {
            Ok((rollout, address)) => {
                status.replicas = Some(rollout.replicas);
                status.ready_replicas = Some(rollout.ready);
                status.address = address.clone();
                status.ports = Some(
                    ml.spec
                        .service
                        .ports
                        .iter()
                        .map(|p| p.port.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                );
                Outcome::Applied(*rollout)
            }
            Err(e) => e.outcome(),
        };
        if let Some(traffic) = ctx.listener_traffic(&ml).await {
            status.traffic = Some(traffic);
        }
        status.observed_generation = ml.metadata.generation;
        status.conditions = status::conditions(
            previous_conditions(previous),
            ml.metadata.generation,
            "inbound pods",
            &outcome,
            now(),
        );
        write_status::<MailListener, MailListenerStatus>(
            &ctx.client,
            &ml,
            current.as_ref(),
            &status,
        )
        .await?;
        // Back soon for the traffic counts.
        result.map(|_| Action::requeue(ctx.backlog_refresh))
    })
    .await
}

pub(super) fn listener_secret_names(ml: &MailListener) -> Vec<&str> {
    secret_names(listener_secrets(ml))
}
