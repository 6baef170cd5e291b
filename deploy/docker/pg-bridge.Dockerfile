# The pg-bridge image. Build from the repository root (the build context is the whole workspace):
#   docker build -f deploy/docker/pg-bridge.Dockerfile -t pgws/pg-bridge .
# Builder: the release binaries of the three services, with the versions of Cargo.lock, in one
# cargo run. This stage is the same in the three Dockerfiles (tests/it/deploy.rs checks it),
# so the first image built compiles the workspace once and the others take it from the cache.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ws-gateway -p pg-bridge -p pg-recorder \
 && install -D -m 0755 -t /out target/release/ws-gateway target/release/pg-bridge \
      target/release/pg-recorder

# Runtime: Debian slim (the glibc of the builder), CA certificates for TLS connections (a
# tls:// NATS URL), curl for the container health check on the admin port, an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pgws \
 && useradd --system --uid 10001 --gid pgws --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin pgws
COPY --from=builder /out/pg-bridge /usr/local/bin/pg-bridge
USER 10001:10001
# admin listener (PGWS_ADMIN_PORT); the bridge talks to PostgreSQL and NATS only
EXPOSE 9101
ENTRYPOINT ["/usr/local/bin/pg-bridge"]
