//! The ingest API: what the homeserver calls. Loopback by default, bearer-token protected
//! (except `/health` and `/metrics`), JSON in and out; every refusal is
//! `{"errcode": …, "error": …}` with a reason. A submission is answered only once it is
//! durable: events after their SQLite commit, to-device messages after the core's outbox rows
//! are committed; ephemeral updates once the core accepted them.
//!
//! | route | body | effect |
//! |---|---|---|
//! | `POST /_fedsend/v1/events` | `{event_id, pdu, hosts, partial_state_servers?, invitee_server?, proactively_send?, out_of_band?, send_on_behalf_of?}` | a local event (already signed by the homeserver) to send |
//! | `POST /_fedsend/v1/remote_events` | `{event_id, pdu, hosts?}` | a remote event that extends a room (forward extremities) |
//! | `PUT /_fedsend/v1/rooms/{room_id}/partial_state` | `{servers: [..] or null}` | room partial-state on our side, or fully joined |
//! | `POST /_fedsend/v1/to_device` | the core's `to_device` input | acknowledged when durable |
//! | `POST /_fedsend/v1/{kind}` | the core's input of that `type` without the tag | `typing`, `receipt`, `presence`, `edu`, `remote_up`, and any newer core command (e.g. device-list updates) |
//! | `POST /_fedsend/v1/destinations/{name}/reset` | – | clear backoff and retry now |
//! | `GET /_fedsend/v1/destinations[/{name}]` | – | per-destination state (like Synapse's admin API) |
//! | `GET /health`, `GET /metrics` | – | liveness; Prometheus text |

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use fedsend_core::{PduInfo, ServerName, server_of};
use serde::Deserialize;
use serde_json::{Value, json};

use super::driver::{DriverHandle, Rejection, now_ms};
use super::metrics::Metrics;
use super::store::NewEvent;

/// What the handlers share.
#[derive(Debug)]
pub struct ApiState {
    /// The driver.
    pub driver: DriverHandle,
    /// Metrics, rendered on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The bearer token.
    pub token: String,
    /// Our server name.
    pub server_name: ServerName,
    /// Largest body accepted.
    pub body_bytes_max: usize,
    /// Largest EDU content accepted.
    pub edu_bytes_max: usize,
    /// How long a request body may take to arrive.
    pub body_read_timeout: Duration,
}

/// Commands acknowledged only once what they caused is durable.
const DURABLE: &[&str] = &["to_device", "device_list_update", "signing_key_update"];

/// Core input types that only the driver may feed (completions, the events stream, time).
const DRIVER_ONLY: &[&str] = &[
    "new_events",
    "events_fetched",
    "catch_up_loaded",
    "outstanding_loaded",
    "persisted",
    "storage_failed",
    "transaction_done",
    "timeout",
    "set_destination_state",
];

/// The router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/_fedsend/v1/events", post(local_event))
        .route("/_fedsend/v1/remote_events", post(remote_event))
        .route("/_fedsend/v1/rooms/{room_id}/partial_state", put(partial_state))
        .route("/_fedsend/v1/destinations", get(destinations))
        .route("/_fedsend/v1/destinations/{name}", get(destination))
        .route("/_fedsend/v1/destinations/{name}/reset", post(reset))
        .route("/_fedsend/v1/{kind}", post(command))
        .fallback(not_found)
        // After the routes: it applies to those already added.
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn error(status: StatusCode, errcode: &str, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "errcode": errcode, "error": message.into() }))).into_response()
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        error(status, self.errcode, self.error)
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "no such endpoint")
}

/// The Matrix convention for a known path with an unsupported method.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", format!("{method} is not supported on {}", uri.path()))
}

fn refusal(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Rejection {
    Rejection { status: status.as_u16(), errcode, error: message.into() }
}

fn authorize(state: &ApiState, headers: &HeaderMap) -> Result<(), Rejection> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(refusal(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "missing Authorization: Bearer <token>"));
    };
    let presented = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default().as_bytes();
    let expected = state.token.as_bytes();
    // Compare in time independent of where the first difference is.
    let same =
        presented.len() == expected.len() && presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same { Ok(()) } else { Err(refusal(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "invalid ingest token")) }
}

async fn read_json<T: for<'de> Deserialize<'de>>(state: &ApiState, body: Body) -> Result<T, Rejection> {
    let reading = tokio::time::timeout(state.body_read_timeout, to_bytes(body, state.body_bytes_max));
    let bytes = reading
        .await
        .map_err(|_| {
            refusal(
                StatusCode::REQUEST_TIMEOUT,
                "M_UNKNOWN",
                format!(
                    "the request body did not arrive within {} ms ([ingest] body_read_timeout_ms)",
                    state.body_read_timeout.as_millis()
                ),
            )
        })?
        .map_err(|_| {
            refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!("request body larger than {} bytes ([ingest] body_bytes_max)", state.body_bytes_max),
            )
        })?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, "M_NOT_JSON", format!("body is not JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| refusal(StatusCode::BAD_REQUEST, "M_BAD_JSON", format!("{e}")))
}

