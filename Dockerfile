# syntax=docker/dockerfile:1
# Multi-stage build: a static-enough release binary on a distroless, non-root base. No shell at run
# time. Build for another architecture with --platform linux/arm64 (buildx sets TARGETARCH).
ARG RUST_VERSION=1.95
FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
WORKDIR /src
RUN case "$TARGETARCH" in \
      amd64) echo x86_64-unknown-linux-gnu > /target ;; \
      arm64) echo aarch64-unknown-linux-gnu > /target ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && rustup target add "$(cat /target)" \
 && if [ "$TARGETARCH" = arm64 ] && [ "$(uname -m)" != aarch64 ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross; \
    fi
ENV CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin netbird-operator --target "$(cat /target)" \
 && cp "target/$(cat /target)/release/netbird-operator" /netbird-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /netbird-operator /usr/local/bin/netbird-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/netbird-operator"]
CMD ["run"]
