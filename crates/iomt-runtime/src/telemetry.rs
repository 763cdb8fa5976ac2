//! Traces over OTLP, off unless the standard OpenTelemetry environment names an endpoint.
//!
//! The spans are the ones the logs already have (`write_group` per group write, `fhir_request`
//! per FHIR request, `normalize_batch` at debug), so a trace shows where a group's time went:
//! its writes, their retries and the FHIR server's answers. They carry types, counts, methods
//! and statuses, never device or patient ids: the same rule as info-level logs.
//!
//! Configured the way every OpenTelemetry SDK is, so a collector injected by an operator works
//! unchanged: `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` (default `iomt`),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_SDK_DISABLED`. Which spans are
//! exported is `IOMT_TRACES` (an `EnvFilter` directive, default `info` for iomt's crates).
//! Only OTLP over HTTP with protobuf is built in (the collector's port 4318): gRPC would add
//! tonic and a second HTTP stack for the same spans.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The spans exported when `IOMT_TRACES` is not set: iomt's own, from info up.
const DEFAULT_FILTER: &str = "warn,iomt=info,iomt_runtime=info,iomt_fhir=info,iomt_eventhubs=info";

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting is not one iomt can use.
    #[error("{variable}: {message}")]
    Setting {
        /// The environment variable.
        variable: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The exporter could not be built.
    #[error("cannot export traces over OTLP: {0}")]
    Exporter(String),
}

/// The trace pipeline while it runs; dropping it sends the spans still buffered.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Traces {
    /// Starts exporting when the environment names an OTLP endpoint; `None` otherwise (and
    /// with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`).
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        if endpoint.is_none() || disabled {
            return Ok(None);
        }
        for variable in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = env(variable)
                && protocol != "http/protobuf"
            {
                return Err(TelemetryError::Setting {
                    variable,
                    message: format!(
                        "iomt exports traces over http/protobuf only, not {protocol}: point the endpoint at the collector's OTLP/HTTP port (4318)"
                    ),
                });
            }
        }
        // The builder reads the endpoint, headers and timeout from the same variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let mut resource = Resource::builder();
        if env("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("iomt");
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Some(Self { provider }))
    }

    /// The layer that turns spans into OpenTelemetry spans, with its own filter: what is
    /// exported does not depend on what `RUST_LOG` prints.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    {
        let filter = tracing_subscriber::EnvFilter::try_from_env("IOMT_TRACES")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("iomt"))
            .with_filter(filter)
    }
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            // Logging may be gone by now: stderr is what is left.
            eprintln!("warning: traces not all exported: {e}");
        }
    }
}
