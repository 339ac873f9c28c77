//! A small typed client for the RabbitMQ management HTTP API.
//!
//! Why: `setup` makes the broker match the declared pump (users, permissions, exchanges,
//! queues, bindings, dynamic shovels) and the tests make a fresh vhost each; both go
//! through the management plugin, not AMQP. This is our own thin layer over `reqwest`
//! rather than the `rabbitmq_http_client` crate: that crate cannot declare a shovel with
//! pre-declared topology on RabbitMQ 3.10 (it sends `src-predeclared`, which 3.10
//! refuses), only creates users from a client-side hash, and needs a newer Rust than
//! ours. Every call here does one request; idempotence is RabbitMQ's (PUT declares, a
//! DELETE of something absent is not an error).
//!
//! Secrets: the client keeps the password out of every URL (it uses Basic auth) and every
//! error text is passed through [`crate::broker::url::redact`], which also hides passwords
//! embedded in AMQP URIs (shovel URIs echoed back by the broker).

use std::fmt;
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use reqwest::Method;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};

use crate::broker::url::{BrokerUrl, redact};

/// Path segment encoding: everything but RFC 3986 unreserved characters, so `/` (the
/// default vhost) becomes `%2F` and spaces or `>` in connection names survive.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How long one request may take; deleting a vhost with many queues is the slowest call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong talking to the management API. No variant ever holds a password.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// The admin or broker URL could not be used.
    #[error("invalid URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// A vhost, user, queue... name that cannot be put in a request path.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    /// The request did not get an HTTP answer (refused, timed out, reset).
    #[error("management API {method} {path}: no answer: {reason}")]
    Transport {
        method: Method,
        path: String,
        reason: String,
    },
    /// The API answered with an error status; `reason` is RabbitMQ's explanation.
    #[error("management API {method} {path}: HTTP {status}: {reason}")]
    Status {
        method: Method,
        path: String,
        status: u16,
        reason: String,
    },
    /// The API answered 2xx but the body was not what this version of the client expects.
    #[error("management API {method} {path}: unexpected answer: {reason}")]
    Decode {
        method: Method,
        path: String,
        reason: String,
    },
}

impl MgmtError {
    /// The HTTP status, when the API answered with an error status.
    pub fn status(&self) -> Option<u16> {
        match self {
            MgmtError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// 401: wrong credentials; 403 would be a user lacking the needed tag.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }
}

/// `rabbitmq_version`, `management_version` and `cluster_name` from `/api/overview`.
#[derive(Debug, Clone, Deserialize)]
pub struct Overview {
    #[serde(default)]
    pub rabbitmq_version: String,
    #[serde(default)]
    pub management_version: String,
    #[serde(default)]
    pub cluster_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UserInfo {
    pub name: String,
    /// A JSON array since RabbitMQ 3.9, a comma separated string before: both are read.
    #[serde(deserialize_with = "de_tags", default)]
    pub tags: Vec<String>,
}

/// What the broker says of a login ([`MgmtClient::whoami`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whoami {
    /// The password is right and the user has a management tag: its name and tags.
    Management(UserInfo),
    /// The password is right; the user has no management tag (sources, subscribers).
    NotManagement,
    /// A wrong password, or no such user: the broker does not say which.
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PermissionInfo {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExchangeInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub internal: bool,
}

/// What to declare for a queue. `arguments` carries `x-queue-type`, `x-max-length`,
/// `x-overflow`, ... as RabbitMQ spells them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSpec {
    pub durable: bool,
    pub arguments: Map<String, Value>,
}

impl QueueSpec {
    /// A durable queue with no arguments.
    pub fn durable() -> Self {
        QueueSpec {
            durable: true,
            arguments: Map::new(),
        }
    }

    /// Adds one `x-...` argument.
    pub fn arg(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.arguments.insert(key.to_owned(), value.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QueueInfo {
    pub name: String,
    pub vhost: String,
    #[serde(default)]
    pub durable: bool,
    #[serde(default)]
    pub arguments: Map<String, Value>,
    /// Ready + unacknowledged. The management plugin refreshes queue statistics every
    /// few seconds (5 s by default) and omits them right after a declare (read as 0):
    /// poll with a deadline, or use [`MgmtClient::get_messages`], when exact counts matter.
    #[serde(default)]
    pub messages: u64,
    #[serde(default)]
    pub consumers: u64,
    /// `classic`, `quorum` or `stream`, as the broker runs it.
    #[serde(default, rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BindingInfo {
    /// The exchange; `""` is the default exchange.
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: String,
    pub routing_key: String,
    /// What RabbitMQ needs to delete this binding.
    pub properties_key: String,
}

/// Shovel acknowledgement mode (`ack-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Ack the source only once the destination confirmed: nothing lost.
    #[default]
    OnConfirm,
    OnPublish,
    NoAck,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::OnConfirm => "on-confirm",
            AckMode::OnPublish => "on-publish",
            AckMode::NoAck => "no-ack",
        }
    }
}

/// A dynamic AMQP 0-9-1 shovel from a queue to an exchange (§4.8). The URIs carry
/// credentials, so `Debug` redacts them.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ShovelSpec {
    pub src_uri: String,
    pub src_queue: String,
    pub dest_uri: String,
    pub dest_exchange: String,
    /// Routing key to publish with; `None` keeps each message's own key.
    pub dest_exchange_key: Option<String>,
    pub ack_mode: AckMode,
    /// Seconds between reconnection attempts (RabbitMQ's default is 1 s).
    pub reconnect_delay_s: Option<u32>,
    /// Unacknowledged messages in flight (`src-prefetch-count`); RabbitMQ default 1000.
    pub prefetch_count: Option<u32>,
    /// The `user_id` property every message is published with
    /// (`dest-publish-properties`). Set it to the destination account: a message keeps
    /// the `user_id` its first publisher set, and the destination broker refuses a
    /// `user_id` other than the connection's user, closing the channel, so one such
    /// message would stop the shovel for good (it is retried first every time).
    pub dest_user_id: Option<String>,
}

/// A shovel definition as the broker stores it (`/api/parameters/shovel`), read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShovelDefinition {
    pub spec: ShovelSpec,
    /// Keys of the definition that [`ShovelSpec`] does not set (someone else's settings).
    pub other_keys: Vec<String>,
}

