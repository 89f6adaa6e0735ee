# syntax=docker/dockerfile:1
# The one mailroom image: `mailroom operator` (the Helm chart runs it), `mailroom inbound` and
# `mailroom outbound` (the pods the operator creates), `mailroom serve`.
#
#   docker build -t registry.example.com/mailroom:0.1.0 .
#   docker push registry.example.com/mailroom:0.1.0
#
# Build stage: the release binary. The cache mounts (BuildKit) keep the crates.io downloads and
# the target dir between builds; the binary is copied out of the cached target dir.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Line tables only (the release profile keeps full debug info for profiling): backtraces keep
# file:line, the image stays small.
ENV CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mailroom \
 && cp target/release/mailroom /mailroom

# Runtime: distroless with glibc and libgcc (cc), CA certificates and tzdata, no shell, no
# package manager; the `nonroot` variant's user 65532 (the chart's runAsUser).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /mailroom /mailroom
USER 65532:65532
# SMTP (listeners choose their ports; 2525 in the samples), /metrics + /healthz + /readyz of
# the mail pods (9325) and of the operator (9326).
EXPOSE 2525 9325 9326
ENTRYPOINT ["/mailroom"]
