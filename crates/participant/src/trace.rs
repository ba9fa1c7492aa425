//! OpenTelemetry spans around a command, continuing the W3C trace that came with it.
//!
//! Only the OpenTelemetry API: a process that installs no tracer provider (see the
//! `txcoord-telemetry` crate) gets no-op spans that cost next to nothing. A command's
//! trace context is its NATS `traceparent` header when valid (the coordinator's span for
//! that send), else the `traceparent` field of the command (the client's), else none.

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};

/// The instrumentation scope of every span txcoord makes.
pub const SCOPE: &str = "txcoord";

/// The remote parent a W3C `traceparent` names, as an OpenTelemetry context; `None` when
/// `value` is not a valid `traceparent`.
pub fn remote_context(value: &str) -> Option<Context> {
    let value = txcoord_proto::traceparent(value)?;
    let mut parts = value.split('-');
    let (_version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let ctx = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    ctx.is_valid()
        .then(|| Context::new().with_remote_span_context(ctx))
}

/// The `traceparent` that names the current span of `cx` (version 00), `None` when it has
/// no valid span.
pub fn traceparent_of(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Starts a span named `name` of `kind` as a child of `parent` (a root when `None`), with
/// `attributes`; the span ends when the returned context's last clone is dropped, or at
/// [`end`].
pub fn start(
    name: String,
    kind: SpanKind,
    parent: Option<&Context>,
    attributes: Vec<KeyValue>,
) -> Context {
    let tracer = global::tracer(SCOPE);
    let parent = parent.cloned().unwrap_or_default();
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// The attributes of a span about one command: its transaction, service, step, kind and
/// attempt (the same on the coordinator's send span and the participant's span).
pub fn command_attributes(cmd: &txcoord_proto::ParticipantCommand) -> Vec<KeyValue> {
    vec![
        KeyValue::new("txcoord.txn_id", cmd.txn_id.clone()),
        KeyValue::new("txcoord.service", cmd.service.clone()),
        KeyValue::new("txcoord.step", cmd.step as i64),
        KeyValue::new("txcoord.command", cmd.kind.as_str()),
        KeyValue::new("txcoord.attempt", i64::from(cmd.attempt)),
    ]
}

/// Ends the span of `cx` now, marking it an error with `error` when given.
pub fn end(cx: &Context, error: Option<String>) {
    let span = cx.span();
    if let Some(e) = error {
        span.set_status(opentelemetry::trace::Status::error(e));
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_bad_ones_are_none() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote_context(tp).unwrap();
        assert_eq!(traceparent_of(&cx).as_deref(), Some(tp));
        assert!(
            remote_context("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(remote_context("00-not-a-trace").is_none());
        assert!(traceparent_of(&Context::new()).is_none());
    }

    #[test]
    fn without_a_provider_a_child_keeps_its_parents_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = remote_context(tp).unwrap();
        let child = start("x".into(), SpanKind::Internal, Some(&parent), Vec::new());
        let got = traceparent_of(&child).unwrap();
        assert!(
            got.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{got}"
        );
    }
}