impl ShovelSpec {
    fn to_value(&self) -> Value {
        let mut v = Map::new();
        v.insert("src-protocol".into(), json!("amqp091"));
        v.insert("src-uri".into(), json!(self.src_uri));
        v.insert("src-queue".into(), json!(self.src_queue));
        v.insert("dest-protocol".into(), json!("amqp091"));
        v.insert("dest-uri".into(), json!(self.dest_uri));
        v.insert("dest-exchange".into(), json!(self.dest_exchange));
        if let Some(key) = &self.dest_exchange_key {
            v.insert("dest-exchange-key".into(), json!(key));
        }
        v.insert("ack-mode".into(), json!(self.ack_mode.as_str()));
        if let Some(delay) = self.reconnect_delay_s {
            v.insert("reconnect-delay".into(), json!(delay));
        }
        if let Some(prefetch) = self.prefetch_count {
            v.insert("src-prefetch-count".into(), json!(prefetch));
        }
        if let Some(user) = &self.dest_user_id {
            v.insert("dest-publish-properties".into(), json!({ "user_id": user }));
        }
        json!({ "value": v })
    }

    /// Reads back what `put_shovel` wrote (the `value` object); keys it
    /// does not write, or values of another shape, are listed in `other_keys`.
    pub fn from_value(value: &Map<String, Value>) -> ShovelDefinition {
        let mut spec = ShovelSpec::default();
        let mut other_keys = Vec::new();
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let number = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        for (key, v) in value {
            let known = match key.as_str() {
                "src-protocol" | "dest-protocol" => v.as_str() == Some("amqp091"),
                "src-uri" => text(v).map(|t| spec.src_uri = t).is_some(),
                "src-queue" => text(v).map(|t| spec.src_queue = t).is_some(),
                "dest-uri" => text(v).map(|t| spec.dest_uri = t).is_some(),
                "dest-exchange" => text(v).map(|t| spec.dest_exchange = t).is_some(),
                "dest-exchange-key" => text(v).map(|t| spec.dest_exchange_key = Some(t)).is_some(),
                "ack-mode" => match v.as_str() {
                    Some("on-confirm") => {
                        spec.ack_mode = AckMode::OnConfirm;
                        true
                    }
                    Some("on-publish") => {
                        spec.ack_mode = AckMode::OnPublish;
                        true
                    }
                    Some("no-ack") => {
                        spec.ack_mode = AckMode::NoAck;
                        true
                    }
                    _ => false,
                },
                "reconnect-delay" => number(v)
                    .map(|n| spec.reconnect_delay_s = Some(n))
                    .is_some(),
                "src-prefetch-count" => number(v).map(|n| spec.prefetch_count = Some(n)).is_some(),
                "dest-publish-properties" => match v.as_object() {
                    Some(props) if props.keys().all(|k| k == "user_id") => {
                        spec.dest_user_id = props.get("user_id").and_then(text);
                        props.is_empty() || spec.dest_user_id.is_some()
                    }
                    _ => false,
                },
                _ => false,
            };
            if !known {
                other_keys.push(key.clone());
            }
        }
        ShovelDefinition { spec, other_keys }
    }
}

impl fmt::Debug for ShovelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShovelSpec")
            .field("src_uri", &redact(&self.src_uri))
            .field("src_queue", &self.src_queue)
            .field("dest_uri", &redact(&self.dest_uri))
            .field("dest_exchange", &self.dest_exchange)
            .field("dest_exchange_key", &self.dest_exchange_key)
            .field("ack_mode", &self.ack_mode)
            .field("reconnect_delay_s", &self.reconnect_delay_s)
            .field("prefetch_count", &self.prefetch_count)
            .field("dest_user_id", &self.dest_user_id)
            .finish()
    }
}

