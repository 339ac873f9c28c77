//! What the watchdog publishes: the failure and recovery notices on `xreport`
//! (`v01.watchdog.node.<host>`, `v01.watchdog.recovered.<host>`; `route`, `speedo` and
//! `log` recognise the `v01.watchdog.` prefix and skip them), and the repost of a lost
//! product, rebuilt from its 102 report as an announcement in the same format family so
//! that the node taking it over reads what it is used to.

use super::persist::TransferRow;
use super::{Failure, Recovery};
use crate::core::emit::{self, Outgoing};
use crate::core::headers::{HeaderValue, Headers};
use crate::core::report::{Format, Identity, Report};
use crate::core::stamp::Stamp;
use crate::core::topic::{MAX_SHORT, encode_word, truncate_utf8};
use serde::Serialize;

/// Transfers listed in one failure message at most; a bigger failure is split in parts
/// (headers `part` and `parts`), so no message comes near the broker's size limit.
pub const MAX_LISTED: usize = 10_000;

/// The [`Format`] whose [`Format::name`] is `name`.
pub fn format_from_name(name: &str) -> Option<Format> {
    [
        Format::V01,
        Format::V02,
        Format::V02Sr3,
        Format::V03,
        Format::V03Sr2,
    ]
    .into_iter()
    .find(|f| f.name() == name)
}

fn short(s: &str) -> HeaderValue {
    let mut s = s.to_owned();
    truncate_utf8(&mut s, MAX_SHORT);
    HeaderValue::Str(s)
}

/// The announcement of `t`'s product, as its 102 report's format family posts it
/// ([`emit::announcement`]). Without a pubTime the start time stands in.
pub fn announcement(t: &TransferRow) -> Outgoing {
    let r = Report {
        format: t.format,
        topic: String::new(),
        exchange: String::new(),
        pub_time: Some(t.pub_time.unwrap_or(t.started)),
        base_url: t.base_url.clone(),
        rel_path: t.rel_path.clone(),
        code: 102,
        message: None,
        host: None,
        user: None,
        duration_s: None,
        source: t.source.clone(),
        from_cluster: t.from_cluster.clone(),
        to_clusters: t.to_clusters.clone(),
        flow: t.flow.clone(),
        size_bytes: t.size,
        identity: t.identity.clone(),
        time_completed: None,
        stamped_client: None,
        stamped_source: None,
        extra: Headers::new(),
    };
    emit::announcement(&r, t.format)
}

fn notice_key(kind: &str, host: &str) -> String {
    let mut k = format!("v01.watchdog.{kind}.");
    encode_word(host, &mut k);
    truncate_utf8(&mut k, MAX_SHORT);
    k
}

/// One lost transfer in a failure body.
#[derive(Serialize)]
struct Lost<'a> {
    host: &'a str,
    client: &'a str,
    #[serde(rename = "relPath")]
    rel_path: &'a str,
    #[serde(rename = "baseUrl")]
    base_url: &'a str,
    #[serde(rename = "pubTime")]
    pub_time: Option<Stamp>,
    started: Stamp,
    /// Seconds between the start and the failure.
    age: i64,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
}

#[derive(Serialize)]
struct FailureBody<'a> {
    host: &'a str,
    count: usize,
    last_seen: Stamp,
    failed_at: Stamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<usize>,
    transfers: Vec<Lost<'a>>,
}

impl Failure {
    /// The JSON body listing `transfers` (a slice of [`Failure::transfers`]).
    pub fn body(&self, transfers: &[TransferRow], part: Option<usize>) -> Vec<u8> {
        let at = self.at.0;
        let body = FailureBody {
            host: &self.host,
            count: self.transfers.len(),
            last_seen: self.last_seen,
            failed_at: self.at,
            part,
            transfers: transfers
                .iter()
                .map(|t| Lost {
                    host: &t.host,
                    client: &t.client,
                    rel_path: &t.rel_path,
                    base_url: &t.base_url,
                    pub_time: t.pub_time,
                    started: t.started,
                    age: at.as_second().saturating_sub(t.started.0.as_second()),
                    format: t.format.name(),
                    identity: t.identity.as_ref(),
                    source: t.source.as_deref(),
                })
                .collect(),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The notice for `xreport`: `v01.watchdog.node.<host>`, headers `host` and `count`
    /// (transfers lost in all), JSON body listing them; split in parts of [`MAX_LISTED`]
    /// transfers (headers `part`, `parts`) when there are more.
    pub fn messages(&self) -> Vec<Outgoing> {
        let chunks: Vec<&[TransferRow]> = if self.transfers.is_empty() {
            vec![&[]]
        } else {
            self.transfers.chunks(MAX_LISTED).collect()
        };
        let parts = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| {
                let mut headers = Headers::new();
                headers.set("host", short(&self.host));
                headers.set("count", self.transfers.len() as i64);
                if parts > 1 {
                    headers.set("part", (i + 1) as i64);
                    headers.set("parts", parts as i64);
                }
                Outgoing {
                    routing_key: notice_key("node", &self.host),
                    body: self.body(chunk, (parts > 1).then_some(i + 1)),
                    content_type: "application/json",
                    headers,
                }
            })
            .collect()
    }
}

#[derive(Serialize)]
struct RecoveryBody<'a> {
    host: &'a str,
    failed_at: Stamp,
    recovered_at: Stamp,
    stale: u64,
}

impl Recovery {
    /// `v01.watchdog.recovered.<host>` for `xreport`, headers `host` and `stale`.
    pub fn message(&self) -> Outgoing {
        let mut headers = Headers::new();
        headers.set("host", short(&self.host));
        headers.set("stale", i64::try_from(self.stale).unwrap_or(i64::MAX));
        let body = RecoveryBody {
            host: &self.host,
            failed_at: self.failed_at,
            recovered_at: self.at,
            stale: self.stale,
        };
        Outgoing {
            routing_key: notice_key("recovered", &self.host),
            body: serde_json::to_vec(&body).unwrap_or_default(),
            content_type: "application/json",
            headers,
        }
    }
}
