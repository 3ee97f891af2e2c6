//! What a process holds to take part in traces: its sampler and its exporter.

use std::time::SystemTime;

use crate::context::{SpanContext, SpanId, TraceId, tracestate};
use crate::export::{Config, Exporter, Stats};
use crate::sampler::Sampler;
use crate::span::{Attributes, Event, Kind, Span, Status};

#[derive(Clone, Debug)]
pub struct Tracer {
    sampler: Sampler,
    exporter: Exporter,
}

/// A span being recorded: where it sits in its trace, and when it began.
#[derive(Clone, Debug)]
pub struct Recording {
    /// This span (its id is the parent of what it calls).
    pub ctx: SpanContext,
    pub parent: Option<SpanId>,
    pub tracestate: Option<String>,
    pub start: SystemTime,
    pub events: Vec<Event>,
}

impl Tracer {
    pub fn new(sampler: Sampler, exporter: Exporter) -> Tracer {
        Tracer { sampler, exporter }
    }

    /// From OpenTelemetry's variables, when an endpoint is set; starts the exporter on the
    /// current runtime. `service` names the process unless the variables do.
    pub fn from_env(service: &str) -> Result<Option<Tracer>, String> {
        Ok(
            Config::from_env(service)?
                .map(|c| Tracer::new(Sampler::from_env(), Exporter::start(c))),
        )
    }

    /// Starts a span continuing the caller's `traceparent` (or a new trace), when the
    /// sampler records it. `None` costs nothing further: the caller's trace context
    /// passes on untouched.
    pub fn begin(&self, traceparent: Option<&[u8]>, state: Option<&[u8]>) -> Option<Recording> {
        let parent = traceparent.and_then(SpanContext::parse);
        let trace_id = match parent {
            Some(p) => p.trace_id,
            // A root the sampler never records (sampling 0) costs no random id.
            None if self.sampler.ratio <= 0.0 => return None,
            None => TraceId::random(),
        };
        if !self.sampler.sampled(parent.as_ref(), trace_id) {
            return None;
        }
        Some(Recording {
            ctx: SpanContext {
                trace_id,
                span_id: SpanId::random(),
                sampled: true,
            },
            parent: parent.map(|p| p.span_id),
            tracestate: parent.and(state).and_then(tracestate),
            start: SystemTime::now(),
            events: Vec::new(),
        })
    }

    /// Queues a finished span.
    pub fn record(&self, span: Span) {
        self.exporter.record(span);
    }

    pub fn stats(&self) -> &Stats {
        self.exporter.stats()
    }

    /// `tessera_trace_spans_{exported,dropped}_total`, for a process's `/metrics`.
    pub fn render_metrics(&self, out: &mut tessera_metrics::Text) {
        use std::sync::atomic::Ordering::Relaxed;
        use tessera_metrics::Kind::Counter;
        let s = self.stats();
        out.single(
            "tessera_trace_spans_exported_total",
            Counter,
            "Spans the collector accepted.",
            s.exported.load(Relaxed),
        );
        out.single(
            "tessera_trace_spans_dropped_total",
            Counter,
            "Spans lost: the export queue was full or the collector failed.",
            s.dropped.load(Relaxed),
        );
    }

    /// Exports what is queued, waiting at most `limit` (see [`Exporter::flush`]).
    pub async fn flush(&self, limit: std::time::Duration) {
        self.exporter.flush(limit).await;
    }

    /// What a stopping process calls last, so its final requests' spans go out with it: a
    /// flush of at most 5 s (a collector that is down costs the stop no more).
    pub async fn flush_at_exit(tracer: Option<&Tracer>) {
        if let Some(t) = tracer {
            t.flush(std::time::Duration::from_secs(5)).await;
        }
    }
}

impl Recording {
    /// A span under this one, starting now (a call it makes).
    pub fn child(&self) -> Recording {
        Recording {
            ctx: SpanContext {
                span_id: SpanId::random(),
                ..self.ctx
            },
            parent: Some(self.ctx.span_id),
            tracestate: self.tracestate.clone(),
            start: SystemTime::now(),
            events: Vec::new(),
        }
    }

    /// The span, ended now.
    pub fn finish(
        self,
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: Kind,
        attributes: Attributes,
        status: Status,
    ) -> Span {
        Span {
            trace_id: self.ctx.trace_id,
            span_id: self.ctx.span_id,
            parent: self.parent,
            tracestate: self.tracestate,
            name: name.into(),
            kind,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            events: self.events,
            status,
        }
    }
}
