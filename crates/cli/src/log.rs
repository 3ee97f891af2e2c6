//! The process's logs, on stderr: text for a person at a terminal, or JSON lines for a
//! collector (Loki, Elasticsearch, CloudWatch) that should not have to parse text.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

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
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    if let Some(why) = bad {
        tracing::warn!("TESSERA_LOG is not a filter, logging at info: {why}");
    }
}
