//! The scenario file format (docs/scenarios.md), parsed strictly: unknown ops, unknown
//! keys and wrong types are errors that name the step.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::Deserialize;
use serde_json::Value;

use crate::ScenarioError;

/// A whole scenario file.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Our homeserver's name.
    pub server_name: String,
    /// Seeds every random choice.
    pub seed: u64,
    /// Virtual Unix ms at the start.
    pub start_ms: u64,
    /// Overrides of the sender's config.
    pub config: serde_json::Map<String, Value>,
    /// This sender's instance name.
    pub instance: String,
    /// All sender instances.
    pub instances: Vec<String>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server_name: String,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_start_ms")]
    start_ms: u64,
    #[serde(default)]
    config: serde_json::Map<String, Value>,
    #[serde(default)]
    instances: Option<Instances>,
    steps: Vec<Value>,
}

fn default_start_ms() -> u64 {
    1_000_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Instances {
    #[serde(rename = "self")]
    this: String,
    all: Vec<String>,
}

/// Room history visibility, as set at creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Visible to any server once it is in the room (the default).
    #[default]
    Shared,
    /// Visible only to servers with a joined member at the event.
    Joined,
    /// Visible to servers with a joined or invited member at the event.
    Invited,
    /// Visible to everyone.
    WorldReadable,
}

/// Flags of a `send` step.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flags {
    /// Synapse's `proactively_send`.
    #[serde(default = "yes")]
    pub proactively_send: bool,
    /// An out-of-band membership.
    #[serde(default)]
    pub out_of_band: bool,
    /// Sent on behalf of this server.
    #[serde(default)]
    pub send_on_behalf_of: Option<String>,
}

fn yes() -> bool {
    true
}

/// How a remote answers `/send`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Respond {
    /// 200 with an empty `pdus` map.
    Ok,
    /// Connection refused.
    Unreachable,
    /// No answer within the request timeout.
    Timeout,
    /// A given status, maybe with `Retry-After`, errcode and per-PDU errors.
    Status {
        /// HTTP status.
        status: u16,
        /// `retry_after_ms`.
        retry_after_ms: Option<u64>,
        /// Matrix errcode.
        errcode: Option<String>,
        /// Per-PDU errors (status 200 only).
        pdu_errors: BTreeMap<String, String>,
    },
}

impl<'de> Deserialize<'de> for Respond {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Object {
            status: u16,
            #[serde(default)]
            retry_after_ms: Option<u64>,
            #[serde(default)]
            errcode: Option<String>,
            #[serde(default)]
            pdu_errors: BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Object(Object),
        }
        match Raw::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("`respond` must be \"ok\", \"unreachable\", \"timeout\" or {\"status\": N, …}")
        })? {
            Raw::Word(word) => match word.as_str() {
                "ok" => Ok(Self::Ok),
                "unreachable" => Ok(Self::Unreachable),
                "timeout" => Ok(Self::Timeout),
                other => Err(serde::de::Error::custom(format!("unknown `respond` value {other:?}"))),
            },
            Raw::Object(o) => {
                if !(100..=599).contains(&o.status) {
                    return Err(serde::de::Error::custom(format!("status {} is not an HTTP status", o.status)));
                }
                Ok(Self::Status {
                    status: o.status,
                    retry_after_ms: o.retry_after_ms,
                    errcode: o.errcode,
                    pdu_errors: o.pdu_errors,
                })
            }
        }
    }
}

