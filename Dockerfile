# One image with every binary: txcoord (coordinator, CLI, demo) and the example services.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY crates crates
COPY participants participants
COPY benches benches
COPY examples examples


RUN cargo build --release --workspace --bins \
 && mkdir /out \
 && cp target/release/txcoord target/release/txcoord-inventory target/release/txcoord-payment target/release/txcoord-order target/release/txcoord-bank /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates procps \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER nobody
CMD ["txcoord", "--help"]
