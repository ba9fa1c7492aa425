//! What every txcoord process sets up at start: logging ([`txcoord_participant::init_logging`])
//! and, when an OTLP endpoint is configured, OpenTelemetry trace export over OTLP/HTTP
//! (protobuf), so the spans of the coordinator, the SDK's participants and the HTTP bridge
//! reach one collector and show each transaction as one trace.
//!
//! Configuration is OpenTelemetry's own environment: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns export on; `OTEL_SERVICE_NAME` overrides the
//! service name; `OTEL_BSP_SCHEDULE_DELAY` and the other `OTEL_BSP_*` tune the batching.
//! Without an endpoint nothing is exported and the spans are no-ops.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a bad endpoint, no HTTP client).
    #[error("OTLP exporter for {endpoint}: {source}")]
    Exporter {
        /// The endpoint configured.
        endpoint: String,
        /// What the exporter said.
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Keeps export running; dropping it flushes the spans still queued and stops export.
#[must_use = "dropping it stops export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing the last spans failed");
        }
    }
}

/// The OTLP endpoint from the environment, if export is configured.
fn endpoint() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .find(|v| !v.trim().is_empty())
}

/// Sets up logging, then OTLP export when configured, naming this process `service`
/// (unless `OTEL_SERVICE_NAME` says otherwise). Call once, at start, before any span.
pub fn init(service: &str) -> Result<Telemetry, TelemetryError> {
    txcoord_participant::init_logging();
    let Some(endpoint) = endpoint() else {
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.clone(),
            source,
        })?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| service.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(name.clone()).build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing::info!(%endpoint, service = %name, "exporting traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}
