//! The NATS JetStream backend, for scale-out (`tessera server --events nats://...`).
//!
//! One JetStream stream (`{NS}_EVENTS`, file storage) holds every event; event stream
//! `S` is the subject `{ns}.ev.S` (a `.` in `S` is written `%2E`), the global position
//! is JetStream's sequence, and the version is carried in a `Tessera-Version` header.
//! Each event is published with `Nats-Msg-Id` = its id (JetStream drops a repeat within
//! the duplicate window, one hour) and `Nats-Expected-Last-Subject-Sequence` = the
//! subject's last sequence as read before the append, so two writers racing on one stream
//! cannot both succeed: that is the optimistic-concurrency check. Consumer-group offsets
//! live in a second stream (`{NS}_OFFSETS`, one message kept per subject).
//!
//! Differences from the embedded store: an append of several events is not atomic (a
//! crash can leave a prefix, which a retry with the same ids completes), and an event id
//! is recognised as a repeat only within the duplicate window. Acknowledged appends are
//! on disk when nats-server syncs every write (`sync_interval: always`, 2.10+); with
//! older servers the outbox in the writing service stays the source of truth.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use tokio::sync::watch;

use crate::store::{AppendError, Appended, Event, Expected, NewEvent, Selection, StoreError};

/// How long JetStream remembers event ids to drop repeats.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct NatsStore {
    js: jetstream::Context,
    events: stream::Stream,
    offsets: stream::Stream,
    /// Lowercase subject prefix (`tessera`).
    ns: String,
    /// Bumped on every event seen on the subjects: what live subscriptions wait on.
    head: watch::Receiver<i64>,
    bump: std::sync::Arc<watch::Sender<i64>>,
    /// Per subject, the last (sequence, version) this server wrote or read: an append
    /// normally needs no read first. A stale entry (another server wrote since) fails
    /// JetStream's sequence check and is refreshed.
    lasts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u64, i64)>>>,
}

fn nats_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::NotKept(tessera_sql::Refused::unavailable(format!("NATS: {e}")))
}

fn encode(name: &str) -> String {
    name.replace('.', "%2E")
}

fn decode(token: &str) -> String {
    token.replace("%2E", ".")
}

