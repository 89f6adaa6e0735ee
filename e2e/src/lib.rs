//! Mailroom's end-to-end test lives in `tests/cluster.rs`: `helm install` of `charts/mailroom`
//! on a real kube-apiserver + kube-controller-manager whose only node is
//! `mailroom_testkit::FakeKubelet` (pods run as local processes), a real nats-server, a DNS
//! server and a slow SMTP sink; mail sent with Python's smtplib is delivered through an MX
//! lookup while the operator scales the outbound workers up and down. The manifests it
//! applies are in `manifests/`. It needs root (network namespaces) and the tools that
//! `e2e/tools/build.sh` builds.
