//! Mailroom's Kubernetes operator. So far: the custom resources [`MailListener`] and
//! [`DeliveryPolicy`] ([`crd`]), whose specs wrap the `mailroom-config` model, and the CRD
//! YAML generated from them ([`generate`]), which `mailroom crd` prints and `crds/` holds.
//! Later stages (render, reconcile, status, autoscaler) build on these types.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod autoscale;
pub mod controller;
pub mod crd;
pub mod generate;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod status;
pub mod traffic;

pub use crd::{
    Backlog, DeliveryPolicy, DeliveryPolicyResourceSpec, DeliveryPolicyStatus, DestinationStatus,
    ListenerService, ListenerTraffic, MailListener, MailListenerSpec, MailListenerStatus,
    RuleInForce, ScaleDecision, SecretRef, ServicePort, ServiceType, TrafficPolicy, WorkerBounds,
};

#[cfg(test)]
mod tests;