/// A running (or failing) shovel as `/api/shovels` reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ShovelStatus {
    pub name: String,
    #[serde(default)]
    pub vhost: String,
    /// `dynamic` or `static`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `starting`, `running` or `terminated`.
    #[serde(default)]
    pub state: String,
    /// Why a `terminated` shovel stopped (redacted).
    #[serde(default, deserialize_with = "de_redacted_opt")]
    pub reason: Option<String>,
}

impl ShovelStatus {
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ConnInfo {
    /// The name to pass to [`MgmtClient::close_connection`] (`"127.0.0.1:5555 -> 127.0.0.1:5672"`).
    pub name: String,
    #[serde(default)]
    pub vhost: String,
    #[serde(default)]
    pub user: String,
    /// The `connection_name` client property, when the client set one.
    #[serde(
        default,
        rename = "client_properties",
        deserialize_with = "de_conn_name"
    )]
    pub client_name: Option<String>,
}

/// One message taken with [`MgmtClient::get_messages`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GotMessage {
    pub routing_key: String,
    pub exchange: String,
    /// The body as text (UTF-8) or base64, as `payload_encoding` says.
    pub payload: String,
    pub payload_encoding: String,
    #[serde(default)]
    pub properties: Value,
}

/// A client for one management API endpoint with one set of credentials. Cheap to clone.
#[derive(Clone)]
pub struct MgmtClient {
    http: reqwest::Client,
    /// `http://host:port[/prefix]/api`, no credentials, no trailing slash.
    api: String,
    user: String,
    password: String,
}

impl fmt::Debug for MgmtClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MgmtClient")
            .field("api", &self.api)
            .field("user", &self.user)
            .field("password", &"****")
            .finish()
    }
}