/// One step of a scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[allow(missing_docs)] // the fields are those of docs/scenarios.md
pub enum Step {
    CreateRoom {
        room: String,
        creator: String,
        #[serde(default)]
        visibility: Visibility,
    },
    Join {
        room: String,
        user: String,
        #[serde(default)]
        id: Option<String>,
    },
    Leave {
        room: String,
        user: String,
        #[serde(default)]
        by: Option<String>,
        #[serde(default)]
        id: Option<String>,
    },
    Send {
        room: String,
        sender: String,
        #[serde(default = "default_type", rename = "type")]
        event_type: String,
        #[serde(default = "empty_object")]
        content: Value,
        #[serde(default)]
        state_key: Option<String>,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        flags: Option<Flags>,
        #[serde(default)]
        prev: Option<Vec<String>>,
    },
    PartialState {
        room: String,
        servers: Vec<String>,
    },
    FullState {
        room: String,
    },
    Receipt {
        room: String,
        user: String,
        event: String,
        #[serde(default)]
        receipt_type: Option<String>,
        #[serde(default)]
        thread: Option<String>,
        ts: u64,
    },
    Presence {
        user: String,
        presence: String,
        #[serde(default)]
        status_msg: Option<String>,
        #[serde(default)]
        last_active_ts: Option<u64>,
        #[serde(default)]
        currently_active: Option<bool>,
        destinations: Vec<String>,
    },
    Typing {
        room: String,
        user: String,
        typing: bool,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    ToDevice {
        sender: String,
        #[serde(rename = "type")]
        event_type: String,
        messages: BTreeMap<String, BTreeMap<String, Value>>,
        #[serde(default)]
        message_id: Option<String>,
    },
    DeviceUpdate {
        user: String,
        device: String,
        #[serde(default)]
        deleted: Option<bool>,
        #[serde(default)]
        keys: Option<Value>,
        #[serde(default)]
        display_name: Option<String>,
    },
    SigningKeyUpdate {
        user: String,
        #[serde(default)]
        master_key: Option<Value>,
        #[serde(default)]
        self_signing_key: Option<Value>,
    },
    Edu {
        destination: String,
        edu_type: String,
        content: Value,
        #[serde(default)]
        key: Option<String>,
    },
    Remote {
        host: String,
        respond: Respond,
        #[serde(default)]
        latency_ms: Option<u64>,
    },
    Reject {
        host: String,
        #[serde(default)]
        pdus: Vec<String>,
        #[serde(default)]
        edu_types: Vec<String>,
        status: u16,
    },
    Inbound {
        host: String,
    },
    Wake {
        host: String,
    },
    Advance {
        ms: u64,
    },
    Settle {},
    Restart {},
    SetRetryTimings {
        host: String,
        failure_ts: Option<u64>,
        retry_last_ts: u64,
        retry_interval_ms: u64,
    },
    SetLastSuccessful {
        host: String,
        event: String,
    },
    Snapshot {},
}

fn default_type() -> String {
    String::from("m.room.message")
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

impl Step {
    /// The `op` name, for messages.
    pub fn op(&self) -> &'static str {
        match self {
            Self::CreateRoom { .. } => "create_room",
            Self::Join { .. } => "join",
            Self::Leave { .. } => "leave",
            Self::Send { .. } => "send",
            Self::PartialState { .. } => "partial_state",
            Self::FullState { .. } => "full_state",
            Self::Receipt { .. } => "receipt",
            Self::Presence { .. } => "presence",
            Self::Typing { .. } => "typing",
            Self::ToDevice { .. } => "to_device",
            Self::DeviceUpdate { .. } => "device_update",
            Self::SigningKeyUpdate { .. } => "signing_key_update",
            Self::Edu { .. } => "edu",
            Self::Remote { .. } => "remote",
            Self::Reject { .. } => "reject",
            Self::Inbound { .. } => "inbound",
            Self::Wake { .. } => "wake",
            Self::Advance { .. } => "advance",
            Self::Settle {} => "settle",
            Self::Restart {} => "restart",
            Self::SetRetryTimings { .. } => "set_retry_timings",
            Self::SetLastSuccessful { .. } => "set_last_successful",
            Self::Snapshot {} => "snapshot",
        }
    }
}

impl Scenario {
    /// Parses and checks a scenario file; every step is decoded before anything runs.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let file: File =
            serde_json::from_str(text).map_err(|e| ScenarioError::new(format!("invalid scenario: {e}")))?;
        let mut steps = Vec::with_capacity(file.steps.len());
        for (index, raw) in file.steps.into_iter().enumerate() {
            let op = raw.get("op").and_then(Value::as_str).map(String::from);
            let step: Step = serde_json::from_value(raw).map_err(|e| match &op {
                Some(op) => ScenarioError::new(format!("step {index} ({op}): {e}")),
                None => ScenarioError::new(format!("step {index}: {e}")),
            })?;
            steps.push(step);
        }
        let (instance, instances) = match file.instances {
            Some(Instances { this, all }) => (this, all),
            None => (String::from("main"), alloc::vec![String::from("main")]),
        };
        Ok(Self {
            server_name: file.server_name,
            seed: file.seed,
            start_ms: file.start_ms,
            config: file.config,
            instance,
            instances,
            steps,
        })
    }
}