impl NatsStore {
    /// Connects to `url` and creates (or reuses) the streams for namespace `ns`.
    pub async fn connect(url: &str, ns: &str) -> Result<NatsStore, StoreError> {
        if ns.is_empty()
            || ns.len() > 32
            || !ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(StoreError::Invalid(format!(
                "invalid events namespace {ns:?}: 1 to 32 characters from A-Z a-z 0-9 _"
            )));
        }
        let client = async_nats::connect(url).await.map_err(nats_err)?;
        let js = jetstream::new(client.clone());
        let upper = ns.to_ascii_uppercase();
        let lower = ns.to_ascii_lowercase();
        let events = js
            .get_or_create_stream(stream::Config {
                name: format!("{upper}_EVENTS"),
                subjects: vec![format!("{lower}.ev.>")],
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        let offsets = js
            .get_or_create_stream(stream::Config {
                name: format!("{upper}_OFFSETS"),
                subjects: vec![format!("{lower}.off.>")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        let (bump, head) = watch::channel(0);
        let bump = std::sync::Arc::new(bump);
        // Appends by other servers on the same NATS wake local subscribers too.
        let mut sub = client
            .subscribe(format!("{lower}.ev.>"))
            .await
            .map_err(nats_err)?;
        let b = bump.clone();
        tokio::spawn(async move {
            use futures_core::Stream;
            while std::future::poll_fn(|cx| std::pin::Pin::new(&mut sub).poll_next(cx))
                .await
                .is_some()
            {
                b.send_modify(|h| *h += 1);
            }
        });
        Ok(NatsStore {
            js,
            events,
            offsets,
            ns: lower,
            head,
            bump,
            lasts: Default::default(),
        })
    }

    pub fn head(&self) -> watch::Receiver<i64> {
        self.head.clone()
    }

    /// `{ns}.ev.{category}.{stream}`: the category (the name up to its first `-`, as in
    /// `order-42`) is a token of its own, so a category feed is one subject filter.
    fn subject(&self, stream: &str) -> String {
        let category = stream.split('-').next().unwrap_or(stream);
        format!("{}.ev.{}.{}", self.ns, encode(category), encode(stream))
    }

    /// The subject filter for a category prefix: exact for `name-*`, else every event
    /// (the prefix is then checked on each).
    fn category_filter(&self, prefix: &str) -> String {
        match prefix.strip_suffix('-') {
            Some(cat) if !cat.is_empty() && !cat.contains('-') => {
                format!("{}.ev.{}.>", self.ns, encode(cat))
            }
            _ => format!("{}.ev.>", self.ns),
        }
    }

    fn cached(&self, subject: &str) -> Option<(u64, i64)> {
        self.lasts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(subject)
            .copied()
    }

    fn remember(&self, subject: &str, last: (u64, i64)) {
        let mut m = self.lasts.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() > 100_000 {
            m.clear();
        }
        m.insert(subject.to_owned(), last);
    }

    /// The subject's last (sequence, version), or (0, -1) for a new stream.
    async fn last(&self, subject: &str) -> Result<(u64, i64), AppendError> {
        match self.events.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                let version = m
                    .headers
                    .get("Tessera-Version")
                    .and_then(|v| v.as_str().parse().ok())
                    .unwrap_or(-1);
                Ok((m.sequence, version))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok((0, -1))
            }
            Err(e) => Err(AppendError::Store(tessera_sql::Refused::unavailable(
                format!("NATS: {e}"),
            ))),
        }
    }

    pub async fn append(
        &self,
        stream: String,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Appended, AppendError> {
        let subject = self.subject(&stream);
        // With `any`, a lost race is retried against the new last event; a stale cached
        // last event is refreshed the same way.
        let mut fresh = false;
        for _ in 0..16 {
            let (mut last_seq, current) = match self.cached(&subject) {
                Some(l) if !fresh => l,
                _ => {
                    fresh = true;
                    let l = self.last(&subject).await?;
                    self.remember(&subject, l);
                    l
                }
            };
            let ok = expected.allows(current);
            let mut first = None;
            let mut duplicates = 0;
            let mut raced = false;
            for (i, e) in events.iter().enumerate() {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", e.id.as_str());
                // A mismatched expectation still publishes the first event against an
                // impossible last sequence: JetStream answers a repeat of a stored id
                // as a duplicate before it checks sequences, and refuses anything else.
                let expect_seq = if ok { last_seq } else { u64::MAX };
                h.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    expect_seq.to_string().as_str(),
                );
                h.insert(
                    "Tessera-Version",
                    (current + 1 + i as i64).to_string().as_str(),
                );
                h.insert("Tessera-Type", e.kind.as_str());
                h.insert("Tessera-Created", now_ms().to_string().as_str());
                let payload = serde_json::json!({"data": e.data, "metadata": e.metadata});
                let ack = self
                    .js
                    .publish_with_headers(subject.clone(), h, payload.to_string().into())
                    .await
                    .map_err(|e| {
                        AppendError::Store(tessera_sql::Refused::unavailable(format!("NATS: {e}")))
                    })?
                    .await;
                match ack {
                    Ok(a) => {
                        if a.duplicate {
                            duplicates += 1;
                        }
                        first.get_or_insert(a.sequence);
                        last_seq = a.sequence;
                    }
                    Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => {
                        if i == 0 && (!fresh || (ok && expected == Expected::Any)) {
                            // Decided on a cached last event, or lost a race under `any`:
                            // read the stream's real end and decide again.
                            fresh = false;
                            self.lasts
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&subject);
                            raced = true;
                            break;
                        }
                        // Another writer got there first: report where the stream is now.
                        let (_, now_at) = self.last(&subject).await?;
                        return Err(AppendError::WrongVersion {
                            stream,
                            expected,
                            current: now_at,
                        });
                    }
                    Err(err) => {
                        return Err(AppendError::Store(tessera_sql::Refused::unavailable(
                            format!("NATS: {err}"),
                        )));
                    }
                }
                if !ok && duplicates == 0 {
                    break;
                }
            }
            if raced {
                continue;
            }
            if duplicates == 0 {
                self.remember(&subject, (last_seq, current + events.len() as i64));
            }
            self.bump.send_modify(|h| *h += 1);
            if duplicates == events.len() {
                // A repeat: JetStream acked the originals' sequences; report their versions.
                let version = |seq: u64| async move {
                    let m = self.events.get_raw_message(seq).await.map_err(|e| {
                        AppendError::Store(tessera_sql::Refused::unavailable(format!("NATS: {e}")))
                    })?;
                    Ok::<i64, AppendError>(
                        m.headers
                            .get("Tessera-Version")
                            .and_then(|v| v.as_str().parse().ok())
                            .unwrap_or(-1),
                    )
                };
                let first_seq = first.unwrap_or(last_seq);
                return Ok(Appended {
                    stream,
                    first_version: version(first_seq).await?,
                    last_version: version(last_seq).await?,
                    last_position: last_seq as i64,
                    duplicate: true,
                });
            }
            let n = events.len() as i64;
            return Ok(Appended {
                stream,
                first_version: current + 1,
                last_version: current + n,
                last_position: last_seq as i64,
                duplicate: false,
            });
        }
        Err(AppendError::Store(tessera_sql::Refused::unavailable(
            "too many concurrent appends to this stream",
        )))
    }

    /// Events of `sel` from `from` (a version, or a position), at most `limit`.
    pub async fn read(
        &self,
        sel: &Selection,
        from: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let (filter, prefix) = match sel {
            Selection::Stream(s) => (self.subject(s), None),
            Selection::Category(p) => (self.category_filter(p), Some(p.clone())),
        };
        // A stream's versions are headers, so its read starts at the beginning.
        let mut seq = match sel {
            Selection::Stream(_) => 1,
            Selection::Category(_) => from.max(1) as u64,
        };
        let mut out = Vec::new();
        while out.len() < limit as usize {
            let msg = match self
                .events
                .raw_message_builder()
                .sequence(seq)
                .next_by_subject(filter.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                    break;
                }
                Err(e) => return Err(nats_err(e)),
            };
            seq = msg.sequence + 1;
            let Some(event) = self.event(&msg) else {
                continue;
            };
            let wanted = match (sel, &prefix) {
                (Selection::Stream(_), _) => event.version >= from,
                (Selection::Category(_), Some(p)) => event.stream.starts_with(p.as_str()),
                _ => true,
            };
            if wanted {
                out.push(event);
            }
        }
        Ok(out)
    }