async fn health(State(state): State<Arc<ApiState>>) -> Response {
    match state.metrics.recent_problem(now_ms()) {
        None => axum::Json(json!({ "status": "ok" })).into_response(),
        Some(problem) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "degraded", "problem": problem.what, "at_ms": problem.at_ms })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, Rejection> {
    // Only the first scrape asks the driver (and may wait behind submissions); later ones
    // read what the driver took within the last second.
    let stats = match state.metrics.want_stats(now_ms()) {
        Some(stats) => stats,
        None => Arc::new(state.driver.stats().await?),
    };
    let text = state.metrics.render(&stats, now_ms());
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

/// A submitted event (local or remote).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventSubmission {
    event_id: String,
    pdu: Value,
    #[serde(default)]
    hosts: Vec<ServerName>,
    #[serde(default)]
    partial_state_servers: Option<Vec<ServerName>>,
    #[serde(default)]
    invitee_server: Option<ServerName>,
    #[serde(default = "yes")]
    proactively_send: bool,
    #[serde(default)]
    out_of_band: bool,
    #[serde(default)]
    send_on_behalf_of: Option<ServerName>,
}

fn yes() -> bool {
    true
}

fn bad(message: impl Into<String>) -> Rejection {
    refusal(StatusCode::BAD_REQUEST, "M_BAD_JSON", message)
}

/// Checks the submission and reads the routing fields out of the PDU.
fn new_event(state: &ApiState, submission: EventSubmission, local: bool) -> Result<NewEvent, Rejection> {
    let EventSubmission {
        event_id,
        pdu,
        hosts,
        partial_state_servers,
        invitee_server,
        proactively_send,
        out_of_band,
        send_on_behalf_of,
    } = submission;
    if !event_id.starts_with('$') || event_id.len() < 2 || event_id.len() > 255 {
        return Err(bad(format!("event_id {event_id:?} is not an event id ($…, at most 255 bytes)")));
    }
    // Refused here rather than stored: the core could never send it (see fedsend_core::nesting).
    fedsend_core::nesting::check_value_depth("pdu", &pdu).map_err(bad)?;
    let object = pdu.as_object().ok_or_else(|| bad("pdu must be a JSON object"))?;
    let text = |key: &str| object.get(key).and_then(Value::as_str);
    // Room version 12 create events carry no room_id: the room id is the create event's id
    // with `!` for `$`, and room ids no longer name a server.
    let derived_room_id;
    let room_id = match text("room_id") {
        Some(room_id) => room_id,
        None if text("type") == Some("m.room.create") => {
            derived_room_id = format!("!{}", &event_id[1..]);
            &derived_room_id
        }
        None => return Err(bad("pdu.room_id is missing or not a string")),
    };
    if !room_id.starts_with('!') || room_id.len() < 2 || room_id.len() > 255 {
        return Err(bad(format!("pdu.room_id {room_id:?} is not a room id (!…, at most 255 bytes)")));
    }
    let sender = text("sender").ok_or_else(|| bad("pdu.sender is missing or not a string"))?;
    let sender_server = server_of(sender)
        .filter(|_| sender.starts_with('@'))
        .and_then(|s| ServerName::parse(s).ok())
        .ok_or_else(|| bad(format!("pdu.sender {sender:?} is not a user id (@…:server)")))?;
    if local && sender_server != state.server_name {
        return Err(bad(format!(
            "pdu.sender {sender} is not a user of {}; submit other servers' events to /remote_events",
            state.server_name
        )));
    }
    if !local && sender_server == state.server_name {
        return Err(bad(format!("pdu.sender {sender} is local; submit it to /events")));
    }
    let depth = object
        .get("depth")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("pdu.depth is missing or not a non-negative integer"))?;
    let prev_events = match object.get("prev_events") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad("pdu.prev_events must be event ids")))
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad("pdu.prev_events is missing or not an array")),
    };
    let info = PduInfo {
        event_id,
        room_id: room_id.to_owned(),
        stream_ordering: 0,
        sender: sender.to_owned(),
        has_prev_events: !prev_events.is_empty(),
        hosts,
        partial_state_servers,
        invitee_server,
        proactively_send,
        out_of_band,
        send_on_behalf_of,
        received_ts: Some(now_ms()),
        pdu,
    };
    Ok(NewEvent { info, depth, prev_events, local })
}

async fn submit_event(
    state: Arc<ApiState>,
    headers: HeaderMap,
    body: Body,
    local: bool,
) -> Result<Response, Rejection> {
    authorize(&state, &headers)?;
    let submission: EventSubmission = read_json(&state, body).await?;
    let event = new_event(&state, submission, local)?;
    let added = state.driver.event(event).await?;
    Ok(axum::Json(json!({ "stream_ordering": added.stream_ordering, "new": added.new })).into_response())
}

