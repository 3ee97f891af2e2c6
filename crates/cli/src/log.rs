//! The process's logs, on stderr: text for a person at a terminal, or JSON lines for a
//! collector (Loki, Elasticsearch, CloudWatch) that should not have to parse text.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// How log lines are written (`--log-format`, `TESSERA_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line per event; coloured only when stderr is a terminal, so files get no
    /// escape codes.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the
    /// event's fields at the top level.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format this process logs in: the demo starts its processes with the same.
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Installs the subscriber. `TESSERA_LOG` filters, in `tracing`'s env-filter syntax
/// (default `info`); a value that does not parse is reported, not silently replaced.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let (filter, bad) = match std::env::var("TESSERA_LOG") {
        Err(_) => (EnvFilter::new("info"), None),
        Ok(v) => match EnvFilter::try_new(&v) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("{v:?}: {e}"))),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .event_format(WithTrace(
                tracing_subscriber::fmt::format().json().flatten_event(true),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .init(),
    }
    if let Some(why) = bad {
        tracing::warn!("TESSERA_LOG is not a filter, logging at info: {why}");
    }
}

/// JSON lines that name the trace and span of the request being served, when it is
/// recorded (`tessera_trace::scope`), so a log line and its trace find each other.
struct WithTrace<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTrace<F>
where
    F: FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some(span) = tessera_trace::scope::current_context() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        // One object and a newline: the ids go in before the object's end.
        match line.trim_end().strip_suffix('}') {
            Some(head) => writeln!(
                writer,
                "{head},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                span.trace_id, span.span_id
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn json_lines_inside_a_recorded_request_name_its_trace_and_span() {
        let lines = Lines::default();
        let out = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(WithTrace(
                tracing_subscriber::fmt::format().json().flatten_event(true),
            ))
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // Spans go nowhere (nothing listens on port 9): only the logs matter here.
        let config =
            tessera_trace::Config::new("http://127.0.0.1:9/v1/traces".parse().unwrap(), "t");
        let tracer = tessera_trace::Tracer::new(
            tessera_trace::Sampler::default(),
            tessera_trace::Exporter::start(config),
        );
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let req = http::Request::get("/x")
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
            .body(())
            .unwrap();
        tracing::info!("before");
        let span = tessera_trace::scope::serve(Some(&tracer), req, None, |_| async {
            tracing::info!(answer = 42, "inside");
            http::Response::new(tessera_trace::scope::current_context())
        })
        .await
        .into_body()
        .unwrap();
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let parsed: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        assert_eq!(parsed.len(), 2, "{text}");
        assert!(parsed[0].get("trace_id").is_none(), "{text}");
        assert_eq!(parsed[1]["message"], "inside");
        assert_eq!(parsed[1]["answer"], 42);
        assert_eq!(parsed[1]["trace_id"], trace);
        assert_eq!(parsed[1]["span_id"], span.span_id.to_string());
        assert_ne!(
            parsed[1]["span_id"], "00f067aa0ba902b7",
            "the server span, not the caller"
        );
    }
}