impl MgmtClient {
    /// `base_url` is the management listener (`http://127.0.0.1:15672`), with or without
    /// a trailing `/api`; credentials inside it are ignored in favour of `user`/`password`.
    pub fn new(base_url: &str, user: &str, password: &str) -> Result<Self, MgmtError> {
        let invalid = |reason: &str| MgmtError::InvalidUrl {
            url: redact(base_url),
            reason: reason.to_owned(),
        };
        let mut url = url::Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
        match url.scheme() {
            "http" => {}
            "https" => return Err(invalid("https is not supported by this build (no TLS)")),
            _ => return Err(invalid("the management API URL must start with http://")),
        }
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url.set_query(None);
        url.set_fragment(None);
        let mut api = url.as_str().trim_end_matches('/').to_owned();
        if !api.ends_with("/api") {
            api.push_str("/api");
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| invalid(&e.to_string()))?;
        Ok(MgmtClient {
            http,
            api,
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// Credentials come from `admin_url` when it has a user, else from `broker_url`
    /// (`amqp://user:pass@host:port/vhost`, percent-decoded), else `guest`/`guest` as for
    /// any AMQP URI without a user.
    pub fn from_urls(admin_url: &str, broker: &BrokerUrl) -> Result<Self, MgmtError> {
        let (user, password) = match url_credentials(admin_url)? {
            Some(creds) => creds,
            None => (broker.user().to_owned(), broker.password().to_owned()),
        };
        Self::new(admin_url, &user, &password)
    }

    /// The API root this client talks to (`http://127.0.0.1:15672/api`).
    pub fn api_url(&self) -> &str {
        &self.api
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    // ---- overview ----

    /// Also the cheapest "is the API up and are my credentials good" probe.
    pub async fn overview(&self) -> Result<Overview, MgmtError> {
        self.get_json(&["overview"]).await
    }

    /// The same endpoint (and connection pool) with other credentials: `serve` asks
    /// [`whoami`](Self::whoami) as each person logging in.
    pub fn with_credentials(&self, user: &str, password: &str) -> MgmtClient {
        MgmtClient {
            http: self.http.clone(),
            api: self.api.clone(),
            user: user.to_owned(),
            password: password.to_owned(),
        }
    }

    /// Who these credentials are, as the broker says: its name and tags.
    ///
    /// RabbitMQ answers 200 only to a user with a management tag. Any other user whose
    /// password is right gets 401 `Not management user` (checked after the password, as
    /// RabbitMQ 3.10 does); a wrong password or an unknown user gets 401 `Login failed`.
    pub async fn whoami(&self) -> Result<Whoami, MgmtError> {
        match self.get_json::<UserInfo>(&["whoami"]).await {
            Ok(u) => Ok(Whoami::Management(u)),
            Err(MgmtError::Status {
                status: 401,
                reason,
                ..
            }) if reason.contains("Not management user") => Ok(Whoami::NotManagement),
            Err(MgmtError::Status { status: 401, .. }) => Ok(Whoami::Refused),
            Err(e) => Err(e),
        }
    }

    /// Whether the broker has a user of that name (needs the `administrator` tag).
    pub async fn user_exists(&self, name: &str) -> Result<bool, MgmtError> {
        seg("user", name)?;
        match self.send(Method::GET, &["users", name], None, &[]).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    // ---- vhosts ----

    pub async fn create_vhost(&self, name: &str) -> Result<(), MgmtError> {
        seg("vhost", name)?;
        self.send(Method::PUT, &["vhosts", name], Some(&json!({})), &[])
            .await
            .map(drop)
    }

    /// Deletes a vhost and everything in it; absent is fine.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), MgmtError> {
        self.delete(&["vhosts", name], "vhost", name).await
    }

    /// Names of all vhosts.
    pub async fn list_vhosts(&self) -> Result<Vec<String>, MgmtError> {
        #[derive(Deserialize)]
        struct Vhost {
            name: String,
        }
        let list: Vec<Vhost> = self.get_json(&["vhosts"]).await?;
        Ok(list.into_iter().map(|v| v.name).collect())
    }

    // ---- users ----

    /// Creates or updates a user. The broker hashes `password` with its own configured
    /// algorithm, which is why this sends `password` and not a `password_hash`.
    pub async fn put_user(
        &self,
        name: &str,
        password: &str,
        tags: &[&str],
    ) -> Result<(), MgmtError> {
        seg("user", name)?;
        // A comma separated string: every RabbitMQ version reads that form.
        let body = json!({ "password": password, "tags": tags.join(",") });
        self.send(Method::PUT, &["users", name], Some(&body), &[password])
            .await
            .map(drop)
    }

    /// Deletes a user (and closes its connections); absent is fine.
    pub async fn delete_user(&self, name: &str) -> Result<(), MgmtError> {
        self.delete(&["users", name], "user", name).await
    }

    pub async fn list_users(&self) -> Result<Vec<UserInfo>, MgmtError> {
        self.get_json(&["users"]).await
    }

    // ---- permissions ----

    /// Sets a user's configure/write/read regexes on a vhost (replacing any before).
    pub async fn put_permissions(
        &self,
        vhost: &str,
        user: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        seg("user", user)?;
        let body = json!({ "configure": configure, "write": write, "read": read });
        self.send(Method::PUT, &["permissions", vhost, user], Some(&body), &[])
            .await
            .map(drop)
    }

    pub async fn list_permissions(&self, vhost: &str) -> Result<Vec<PermissionInfo>, MgmtError> {
        seg("vhost", vhost)?;
        self.get_json(&["vhosts", vhost, "permissions"]).await
    }

    // ---- exchanges ----

    /// Declares an exchange (`kind`: `topic`, `direct`, `fanout`, `headers`). Declaring
    /// again with the same properties is a no-op; with different ones RabbitMQ refuses
    /// (HTTP 400, "inequivalent arg").
    pub async fn declare_exchange(
        &self,
        vhost: &str,
        name: &str,
        kind: &str,
        durable: bool,
    ) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        seg("exchange", name)?;
        let body = json!({
            "type": kind,
            "durable": durable,
            "auto_delete": false,
            "internal": false,
            "arguments": {},
        });
        self.send(Method::PUT, &["exchanges", vhost, name], Some(&body), &[])
            .await
            .map(drop)
    }

    /// Deletes an exchange (and its bindings); absent is fine.
    pub async fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        self.delete(&["exchanges", vhost, name], "exchange", name)
            .await
    }

    pub async fn list_exchanges(&self, vhost: &str) -> Result<Vec<ExchangeInfo>, MgmtError> {
        seg("vhost", vhost)?;
        self.get_json(&["exchanges", vhost]).await
    }

    // ---- queues ----

    /// Declares a queue (never auto-delete, never exclusive). Same rules as exchanges
    /// for a second declare with other arguments.
    pub async fn declare_queue(
        &self,
        vhost: &str,
        name: &str,
        spec: &QueueSpec,
    ) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        seg("queue", name)?;
        let body = json!({
            "durable": spec.durable,
            "auto_delete": false,
            "arguments": spec.arguments,
        });
        self.send(Method::PUT, &["queues", vhost, name], Some(&body), &[])
            .await
            .map(drop)
    }

    /// Deletes a queue and the messages in it; absent is fine.
    pub async fn delete_queue(&self, vhost: &str, name: &str) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        self.delete(&["queues", vhost, name], "queue", name).await
    }