async fn local_event(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    submit_event(state, headers, body, true).await
}

async fn remote_event(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    submit_event(state, headers, body, false).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialState {
    /// Required even when null: `{}` is more likely a mistake than "fully joined again".
    #[serde(deserialize_with = "required_nullable")]
    servers: Option<Vec<ServerName>>,
}

/// With `deserialize_with` and no `default`, serde reports a missing field instead of
/// quietly taking `None`.
fn required_nullable<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)
}

async fn partial_state(
    State(state): State<Arc<ApiState>>,
    Path(room_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    authorize(&state, &headers)?;
    let request: PartialState = read_json(&state, body).await?;
    state.driver.partial_state(room_id, request.servers).await?;
    Ok(axum::Json(json!({})).into_response())
}

async fn command(
    State(state): State<Arc<ApiState>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Rejection> {
    authorize(&state, &headers)?;
    if DRIVER_ONLY.contains(&kind.as_str()) || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(refusal(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", format!("no such command {kind:?}")));
    }
    let mut object: serde_json::Map<String, Value> = read_json(&state, body).await?;
    if object.contains_key("type") {
        return Err(bad("the command is named by the URL; remove \"type\" from the body"));
    }
    if kind == "edu" {
        let size = object.get("content").map_or(0, |c| c.to_string().len());
        if size > state.edu_bytes_max {
            return Err(refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!("EDU content is {size} bytes, more than {} ([ingest] edu_bytes_max)", state.edu_bytes_max),
            ));
        }
    }
    check_integers_storable("", &object)?;
    object.insert("type".into(), Value::String(kind.clone()));
    let fed = if DURABLE.contains(&kind.as_str()) {
        state.driver.durable_input(Value::Object(object)).await
    } else {
        state.driver.input(Value::Object(object)).await
    };
    fed.map_err(|refused| engine_refusal(&kind, refused))?;
    Ok(axum::Json(json!({})).into_response())
}

/// SQLite keeps integers as i64. An integer above that (e.g. a device-list `stream_id` of
/// 2^63) would be accepted by the core and then fail to persist on every attempt, so it is
/// refused here, naming where it is. (Content that is sent on rather than stored cannot hold
/// such numbers either: canonical JSON stops at 2^53.)
fn check_integers_storable(path: &str, object: &serde_json::Map<String, Value>) -> Result<(), Rejection> {
    for (key, value) in object {
        let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        check_integer_storable(&path, value)?;
    }
    Ok(())
}

fn check_integer_storable(path: &str, value: &Value) -> Result<(), Rejection> {
    match value {
        Value::Number(number) if number.as_u64().is_some_and(|n| i64::try_from(n).is_err()) => Err(refusal(
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
            format!("{path} is {number}, more than {}, the largest integer the store can hold", i64::MAX),
        )),
        Value::Object(object) => check_integers_storable(path, object),
        Value::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, item)| check_integer_storable(&format!("{path}[{i}]"), item))
        }
        _ => Ok(()),
    }
}

/// The engine's refusals are 400 `M_INVALID_PARAM` unless they say more: a command type the
/// engine does not know is 404 `M_UNRECOGNIZED` (the engine decides, so a newer wasm core's
/// commands pass), and the core marks a to-device message too large for any EDU with
/// `M_TOO_LARGE`, which is 413 as on Synapse.
fn engine_refusal(kind: &str, refused: Rejection) -> Rejection {
    if refused.status != StatusCode::BAD_REQUEST.as_u16() {
        return refused;
    }
    if refused.error.contains(&format!("unknown variant `{kind}`")) {
        return refusal(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", format!("no such command {kind:?}"));
    }
    if refused.error.starts_with("refused: M_TOO_LARGE") {
        return Rejection { status: StatusCode::PAYLOAD_TOO_LARGE.as_u16(), errcode: "M_TOO_LARGE", ..refused };
    }
    refused
}

async fn destinations(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Response, Rejection> {
    authorize(&state, &headers)?;
    let stats = state.driver.stats().await?;
    Ok(axum::Json(json!({ "total": stats.len(), "destinations": stats })).into_response())
}

fn parse_destination(name: &str) -> Result<ServerName, Rejection> {
    ServerName::parse(name)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", format!("{name:?} is not a server name: {e}")))
}

async fn destination(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Rejection> {
    authorize(&state, &headers)?;
    let name = parse_destination(&name)?;
    let stats = state.driver.stats().await?;
    let found = stats
        .into_iter()
        .find(|s| s.destination == name)
        .ok_or_else(|| refusal(StatusCode::NOT_FOUND, "M_NOT_FOUND", format!("unknown destination {name}")))?;
    Ok(axum::Json(found).into_response())
}

async fn reset(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Rejection> {
    authorize(&state, &headers)?;
    let name = parse_destination(&name)?;
    state.driver.input(json!({ "type": "wake_destination", "destination": name })).await?;
    Ok(axum::Json(json!({})).into_response())
}