    fn event(&self, m: &jetstream::message::StreamMessage) -> Option<Event> {
        let rest = m.subject.strip_prefix(&format!("{}.ev.", self.ns))?;
        let stream = decode(rest.split_once('.')?.1);
        let header = |k: &str| m.headers.get(k).map(|v| v.as_str().to_owned());
        let body: serde_json::Value = serde_json::from_slice(&m.payload).ok()?;
        Some(Event {
            position: m.sequence as i64,
            stream,
            version: header("Tessera-Version")?.parse().ok()?,
            id: header("Nats-Msg-Id")?,
            kind: header("Tessera-Type")?,
            data: body.get("data").cloned().unwrap_or_default(),
            metadata: body.get("metadata").cloned().filter(|m| !m.is_null()),
            created_ms: header("Tessera-Created")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        })
    }

    fn offset_subject(&self, group: &str, sel: &str) -> String {
        let token = |s: &str| encode(&s.replace('*', "%2A"));
        format!("{}.off.{}.{}", self.ns, token(group), token(sel))
    }

    pub async fn acked(&self, group: &str, sel: &str) -> Result<Option<i64>, StoreError> {
        match self
            .offsets
            .get_last_raw_message_by_subject(&self.offset_subject(group, sel))
            .await
        {
            Ok(m) => Ok(std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse().ok())),
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(nats_err(e)),
        }
    }

    /// Moves the offset forward only; returns the stored one.
    pub async fn ack(&self, group: &str, sel: &str, offset: i64) -> Result<i64, StoreError> {
        let current = self.acked(group, sel).await?;
        if current.is_some_and(|c| c >= offset) {
            return Ok(current.unwrap_or(offset));
        }
        self.js
            .publish(self.offset_subject(group, sel), offset.to_string().into())
            .await
            .map_err(nats_err)?
            .await
            .map_err(nats_err)?;
        Ok(offset)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