    /// Deletes a queue only if it holds no message, checked by the broker itself (not
    /// from statistics, which lag). `Ok(true)`: deleted or absent; `Ok(false)`: not empty.
    pub async fn delete_queue_if_empty(&self, vhost: &str, name: &str) -> Result<bool, MgmtError> {
        seg("vhost", vhost)?;
        seg("queue", name)?;
        let path = ["queues", vhost, name];
        match self
            .send_query(Method::DELETE, &path, Some("if-empty=true"), None, &[])
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(true),
            Err(MgmtError::Status { status: 400, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn list_queues(&self, vhost: &str) -> Result<Vec<QueueInfo>, MgmtError> {
        seg("vhost", vhost)?;
        self.get_json(&["queues", vhost]).await
    }

    /// One queue, or `None` when it does not exist.
    pub async fn get_queue(&self, vhost: &str, name: &str) -> Result<Option<QueueInfo>, MgmtError> {
        seg("vhost", vhost)?;
        seg("queue", name)?;
        match self.get_json(&["queues", vhost, name]).await {
            Ok(q) => Ok(Some(q)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes up to `count` messages off a queue for good (`ack_requeue_false`). For tests
    /// and diagnostics, not for consuming: it polls, and bodies come back as text.
    pub async fn get_messages(
        &self,
        vhost: &str,
        queue: &str,
        count: u32,
    ) -> Result<Vec<GotMessage>, MgmtError> {
        seg("vhost", vhost)?;
        seg("queue", queue)?;
        let body = json!({ "count": count, "ackmode": "ack_requeue_false", "encoding": "auto" });
        let text = self
            .send(
                Method::POST,
                &["queues", vhost, queue, "get"],
                Some(&body),
                &[],
            )
            .await?;
        self.decode(Method::POST, &["queues", vhost, queue, "get"], &text)
    }

    // ---- publishing (tests, diagnostics) ----

    /// Publishes one text message through the API; returns whether it was routed to at
    /// least one queue. `headers` become AMQP headers. No publisher confirm: for tests and
    /// diagnostics only, the daemons publish over AMQP.
    pub async fn publish(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        payload: &str,
        headers: &Map<String, Value>,
    ) -> Result<bool, MgmtError> {
        seg("vhost", vhost)?;
        // The API names the default exchange `amq.default`.
        let exchange = if exchange.is_empty() {
            "amq.default"
        } else {
            exchange
        };
        seg("exchange", exchange)?;
        let body = json!({
            "routing_key": routing_key,
            "payload": payload,
            "payload_encoding": "string",
            "properties": { "headers": headers, "delivery_mode": 2 },
        });
        let path = ["exchanges", vhost, exchange, "publish"];
        let text = self.send(Method::POST, &path, Some(&body), &[]).await?;
        #[derive(Deserialize)]
        struct Routed {
            routed: bool,
        }
        let routed: Routed = self.decode(Method::POST, &path, &text)?;
        Ok(routed.routed)
    }

    // ---- bindings ----

    /// Binds `queue` to `exchange` with `routing_key`; binding twice is a no-op.
    pub async fn bind_queue(
        &self,
        vhost: &str,
        exchange: &str,
        queue: &str,
        routing_key: &str,
    ) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        seg("exchange", exchange)?;
        seg("queue", queue)?;
        let body = json!({ "routing_key": routing_key, "arguments": {} });
        self.send(
            Method::POST,
            &["bindings", vhost, "e", exchange, "q", queue],
            Some(&body),
            &[],
        )
        .await
        .map(drop)
    }

    /// Binds exchange `destination` to exchange `source` with `routing_key` (what
    /// `source` routes with that key, or a `CC`/`BCC` key, also goes to `destination`);
    /// binding twice is a no-op.
    pub async fn bind_exchange(
        &self,
        vhost: &str,
        source: &str,
        destination: &str,
        routing_key: &str,
    ) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        seg("exchange", source)?;
        seg("exchange", destination)?;
        let body = json!({ "routing_key": routing_key, "arguments": {} });
        self.send(
            Method::POST,
            &["bindings", vhost, "e", source, "e", destination],
            Some(&body),
            &[],
        )
        .await
        .map(drop)
    }

    /// Removes one binding as listed by [`list_bindings`](Self::list_bindings); absent is fine.
    pub async fn delete_binding(
        &self,
        vhost: &str,
        binding: &BindingInfo,
    ) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        seg("exchange", &binding.source)?;
        seg("queue", &binding.destination)?;
        let kind = if binding.destination_type == "exchange" {
            "e"
        } else {
            "q"
        };
        let path = [
            "bindings",
            vhost,
            "e",
            &binding.source,
            kind,
            &binding.destination,
            &binding.properties_key,
        ];
        self.delete(&path, "binding", &binding.routing_key).await
    }

    /// Every binding of the vhost, including the implicit ones of the default exchange
    /// (`source == ""`).
    pub async fn list_bindings(&self, vhost: &str) -> Result<Vec<BindingInfo>, MgmtError> {
        seg("vhost", vhost)?;
        self.get_json(&["bindings", vhost]).await
    }

    // ---- shovels ----

    /// Creates or replaces the dynamic shovel `name` in `vhost` (runtime parameter of
    /// component `shovel`). The broker validates the definition and starts it; watch
    /// [`list_shovel_status`](Self::list_shovel_status) to see it running.
    pub async fn put_shovel(
        &self,
        vhost: &str,
        name: &str,
        spec: &ShovelSpec,
    ) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        seg("shovel", name)?;
        let secrets = [uri_password(&spec.src_uri), uri_password(&spec.dest_uri)];
        let secrets: Vec<&str> = secrets.iter().flatten().map(String::as_str).collect();
        self.send(
            Method::PUT,
            &["parameters", "shovel", vhost, name],
            Some(&spec.to_value()),
            &secrets,
        )
        .await
        .map(drop)
    }

    /// Removes a dynamic shovel (it stops at once); absent is fine.
    pub async fn delete_shovel(&self, vhost: &str, name: &str) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        self.delete(&["parameters", "shovel", vhost, name], "shovel", name)
            .await
    }

    /// Names of the dynamic shovels declared in `vhost` (their definitions hold
    /// passwords, so only names are returned).
    pub async fn list_shovel_names(&self, vhost: &str) -> Result<Vec<String>, MgmtError> {
        seg("vhost", vhost)?;
        #[derive(Deserialize)]
        struct Param {
            name: String,
        }
        let list: Vec<Param> = self.get_json(&["parameters", "shovel", vhost]).await?;
        Ok(list.into_iter().map(|p| p.name).collect())
    }

    /// The dynamic shovels declared in `vhost` with their definitions. These hold the
    /// destination passwords: for comparing, never for printing (`ShovelSpec`'s `Debug`
    /// redacts them).
    pub async fn list_shovel_definitions(
        &self,
        vhost: &str,
    ) -> Result<Vec<(String, ShovelDefinition)>, MgmtError> {
        seg("vhost", vhost)?;
        #[derive(Deserialize)]
        struct Param {
            name: String,
            // Any shape: a decoding error must never quote a definition (URIs).
            #[serde(default)]
            value: Value,
        }
        let list: Vec<Param> = self.get_json(&["parameters", "shovel", vhost]).await?;
        let empty = Map::new();
        Ok(list
            .into_iter()
            .map(|p| {
                let definition = ShovelSpec::from_value(p.value.as_object().unwrap_or(&empty));
                (p.name, definition)
            })
            .collect())
    }

    /// Restarts a dynamic shovel (it reconnects both ends); absent is fine.
    pub async fn restart_shovel(&self, vhost: &str, name: &str) -> Result<(), MgmtError> {
        seg("vhost", vhost)?;
        self.delete(
            &["shovels", "vhost", vhost, name, "restart"],
            "shovel",
            name,
        )
        .await
    }

    /// Status of the shovels of one vhost, or of all vhosts with `None`.
    pub async fn list_shovel_status(
        &self,
        vhost: Option<&str>,
    ) -> Result<Vec<ShovelStatus>, MgmtError> {
        match vhost {
            Some(vhost) => {
                seg("vhost", vhost)?;
                self.get_json(&["shovels", vhost]).await
            }
            None => self.get_json(&["shovels"]).await,
        }
    }

    // ---- connections ----

    pub async fn list_connections(&self) -> Result<Vec<ConnInfo>, MgmtError> {
        self.get_json(&["connections"]).await
    }

    /// Closes a client connection (the client sees a connection-forced error); absent is fine.
    pub async fn close_connection(&self, name: &str) -> Result<(), MgmtError> {
        seg("connection", name)?;
        let path = ["connections", name];
        match self.send(Method::DELETE, &path, None, &[]).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    // ---- plumbing ----

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &[&str],
    ) -> Result<T, MgmtError> {
        let text = self.send(Method::GET, path, None, &[]).await?;
        self.decode(Method::GET, path, &text)
    }

    async fn delete(&self, path: &[&str], what: &'static str, name: &str) -> Result<(), MgmtError> {
        seg(what, name)?;
        match self.send(Method::DELETE, path, None, &[]).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &[&str],
        text: &str,
    ) -> Result<T, MgmtError> {
        serde_json::from_str(text).map_err(|e| MgmtError::Decode {
            method,
            path: self.display_path(path),
            reason: e.to_string(),
        })
    }

    fn url(&self, path: &[&str]) -> String {
        let mut url = self.api.clone();
        for part in path {
            url.push('/');
            url.extend(utf8_percent_encode(part, SEGMENT));
        }
        url
    }

    /// The path as shown in errors: `/api/queues/%2F/q_x.y`.
    fn display_path(&self, path: &[&str]) -> String {
        let url = self.url(path);
        match url
            .find("://")
            .and_then(|i| url[i + 3..].find('/').map(|j| i + 3 + j))
        {
            Some(start) => url[start..].to_owned(),
            None => url,
        }
    }

    /// Sends one request and returns the body of a 2xx answer. `secrets` are extra
    /// strings (besides our own password) to scrub from any error text.
    async fn send(
        &self,
        method: Method,
        path: &[&str],
        body: Option<&Value>,
        secrets: &[&str],
    ) -> Result<String, MgmtError> {
        self.send_query(method, path, None, body, secrets).await
    }

    /// [`send`](Self::send) with a query string (`if-empty=true`).
    async fn send_query(
        &self,
        method: Method,
        path: &[&str],
        query: Option<&str>,
        body: Option<&Value>,
        secrets: &[&str],
    ) -> Result<String, MgmtError> {
        let scrub = |text: &str| {
            let mut text = redact(text);
            for secret in secrets
                .iter()
                .chain(std::iter::once(&self.password.as_str()))
            {
                // Very short secrets would shred ordinary words; they are never in URLs anyway.
                if secret.len() >= 4 {
                    text = text.replace(secret, "****");
                }
            }
            text
        };
        let mut url = self.url(path);
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        let mut request = self
            .http
            .request(method.clone(), url)
            .basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(body);
        }
        if method == Method::DELETE && path.first() == Some(&"connections") {
            request = request.header("X-Reason", "closed by pumpwatch");
        }
        let transport = |e: reqwest::Error| MgmtError::Transport {
            method: method.clone(),
            path: self.display_path(path),
            reason: scrub(&crate::core::text::error_chain(&e)),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let text = response.text().await.map_err(transport)?;
        if status.is_success() {
            return Ok(text);
        }
        Err(MgmtError::Status {
            method: method.clone(),
            path: self.display_path(path),
            status: status.as_u16(),
            reason: scrub(&api_reason(&text)),
        })
    }
}

/// Checks that `name` can be one path segment. RabbitMQ allows almost anything, but an
/// empty segment would address the parent resource and `.`/`..` are rewritten by URL
/// normalisation before they are sent.
fn seg(what: &'static str, name: &str) -> Result<(), MgmtError> {
    let reason = match name {
        "" => "empty",
        "." | ".." => "cannot be addressed through the HTTP API",
        _ => return Ok(()),
    };
    Err(MgmtError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    })
}

/// RabbitMQ answers errors as `{"error": "...", "reason": "..."}` with the reason
/// HTML-escaped; anything else is shown as text, cut short.
fn api_reason(body: &str) -> String {
    #[derive(Deserialize)]
    struct ApiError {
        #[serde(default)]
        error: String,
        #[serde(default)]
        reason: String,
    }
    let text = match serde_json::from_str::<ApiError>(body) {
        Ok(e) if !e.reason.is_empty() && !e.error.is_empty() => {
            format!("{}: {}", e.error, e.reason)
        }
        Ok(e) if !e.reason.is_empty() => e.reason,
        Ok(e) if !e.error.is_empty() => e.error,
        _ => body.to_owned(),
    };
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        return "(empty answer)".to_owned();
    }
    truncate(&text, 500)
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The user and password of a URL (`amqp://user:pass@host/vhost`), percent-decoded;
/// `None` when it names no user. The password is `""` when only a user is given.
pub fn url_credentials(url: &str) -> Result<Option<(String, String)>, MgmtError> {
    let parsed = url::Url::parse(url).map_err(|e| MgmtError::InvalidUrl {
        url: redact(url),
        reason: e.to_string(),
    })?;
    if parsed.username().is_empty() {
        return Ok(None);
    }
    let decode = |s: &str| -> Result<String, MgmtError> {
        percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| MgmtError::InvalidUrl {
                url: redact(url),
                reason: "user or password is not UTF-8 once percent-decoded".to_owned(),
            })
    };
    let user = decode(parsed.username())?;
    let password = decode(parsed.password().unwrap_or(""))?;
    Ok(Some((user, password)))
}

/// The decoded password of a URI, if it has one (to scrub it from error texts).
fn uri_password(uri: &str) -> Option<String> {
    match url_credentials(uri) {
        Ok(Some((_, password))) if !password.is_empty() => Some(password),
        _ => None,
    }
}

/// `tags` is `["a","b"]` since RabbitMQ 3.9 and `"a,b"` before.
fn de_tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tags {
        List(Vec<String>),
        Text(String),
        None(()),
    }
    Ok(match Tags::deserialize(d)? {
        Tags::List(list) => list.into_iter().filter(|t| !t.is_empty()).collect(),
        Tags::Text(text) => text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        Tags::None(()) => Vec::new(),
    })
}

fn de_redacted_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    // RabbitMQ reports a shovel's failure reason as a string or as an Erlang term dump.
    let value = Option::<Value>::deserialize(d)?;
    Ok(value.map(|v| match v {
        Value::String(s) => redact(&s),
        other => redact(&other.to_string()),
    }))
}

fn de_conn_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<Value>::deserialize(d)?;
    Ok(value
        .as_ref()
        .and_then(|v| v.get("connection_name"))
        .and_then(Value::as_str)
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_urls_are_percent_decoded() {
        assert_eq!(
            url_credentials("amqp://feeder:p%40ss%2Fw0rd@127.0.0.1:5672/%2f").unwrap(),
            Some(("feeder".to_owned(), "p@ss/w0rd".to_owned()))
        );
        assert_eq!(
            url_credentials("amqp://us%20er@h/").unwrap(),
            Some(("us er".to_owned(), String::new()))
        );
        assert_eq!(url_credentials("amqp://127.0.0.1:5672/%2f").unwrap(), None);
        assert_eq!(url_credentials("http://127.0.0.1:15672").unwrap(), None);
        let err = url_credentials("amqp://u:topsecret@[bad")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("topsecret"), "{err}");
    }

    #[test]
    fn from_urls_prefers_admin_credentials_then_broker_then_guest() {
        let b = |u: &str| BrokerUrl::parse(u).unwrap();
        let c = MgmtClient::from_urls("http://adm:apw@h:15672", &b("amqp://u:p@h/")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("adm", "apw"));
        assert_eq!(c.api_url(), "http://h:15672/api");
        let c = MgmtClient::from_urls("http://h:15672/", &b("amqp://u:p%3A@h/")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("u", "p:"));
        let c = MgmtClient::from_urls("http://h:15672/api/", &b("amqp://h/")).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("guest", "guest"));
        assert_eq!(c.api_url(), "http://h:15672/api");
        let c = MgmtClient::new("http://h/rabbit", "a", "b").unwrap();
        assert_eq!(c.api_url(), "http://h/rabbit/api");
    }

    #[test]
    fn bad_urls_are_refused_without_leaking() {
        let err = MgmtClient::from_urls("https://a:hunter22@h", &BrokerUrl::default()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("https") && !text.contains("hunter22"),
            "{text}"
        );
        let err = MgmtClient::new("ftp://h", "u", "p").unwrap_err();
        assert!(matches!(err, MgmtError::InvalidUrl { .. }));
    }

    #[test]
    fn debug_never_shows_passwords() {
        let c = MgmtClient::new("http://h:15672", "u", "sekrit-pw").unwrap();
        assert!(!format!("{c:?}").contains("sekrit-pw"));
        let s = ShovelSpec {
            src_uri: "amqp://a:sekrit-a@h/v".into(),
            dest_uri: "amqp://b:sekrit-b@h2/v".into(),
            ..ShovelSpec::default()
        };
        let text = format!("{s:?}");
        assert!(!text.contains("sekrit"), "{text}");
    }

    #[test]
    fn paths_encode_vhosts_and_names() {
        let c = MgmtClient::new("http://h:15672", "u", "p").unwrap();
        assert_eq!(
            c.url(&["queues", "/", "q_a.b"]),
            "http://h:15672/api/queues/%2F/q_a.b"
        );
        assert_eq!(
            c.url(&["connections", "127.0.0.1:1 -> 127.0.0.1:5672"]),
            "http://h:15672/api/connections/127.0.0.1%3A1%20-%3E%20127.0.0.1%3A5672"
        );
        assert_eq!(c.display_path(&["vhosts", "a#b"]), "/api/vhosts/a%23b");
        assert!(seg("queue", "").is_err() && seg("queue", "..").is_err() && seg("q", "x").is_ok());
    }

    #[test]
    fn tags_accept_array_string_and_null() {
        let users: Vec<UserInfo> = serde_json::from_str(
            r#"[{"name":"a","tags":["administrator","management"]},
                {"name":"b","tags":"monitoring, management"},
                {"name":"c","tags":""},
                {"name":"d","tags":null},
                {"name":"e"}]"#,
        )
        .unwrap();
        let tags: Vec<Vec<String>> = users.into_iter().map(|u| u.tags).collect();
        assert_eq!(tags[0], ["administrator", "management"]);
        assert_eq!(tags[1], ["monitoring", "management"]);
        assert!(tags[2..].iter().all(Vec::is_empty));
    }

    #[test]
    fn api_reasons_are_unescaped_and_bounded() {
        let body = r#"{"error":"bad_request","reason":"Validation failed\n\nUnrecognised terms [{&lt;&lt;\"x\"&gt;&gt;,true}]"}"#;
        assert_eq!(
            api_reason(body),
            r#"bad_request: Validation failed Unrecognised terms [{<<"x">>,true}]"#
        );
        assert_eq!(api_reason(""), "(empty answer)");
        assert!(api_reason(&"é".repeat(1000)).len() <= 504);
    }

    #[test]
    fn shovel_value_has_the_3_10_keys() {
        let s = ShovelSpec {
            src_uri: "amqp://a@h/v".into(),
            src_queue: "q".into(),
            dest_uri: "amqp://b@h2/v".into(),
            dest_exchange: "xreport".into(),
            reconnect_delay_s: Some(5),
            ..ShovelSpec::default()
        };
        let v = s.to_value();
        assert_eq!(v["value"]["ack-mode"], "on-confirm");
        assert_eq!(v["value"]["src-queue"], "q");
        assert_eq!(v["value"]["dest-exchange"], "xreport");
        assert_eq!(v["value"]["reconnect-delay"], 5);
        assert!(v["value"].get("dest-exchange-key").is_none());
        assert!(v["value"].get("src-predeclared").is_none());
        assert!(v["value"].get("dest-publish-properties").is_none());
    }

    #[test]
    fn shovel_definitions_read_back_what_was_written() {
        let s = ShovelSpec {
            src_uri: "amqp:///v".into(),
            src_queue: "q".into(),
            dest_uri: "amqp://b:pw@h2/v".into(),
            dest_exchange: "xs_b".into(),
            dest_exchange_key: Some("k".into()),
            ack_mode: AckMode::OnPublish,
            reconnect_delay_s: Some(5),
            prefetch_count: Some(100),
            dest_user_id: Some("b".into()),
        };
        let v = s.to_value();
        assert_eq!(v["value"]["dest-publish-properties"]["user_id"], "b");
        let back = ShovelSpec::from_value(v["value"].as_object().unwrap());
        assert_eq!(back.spec, s);
        assert!(back.other_keys.is_empty());
        let mut odd = v["value"].as_object().unwrap().clone();
        odd.insert("add-forward-headers".into(), json!(true));
        odd.insert("reconnect-delay".into(), json!("soon"));
        let back = ShovelSpec::from_value(&odd);
        assert_eq!(back.other_keys, ["add-forward-headers", "reconnect-delay"]);
    }
}
