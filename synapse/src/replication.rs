//! Synapse's replication commands as they travel over Redis, the rows of the streams a
//! federation sender reads, and the client-side rules that turn a sequence of command lines
//! into ordered updates.
//!
//! Each Redis message is one UTF-8 line: the command name, one space, then the command's
//! arguments (so an argument-less command such as `REPLICATE` goes out with a trailing space).
//! Everything here is pure: [`parse_command`] and [`ReplicationState::handle_line`] take a
//! line and never panic on any input.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A stream token: a position in one writer's sequence of a stream.
pub type Token = i64;

/// One replication command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A row of `stream` written by `instance`; `token` is `None` for `batch`, meaning more
    /// rows with the same token follow and the last of them carries it.
    Rdata {
        stream: String,
        instance: String,
        token: Option<Token>,
        row: Value,
    },
    /// `instance` has written nothing to `stream` between `prev_token` and `new_token`.
    Position {
        stream: String,
        instance: String,
        prev_token: Token,
        new_token: Token,
    },
    /// Asks every instance to announce the positions of the streams it writes.
    Replicate,
    FederationAck {
        instance: String,
        token: Token,
    },
    /// A server that was failing answered again: retry it now.
    RemoteServerUp {
        server: String,
    },
    /// A command a federation sender does not act on (`USER_SYNC`, `LOCK_RELEASED`, …).
    Other {
        name: String,
        rest: String,
    },
}

impl Command {
    /// The line as Synapse writes it: name, one space, arguments.
    pub fn to_line(&self) -> String {
        match self {
            Self::Rdata { stream, instance, token, row } => {
                let token = token.map_or_else(|| "batch".to_owned(), |t| t.to_string());
                format!("RDATA {stream} {instance} {token} {row}")
            }
            Self::Position { stream, instance, prev_token, new_token } => {
                format!("POSITION {stream} {instance} {prev_token} {new_token}")
            }
            Self::Replicate => "REPLICATE ".to_owned(),
            Self::FederationAck { instance, token } => format!("FEDERATION_ACK {instance} {token}"),
            Self::RemoteServerUp { server } => format!("REMOTE_SERVER_UP {server}"),
            Self::Other { name, rest } => format!("{name} {rest}"),
        }
    }
}

/// Why a line is not a valid command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    Blank,
    /// The command has fewer space-separated arguments than it needs.
    MissingArguments {
        command: &'static str,
        expected: usize,
    },
    /// `FEDERATION_ACK` takes exactly two arguments.
    ExtraArguments {
        command: &'static str,
    },
    BadToken {
        command: &'static str,
        text: String,
    },
    BadJson {
        command: &'static str,
        reason: String,
    },
    /// A command whose argument may not be empty got an empty one.
    EmptyArgument {
        command: &'static str,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Blank => write!(f, "blank line"),
            Self::MissingArguments { command, expected } => write!(f, "{command} needs {expected} arguments"),
            Self::ExtraArguments { command } => write!(f, "{command} has too many arguments"),
            Self::BadToken { command, text } => write!(f, "{command}: {text:?} is not a stream token"),
            Self::BadJson { command, reason } => write!(f, "{command}: invalid JSON: {reason}"),
            Self::EmptyArgument { command } => write!(f, "{command} needs a non-empty argument"),
        }
    }
}

impl std::error::Error for CommandError {}

/// Parses one line as received from Redis.
pub fn parse_command(line: &str) -> Result<Command, CommandError> {
    if line.trim().is_empty() {
        return Err(CommandError::Blank);
    }
    let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
    match name {
        "RDATA" => {
            let [stream, instance, token, row_json] = split_arguments::<4>(rest, "RDATA")?;
            let token = if token == "batch" { None } else { Some(parse_token(token, "RDATA")?) };
            let row = serde_json::from_str(row_json)
                .map_err(|e| CommandError::BadJson { command: "RDATA", reason: e.to_string() })?;
            Ok(Command::Rdata { stream: stream.to_owned(), instance: instance.to_owned(), token, row })
        }
        "POSITION" => {
            let [stream, instance, prev, new] = split_arguments::<4>(rest, "POSITION")?;
            Ok(Command::Position {
                stream: stream.to_owned(),
                instance: instance.to_owned(),
                prev_token: parse_token(prev, "POSITION")?,
                new_token: parse_token(new, "POSITION")?,
            })
        }
        "REPLICATE" => Ok(Command::Replicate),
        "FEDERATION_ACK" => {
            let [instance, token] = split_arguments::<2>(rest, "FEDERATION_ACK")?;
            if token.contains(' ') {
                return Err(CommandError::ExtraArguments { command: "FEDERATION_ACK" });
            }
            Ok(Command::FederationAck { instance: instance.to_owned(), token: parse_token(token, "FEDERATION_ACK")? })
        }
        "REMOTE_SERVER_UP" => {
            if rest.is_empty() {
                return Err(CommandError::EmptyArgument { command: "REMOTE_SERVER_UP" });
            }
            Ok(Command::RemoteServerUp { server: rest.to_owned() })
        }
        _ => Ok(Command::Other { name: name.to_owned(), rest: rest.to_owned() }),
    }
}

/// Splits off N-1 single-space-separated words; the last part keeps the rest of the line.
fn split_arguments<'a, const N: usize>(rest: &'a str, command: &'static str) -> Result<[&'a str; N], CommandError> {
    let mut parts = rest.splitn(N, ' ');
    let mut out = [""; N];
    for slot in &mut out {
        *slot = parts.next().ok_or(CommandError::MissingArguments { command, expected: N })?;
    }
    Ok(out)
}

fn parse_token(text: &str, command: &'static str) -> Result<Token, CommandError> {
    text.parse().map_err(|_| CommandError::BadToken { command, text: text.to_owned() })
}

/// The streams a federation sender reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stream {
    Events,
    Receipts,
    Typing,
    Presence,
    PresenceFederation,
    ToDevice,
    DeviceLists,
    Federation,
    Caches,
}

/// Streams Synapse has that a federation sender has no use for; their commands are skipped
/// quietly instead of being reported as unknown.
const UNUSED_SYNAPSE_STREAMS: [&str; 10] = [
    "backfill",
    "push_rules",
    "pushers",
    "account_data",
    "profile_updates",
    "sticky_events",
    "thread_subscriptions",
    "un_partial_stated_room",
    "un_partial_stated_event",
    "quarantined_media",
];

/// Where the rows of a stream gap come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapSource {
    /// Synapse's tables hold the stream.
    Database,
    /// Only the writer's memory holds it: ask its replication HTTP listener.
    WriterHttp,
}

impl Stream {
    pub const ALL: [Self; 9] = [
        Self::Events,
        Self::Receipts,
        Self::Typing,
        Self::Presence,
        Self::PresenceFederation,
        Self::ToDevice,
        Self::DeviceLists,
        Self::Federation,
        Self::Caches,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Receipts => "receipts",
            Self::Typing => "typing",
            Self::Presence => "presence",
            Self::PresenceFederation => "presence_federation",
            Self::ToDevice => "to_device",
            Self::DeviceLists => "device_lists",
            Self::Federation => "federation",
            Self::Caches => "caches",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn gap_source(self) -> GapSource {
        match self {
            Self::Typing | Self::Presence | Self::PresenceFederation | Self::Federation => GapSource::WriterHttp,
            Self::Events | Self::Receipts | Self::ToDevice | Self::DeviceLists | Self::Caches => GapSource::Database,
        }
    }

    /// Whether the writer numbers this stream from a persistent sequence. The others live in
    /// the writer's memory and restart from zero when it restarts.
    pub fn is_persistent(self) -> bool {
        !matches!(self, Self::Typing | Self::PresenceFederation | Self::Federation)
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A row of the `events` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsRow {
    /// A new event (or an outlier that stopped being one).
    Event(EventRow),
    /// One entry of a room's current state changed; `event_id` is `None` when it was removed.
    CurrentState { room_id: String, event_type: String, state_key: String, event_id: Option<String> },
    /// Too much of a room's current state changed to list it entry by entry.
    AllState { room_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub event_id: String,
    pub room_id: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub redacts: Option<String>,
    pub relates_to: Option<String>,
    pub membership: Option<String>,
    pub rejected: bool,
    pub outlier: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptRow {
    pub room_id: String,
    pub receipt_type: String,
    pub user_id: String,
    pub event_id: String,
    pub thread_id: Option<String>,
    pub data: Value,
}

/// Everyone typing in a room right now: the list replaces the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypingRow {
    pub room_id: String,
    pub user_ids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceRow {
    pub user_id: String,
    pub state: String,
    pub last_active_ts: i64,
    pub last_federation_update_ts: i64,
    pub last_user_sync_ts: i64,
    pub status_msg: Option<String>,
    pub currently_active: bool,
}

/// Send `user_id`'s current presence to `destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceFederationRow {
    pub destination: String,
    pub user_id: String,
}

/// A user with new to-device messages (`@…`) or a destination with new outbound ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToDeviceRow {
    pub entity: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListsRow {
    pub user_id: String,
    pub is_signature: bool,
    /// Whether the outbound pokes for remote servers are already written.
    pub hosts_calculated: bool,
}

/// The main process's vestigial queue: `kind` is `pd`, `k` or `e`.
#[derive(Debug, Clone, PartialEq)]
pub struct FederationRow {
    pub kind: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CachesRow {
    pub cache_func: String,
    /// `None` invalidates the whole cache.
    pub keys: Option<Vec<Value>>,
    pub invalidation_ts: Option<i64>,
}

/// A parsed row of one of the streams in [`Stream`].
#[derive(Debug, Clone, PartialEq)]
pub enum StreamRow {
    Events(EventsRow),
    Receipts(ReceiptRow),
    Typing(TypingRow),
    Presence(PresenceRow),
    PresenceFederation(PresenceFederationRow),
    ToDevice(ToDeviceRow),
    DeviceLists(DeviceListsRow),
    Federation(FederationRow),
    Caches(CachesRow),
}

/// A row that does not have its stream's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub stream: Stream,
    pub reason: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed {} row: {}", self.stream, self.reason)
    }
}

impl std::error::Error for RowError {}

/// Parses a row's JSON. Synapse builds rows positionally, so the arity must match exactly.
pub fn parse_row(stream: Stream, row: &Value) -> Result<StreamRow, RowError> {
    let error = |reason: String| RowError { stream, reason };
    fn tuple<T: DeserializeOwned>(row: &Value) -> Result<T, String> {
        T::deserialize(row).map_err(|e| e.to_string())
    }
    Ok(match stream {
        Stream::Events => {
            let (kind, data): (String, Value) = tuple(row).map_err(error)?;
            StreamRow::Events(match kind.as_str() {
                "ev" => {
                    let (event_id, room_id, event_type, state_key, redacts, relates_to, membership, rejected, outlier) =
                        tuple(&data).map_err(error)?;
                    EventsRow::Event(EventRow {
                        event_id,
                        room_id,
                        event_type,
                        state_key,
                        redacts,
                        relates_to,
                        membership,
                        rejected,
                        outlier,
                    })
                }
                "state" => {
                    let (room_id, event_type, state_key, event_id) = tuple(&data).map_err(error)?;
                    EventsRow::CurrentState { room_id, event_type, state_key, event_id }
                }
                "state-all" => {
                    let (room_id,): (String,) = tuple(&data).map_err(error)?;
                    EventsRow::AllState { room_id }
                }
                other => return Err(error(format!("unknown events row type {other:?}"))),
            })
        }
        Stream::Receipts => {
            let (room_id, receipt_type, user_id, event_id, thread_id, data) = tuple(row).map_err(error)?;
            StreamRow::Receipts(ReceiptRow { room_id, receipt_type, user_id, event_id, thread_id, data })
        }
        Stream::Typing => {
            let (room_id, user_ids) = tuple(row).map_err(error)?;
            StreamRow::Typing(TypingRow { room_id, user_ids })
        }
        Stream::Presence => {
            let (
                user_id,
                state,
                last_active_ts,
                last_federation_update_ts,
                last_user_sync_ts,
                status_msg,
                currently_active,
            ) = tuple(row).map_err(error)?;
            StreamRow::Presence(PresenceRow {
                user_id,
                state,
                last_active_ts,
                last_federation_update_ts,
                last_user_sync_ts,
                status_msg,
                currently_active,
            })
        }
        Stream::PresenceFederation => {
            let (destination, user_id) = tuple(row).map_err(error)?;
            StreamRow::PresenceFederation(PresenceFederationRow { destination, user_id })
        }
        Stream::ToDevice => {
            let (entity,) = tuple(row).map_err(error)?;
            StreamRow::ToDevice(ToDeviceRow { entity })
        }
        Stream::DeviceLists => {
            let (user_id, is_signature, hosts_calculated) = tuple(row).map_err(error)?;
            StreamRow::DeviceLists(DeviceListsRow { user_id, is_signature, hosts_calculated })
        }
        Stream::Federation => {
            let (kind, data) = tuple(row).map_err(error)?;
            StreamRow::Federation(FederationRow { kind, data })
        }
        Stream::Caches => {
            let (cache_func, keys, invalidation_ts) = tuple(row).map_err(error)?;
            StreamRow::Caches(CachesRow { cache_func, keys, invalidation_ts })
        }
    })
}

/// What a line means for the caller, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// New rows, all carrying `token`, in the order they were written.
    Rows {
        stream: Stream,
        instance: String,
        token: Token,
        rows: Vec<StreamRow>,
    },
    /// `instance`'s position on `stream` moved to `token` with nothing missed.
    Position {
        stream: Stream,
        instance: String,
        token: Token,
    },
    /// Rows in `(from, to]` were missed: fetch them (see [`Stream::gap_source`]) before
    /// acting on later updates of this stream. The position is already `to`.
    Gap {
        stream: Stream,
        instance: String,
        from: Token,
        to: Token,
    },
    /// The writer of an in-memory stream restarted and counts from `token` again: forget
    /// what it sent before.
    Reset {
        stream: Stream,
        instance: String,
        token: Token,
    },
    Replicate,
    RemoteServerUp {
        server: String,
    },
    FederationAck {
        instance: String,
        token: Token,
    },
    /// A command nobody here acts on; callers log it and move on.
    Other {
        name: String,
        rest: String,
    },
}

/// Why a line was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    Command(CommandError),
    /// A stream Synapse does not have (as of the version this was written against).
    UnknownStream(String),
    Row(RowError),
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Command(e) => e.fmt(f),
            Self::UnknownStream(name) => write!(f, "unknown stream {name:?}"),
            Self::Row(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LineError {}

impl From<CommandError> for LineError {
    fn from(e: CommandError) -> Self {
        Self::Command(e)
    }
}

/// The client side of one replication connection.
///
/// Positions are kept per (stream, writer instance) and survive reconnections; which streams
/// are "connected" (have had a POSITION processed) and half-received batches do not.
#[derive(Debug, Clone)]
pub struct ReplicationState {
    own_instance: String,
    positions: BTreeMap<(Stream, String), Token>,
    /// The position assumed for a writer not heard of yet.
    floors: BTreeMap<Stream, Token>,
    writers: BTreeMap<Stream, Vec<String>>,
    connected: BTreeSet<Stream>,
    pending_batches: BTreeMap<(Stream, String), Vec<StreamRow>>,
}

impl ReplicationState {
    /// Lines carrying `own_instance` as the writer are this process's echoes and are dropped.
    pub fn new(own_instance: &str) -> Self {
        Self {
            own_instance: own_instance.to_owned(),
            positions: BTreeMap::new(),
            floors: BTreeMap::new(),
            writers: BTreeMap::new(),
            connected: BTreeSet::new(),
            pending_batches: BTreeMap::new(),
        }
    }

    /// Sets a writer's position, e.g. from the database at startup. Without it every position
    /// starts at the stream's floor, or 0, as Synapse's in-memory streams do.
    pub fn seed_position(&mut self, stream: Stream, instance: &str, token: Token) {
        self.positions.insert((stream, instance.to_owned()), token);
    }

    /// The position assumed for writers of `stream` not seen yet; Synapse uses the stream's
    /// persisted position, so that a new writer's first POSITION is not a gap from zero.
    pub fn seed_floor(&mut self, stream: Stream, token: Token) {
        self.floors.insert(stream, token);
    }

    /// The configured writers of `stream`, which [`Self::current_token`] takes the minimum over.
    pub fn set_writers(&mut self, stream: Stream, instances: Vec<String>) {
        self.writers.insert(stream, instances);
    }

    pub fn position(&self, stream: Stream, instance: &str) -> Token {
        self.positions
            .get(&(stream, instance.to_owned()))
            .copied()
            .unwrap_or_else(|| self.floors.get(&stream).copied().unwrap_or(0))
    }

    /// The token up to which every writer of `stream` is known complete: the minimum over the
    /// configured writers, or else over the writers heard from. `None` if there are neither.
    pub fn current_token(&self, stream: Stream) -> Option<Token> {
        match self.writers.get(&stream) {
            Some(writers) if !writers.is_empty() => writers.iter().map(|w| self.position(stream, w)).min(),
            _ => self.positions.iter().filter(|((s, _), _)| *s == stream).map(|(_, token)| *token).min(),
        }
    }

    pub fn is_connected(&self, stream: Stream) -> bool {
        self.connected.contains(&stream)
    }

    /// The Redis connection dropped: every stream must see a POSITION again before its rows
    /// are trusted, and half-received batches are lost.
    pub fn connection_lost(&mut self) {
        self.connected.clear();
        self.pending_batches.clear();
    }

    /// Applies one received line. `Ok(None)`: nothing for the caller (an echo, a blank line, a
    /// stream it does not read, a buffered batch row, or a row it already has).
    pub fn handle_line(&mut self, line: &str) -> Result<Option<Update>, LineError> {
        match parse_command(line) {
            Err(CommandError::Blank) => Ok(None),
            Err(e) => Err(e.into()),
            Ok(command) => self.handle_command(command),
        }
    }

    pub fn handle_command(&mut self, command: Command) -> Result<Option<Update>, LineError> {
        match command {
            Command::Rdata { stream, instance, token, row } => self.handle_rdata(&stream, instance, token, &row),
            Command::Position { stream, instance, prev_token, new_token } => {
                self.handle_position(&stream, instance, prev_token, new_token)
            }
            Command::Replicate => Ok(Some(Update::Replicate)),
            Command::RemoteServerUp { server } => Ok(Some(Update::RemoteServerUp { server })),
            Command::FederationAck { instance, token } => Ok(Some(Update::FederationAck { instance, token })),
            Command::Other { name, rest } => Ok(Some(Update::Other { name, rest })),
        }
    }

    fn stream_of(&self, name: &str) -> Result<Option<Stream>, LineError> {
        match Stream::from_name(name) {
            Some(stream) => Ok(Some(stream)),
            None if UNUSED_SYNAPSE_STREAMS.contains(&name) => Ok(None),
            None => Err(LineError::UnknownStream(name.to_owned())),
        }
    }

    fn handle_rdata(
        &mut self,
        stream_name: &str,
        instance: String,
        token: Option<Token>,
        row: &Value,
    ) -> Result<Option<Update>, LineError> {
        if instance == self.own_instance {
            return Ok(None);
        }
        let Some(stream) = self.stream_of(stream_name)? else { return Ok(None) };
        // Parsed before anything else so that a malformed row is reported even when dropped.
        let row = parse_row(stream, row).map_err(LineError::Row)?;
        if !self.connected.contains(&stream) {
            return Ok(None);
        }
        let key = (stream, instance);
        let Some(token) = token else {
            self.pending_batches.entry(key).or_default().push(row);
            return Ok(None);
        };
        let mut rows = self.pending_batches.remove(&key).unwrap_or_default();
        rows.push(row);
        let (stream, instance) = key;
        if token <= self.position(stream, &instance) {
            return Ok(None);
        }
        self.positions.insert((stream, instance.clone()), token);
        Ok(Some(Update::Rows { stream, instance, token, rows }))
    }

    fn handle_position(
        &mut self,
        stream_name: &str,
        instance: String,
        prev_token: Token,
        new_token: Token,
    ) -> Result<Option<Update>, LineError> {
        if instance == self.own_instance {
            return Ok(None);
        }
        let Some(stream) = self.stream_of(stream_name)? else { return Ok(None) };
        let current = self.position(stream, &instance);
        // A persistent stream's position never goes back, so a POSITION at or behind it on a
        // connected stream tells nothing new.
        if stream.is_persistent() && self.connected.contains(&stream) && new_token <= current {
            return Ok(None);
        }
        // Batches started before the POSITION can no longer complete consistently.
        self.pending_batches.retain(|(s, _), _| *s != stream);
        self.connected.insert(stream);
        // A new token equal to where we are misses nothing whatever `prev_token` says (Synapse
        // never sends prev > new, but a line may): without the first test it would be reported
        // as the empty gap (current, current] (found by fuzz/, target `replication`).
        let update = if new_token == current || (prev_token <= current && current <= new_token) {
            Update::Position { stream, instance: instance.clone(), token: new_token }
        } else if new_token < current {
            if stream.is_persistent() {
                // Behind what is already known: nothing is missing and nothing moves back.
                return Ok(Some(Update::Position { stream, instance, token: current }));
            }
            Update::Reset { stream, instance: instance.clone(), token: new_token }
        } else {
            Update::Gap { stream, instance: instance.clone(), from: current, to: new_token }
        };
        self.positions.insert((stream, instance), new_token);
        Ok(Some(update))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> ReplicationState {
        ReplicationState::new("fedsend1")
    }

    fn lines(state: &mut ReplicationState, lines: &[&str]) -> Vec<Update> {
        lines.iter().filter_map(|l| state.handle_line(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
    }

    #[test]
    fn lines_seen_on_a_real_deployment_parse_and_apply() {
        let mut state = state();
        let updates = lines(
            &mut state,
            &[
                "REPLICATE",
                "POSITION events master 1 1",
                "POSITION presence_federation master 0 0",
                "POSITION typing master 0 0",
                r#"RDATA caches master 4 ["get_user_by_id",["@alice:127.0.0.1:58448"],1796423567198]"#,
                r#"RDATA device_lists master 2 ["@alice:127.0.0.1:58448",false,false]"#,
                r#"RDATA events master batch ["ev",["$Zkk","!Zkk","m.room.create","",null,null,null,false,false]]"#,
                r#"RDATA events master 2 ["state",["!Zkk","m.room.create","","$Zkk"]]"#,
                r#"LOCK_RELEASED ["master","new_event_during_purge_lock","!Zkk"]"#,
            ],
        );
        assert_eq!(updates[0], Update::Replicate);
        // No position was seeded, so the first events POSITION reports the gap (0, 1].
        assert_eq!(updates[1], Update::Gap { stream: Stream::Events, instance: "master".into(), from: 0, to: 1 });
        assert_eq!(
            updates[2],
            Update::Position { stream: Stream::PresenceFederation, instance: "master".into(), token: 0 }
        );
        assert_eq!(updates[3], Update::Position { stream: Stream::Typing, instance: "master".into(), token: 0 });
        // caches and device_lists had no POSITION on this connection: dropped.
        assert_eq!(
            updates[4],
            Update::Rows {
                stream: Stream::Events,
                instance: "master".into(),
                token: 2,
                rows: vec![
                    StreamRow::Events(EventsRow::Event(EventRow {
                        event_id: "$Zkk".into(),
                        room_id: "!Zkk".into(),
                        event_type: "m.room.create".into(),
                        state_key: Some(String::new()),
                        redacts: None,
                        relates_to: None,
                        membership: None,
                        rejected: false,
                        outlier: false,
                    })),
                    StreamRow::Events(EventsRow::CurrentState {
                        room_id: "!Zkk".into(),
                        event_type: "m.room.create".into(),
                        state_key: String::new(),
                        event_id: Some("$Zkk".into()),
                    }),
                ],
            }
        );
        assert_eq!(
            updates[5],
            Update::Other {
                name: "LOCK_RELEASED".into(),
                rest: r#"["master","new_event_during_purge_lock","!Zkk"]"#.into()
            }
        );
        assert_eq!(updates.len(), 6);
        assert_eq!(state.position(Stream::Events, "master"), 2);
        assert_eq!(state.current_token(Stream::Events), Some(2));
    }

    #[test]
    fn commands_round_trip_through_their_lines() {
        let commands = [
            Command::Rdata {
                stream: "events".into(),
                instance: "master".into(),
                token: Some(7),
                row: json!(["state-all", ["!r"]]),
            },
            Command::Rdata {
                stream: "typing".into(),
                instance: "master".into(),
                token: None,
                row: json!(["!r", ["@a:x"]]),
            },
            Command::Position { stream: "caches".into(), instance: "fedsend1".into(), prev_token: -1, new_token: 12 },
            Command::Replicate,
            Command::FederationAck { instance: "fedsend1".into(), token: 5 },
            Command::RemoteServerUp { server: "remote.example:8448".into() },
            Command::Other { name: "USER_SYNC".into(), rest: "inst @a:x DEV start 1".into() },
        ];
        for command in commands {
            let line = command.to_line();
            assert_eq!(parse_command(&line).unwrap(), command, "{line}");
        }
        assert_eq!(Command::Replicate.to_line(), "REPLICATE ");
        assert_eq!(
            Command::Rdata {
                stream: "caches".into(),
                instance: "fedsend1".into(),
                token: Some(9),
                row: json!(["f", ["d"], 1])
            }
            .to_line(),
            r#"RDATA caches fedsend1 9 ["f",["d"],1]"#
        );
    }

    #[test]
    fn malformed_commands_are_typed_errors() {
        let cases: [(&str, CommandError); 10] = [
            ("", CommandError::Blank),
            ("   ", CommandError::Blank),
            ("RDATA events master 5", CommandError::MissingArguments { command: "RDATA", expected: 4 }),
            ("RDATA events master x []", CommandError::BadToken { command: "RDATA", text: "x".into() }),
            ("POSITION events master 1", CommandError::MissingArguments { command: "POSITION", expected: 4 }),
            ("POSITION events master 1 two", CommandError::BadToken { command: "POSITION", text: "two".into() }),
            ("POSITION events master 1 2 3", CommandError::BadToken { command: "POSITION", text: "2 3".into() }),
            ("FEDERATION_ACK fedsend1", CommandError::MissingArguments { command: "FEDERATION_ACK", expected: 2 }),
            ("FEDERATION_ACK fedsend1 1 2", CommandError::ExtraArguments { command: "FEDERATION_ACK" }),
            ("REMOTE_SERVER_UP", CommandError::EmptyArgument { command: "REMOTE_SERVER_UP" }),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_command(line), Err(expected), "{line:?}");
        }
        assert!(matches!(
            parse_command("RDATA events master 5 [1,"),
            Err(CommandError::BadJson { command: "RDATA", .. })
        ));
        assert!(matches!(parse_command("FEDERATION_ACK fedsend1 -"), Err(CommandError::BadToken { .. })));
        // Unknown commands are kept, not refused.
        assert_eq!(
            parse_command("NEW_ACTIVE_TASK \"abc\""),
            Ok(Command::Other { name: "NEW_ACTIVE_TASK".into(), rest: "\"abc\"".into() })
        );
        assert_eq!(parse_command("ERROR"), Ok(Command::Other { name: "ERROR".into(), rest: String::new() }));
        // Every error renders as one line.
        assert!(CommandError::Blank.to_string().len() > 3);
    }

    #[test]
    fn every_consumed_stream_row_parses() {
        let cases = [
            (Stream::Receipts, json!(["!r", "m.read", "@u:x", "$e", null, {"ts": 1}])),
            (Stream::Receipts, json!(["!r", "m.read", "@u:x", "$e", "main", {}])),
            (Stream::Typing, json!(["!r", ["@u:x", "@v:x"]])),
            (Stream::Presence, json!(["@u:x", "online", 1, 2, 3, null, true])),
            (Stream::PresenceFederation, json!(["remote.example", "@u:x"])),
            (Stream::ToDevice, json!(["remote.example"])),
            (Stream::DeviceLists, json!(["@u:x", true, false])),
            (Stream::Federation, json!(["k", {"key": "v"}])),
            (Stream::Caches, json!(["get_destination_retry_timings", ["remote.example"], 17])),
            (Stream::Caches, json!(["some_cache", null, null])),
            (Stream::Events, json!(["state-all", ["!r"]])),
            (Stream::Events, json!(["state", ["!r", "m.room.member", "@u:x", null]])),
        ];
        for (stream, row) in cases {
            parse_row(stream, &row).unwrap_or_else(|e| panic!("{row}: {e}"));
        }
        assert_eq!(
            parse_row(Stream::Presence, &json!(["@u:x", "unavailable", 10, 20, 30, "lunch", false])).unwrap(),
            StreamRow::Presence(PresenceRow {
                user_id: "@u:x".into(),
                state: "unavailable".into(),
                last_active_ts: 10,
                last_federation_update_ts: 20,
                last_user_sync_ts: 30,
                status_msg: Some("lunch".into()),
                currently_active: false,
            })
        );
        assert_eq!(
            parse_row(Stream::DeviceLists, &json!(["@u:x", false, true])).unwrap(),
            StreamRow::DeviceLists(DeviceListsRow {
                user_id: "@u:x".into(),
                is_signature: false,
                hosts_calculated: true
            })
        );
    }

    #[test]
    fn malformed_rows_are_typed_errors() {
        let cases = [
            (Stream::Events, json!(["ev", ["$e", "!r"]])),
            (Stream::Events, json!(["ev", ["$e", "!r", "m.t", null, null, null, null, false, false, "extra"]])),
            (Stream::Events, json!(["nope", []])),
            (Stream::Events, json!({"ev": []})),
            (Stream::Events, json!(["state-all", "!r"])),
            (Stream::Receipts, json!(["!r", "m.read", "@u:x", "$e", null])),
            (Stream::Typing, json!(["!r", "@u:x"])),
            (Stream::Presence, json!(["@u:x", "online", "soon", 2, 3, null, true])),
            (Stream::PresenceFederation, json!(["remote.example"])),
            (Stream::ToDevice, json!("remote.example")),
            (Stream::DeviceLists, json!(["@u:x", "yes", false])),
            (Stream::Federation, json!([1, {}])),
            (Stream::Caches, json!(["f", "not-a-list", 1])),
        ];
        for (stream, row) in cases {
            let error = parse_row(stream, &row).expect_err(&row.to_string());
            assert_eq!(error.stream, stream);
            assert!(error.to_string().contains(stream.name()));
        }
    }

    #[test]
    fn unknown_and_unused_streams() {
        let mut state = state();
        assert_eq!(state.handle_line("POSITION bogus master 1 1"), Err(LineError::UnknownStream("bogus".into())));
        assert_eq!(state.handle_line("RDATA bogus master 1 []"), Err(LineError::UnknownStream("bogus".into())));
        assert_eq!(state.handle_line("POSITION account_data master 1 1"), Ok(None));
        assert_eq!(state.handle_line(r#"RDATA push_rules master 2 ["@u:x"]"#), Ok(None));
        assert!(matches!(state.handle_line("RDATA typing master 1 [1]"), Err(LineError::Row(_))));
        assert!(matches!(state.handle_line("POSITION typing master x 1"), Err(LineError::Command(_))));
        assert_eq!(state.handle_line(""), Ok(None));
        for stream in Stream::ALL {
            assert_eq!(Stream::from_name(stream.name()), Some(stream));
        }
    }

    #[test]
    fn rows_wait_for_a_position_on_this_connection() {
        let mut state = state();
        assert_eq!(state.handle_line(r#"RDATA to_device master 5 ["remote.example"]"#), Ok(None));
        assert!(!state.is_connected(Stream::ToDevice));
        assert_eq!(state.position(Stream::ToDevice, "master"), 0);
        lines(&mut state, &["POSITION to_device master 0 5"]);
        assert!(state.is_connected(Stream::ToDevice));
        let updates = lines(&mut state, &[r#"RDATA to_device master 6 ["remote.example"]"#]);
        assert_eq!(updates.len(), 1);

        state.connection_lost();
        assert!(!state.is_connected(Stream::ToDevice));
        assert_eq!(state.handle_line(r#"RDATA to_device master 7 ["x"]"#), Ok(None));
        // The position survives the reconnection: a POSITION continuing it is not a gap.
        assert_eq!(
            state.handle_line("POSITION to_device master 6 8"),
            Ok(Some(Update::Position { stream: Stream::ToDevice, instance: "master".into(), token: 8 }))
        );
    }

    #[test]
    fn stale_rows_and_positions_are_dropped() {
        let mut state = state();
        state.seed_position(Stream::Events, "master", 10);
        lines(&mut state, &["POSITION events master 10 10"]);
        let ev = r#"["ev",["$e","!r","m.room.message",null,null,null,null,false,false]]"#;
        assert_eq!(state.handle_line(&format!("RDATA events master 10 {ev}")), Ok(None));
        assert_eq!(state.handle_line(&format!("RDATA events master 9 {ev}")), Ok(None));
        assert!(state.handle_line(&format!("RDATA events master 11 {ev}")).unwrap().is_some());
        // Connected and not ahead: redundant.
        assert_eq!(state.handle_line("POSITION events master 5 11"), Ok(None));
        assert_eq!(state.handle_line("POSITION events master 3 4"), Ok(None));
        assert_eq!(state.position(Stream::Events, "master"), 11);
        // After a reconnection a POSITION behind us reports where we are without going back.
        state.connection_lost();
        assert_eq!(
            state.handle_line("POSITION events master 3 4"),
            Ok(Some(Update::Position { stream: Stream::Events, instance: "master".into(), token: 11 }))
        );
        assert_eq!(state.position(Stream::Events, "master"), 11);
        assert!(state.is_connected(Stream::Events));
    }

    #[test]
    fn positions_that_skip_rows_report_a_gap() {
        let mut state = state();
        state.seed_position(Stream::Receipts, "master", 3);
        assert_eq!(
            state.handle_line("POSITION receipts master 7 9"),
            Ok(Some(Update::Gap { stream: Stream::Receipts, instance: "master".into(), from: 3, to: 9 }))
        );
        assert_eq!(state.position(Stream::Receipts, "master"), 9);
        // prev ≤ current ≤ new: a plain advance.
        assert_eq!(
            state.handle_line("POSITION receipts master 9 12"),
            Ok(Some(Update::Position { stream: Stream::Receipts, instance: "master".into(), token: 12 }))
        );
        assert_eq!(
            state.handle_line("POSITION receipts master 13 14"),
            Ok(Some(Update::Gap { stream: Stream::Receipts, instance: "master".into(), from: 12, to: 14 }))
        );
    }

    #[test]
    fn in_memory_streams_reset_when_their_writer_restarts() {
        let mut state = state();
        lines(&mut state, &["POSITION typing master 0 0", r#"RDATA typing master 5 ["!r",["@u:x"]]"#]);
        assert_eq!(state.position(Stream::Typing, "master"), 5);
        // A connected in-memory stream's POSITION is never redundant.
        assert_eq!(
            state.handle_line("POSITION typing master 0 0"),
            Ok(Some(Update::Reset { stream: Stream::Typing, instance: "master".into(), token: 0 }))
        );
        assert_eq!(state.position(Stream::Typing, "master"), 0);
        assert!(state.handle_line(r#"RDATA typing master 1 ["!r",[]]"#).unwrap().is_some());
        // The vestigial federation stream: a POSITION ahead of us is a gap to fetch over HTTP.
        assert_eq!(
            state.handle_line("POSITION federation master 4 6"),
            Ok(Some(Update::Gap { stream: Stream::Federation, instance: "master".into(), from: 0, to: 6 }))
        );
        assert_eq!(Stream::Federation.gap_source(), GapSource::WriterHttp);
        assert_eq!(Stream::Events.gap_source(), GapSource::Database);
    }

    /// Regression (fuzz/corpus/replication/empty-gap): a POSITION whose prev token is ahead of
    /// us but whose new token is where we are was reported as the empty gap (0, 0].
    #[test]
    fn a_position_at_the_current_token_is_never_a_gap() {
        let mut state = state();
        assert_eq!(
            state.handle_line("POSITION events master 1 0"),
            Ok(Some(Update::Position { stream: Stream::Events, instance: "master".into(), token: 0 }))
        );
        lines(&mut state, &["POSITION typing master 0 0", r#"RDATA typing master 5 ["!r",["@u:x"]]"#]);
        assert_eq!(
            state.handle_line("POSITION typing master 7 5"),
            Ok(Some(Update::Position { stream: Stream::Typing, instance: "master".into(), token: 5 }))
        );
    }

    #[test]
    fn batches_complete_per_writer_and_die_with_a_position() {
        let mut state = state();
        lines(&mut state, &["POSITION presence_federation master 0 0", "POSITION presence_federation writer2 0 0"]);
        let row = |dest: &str| format!(r#"["{dest}","@u:x"]"#);
        assert_eq!(state.handle_line(&format!("RDATA presence_federation master batch {}", row("a"))), Ok(None));
        assert_eq!(state.handle_line(&format!("RDATA presence_federation writer2 batch {}", row("w"))), Ok(None));
        let Some(Update::Rows { rows, token, instance, .. }) =
            state.handle_line(&format!("RDATA presence_federation master 3 {}", row("b"))).unwrap()
        else {
            panic!("expected rows")
        };
        assert_eq!((token, instance.as_str(), rows.len()), (3, "master", 2));
        // A POSITION for the stream drops writer2's half batch.
        lines(&mut state, &["POSITION presence_federation master 3 3"]);
        let Some(Update::Rows { rows, .. }) =
            state.handle_line(&format!("RDATA presence_federation writer2 1 {}", row("x"))).unwrap()
        else {
            panic!("expected rows")
        };
        assert_eq!(rows, vec![parse_row(Stream::PresenceFederation, &json!(["x", "@u:x"])).unwrap()]);
        // A batch whose final token is stale is dropped whole.
        assert_eq!(state.handle_line(&format!("RDATA presence_federation master batch {}", row("c"))), Ok(None));
        assert_eq!(state.handle_line(&format!("RDATA presence_federation master 2 {}", row("d"))), Ok(None));
        let Some(Update::Rows { rows, .. }) =
            state.handle_line(&format!("RDATA presence_federation master 4 {}", row("e"))).unwrap()
        else {
            panic!("expected rows")
        };
        assert_eq!(rows.len(), 1);
    }

    #[test]
    fn own_echoes_are_dropped() {
        let mut state = state();
        lines(&mut state, &["POSITION caches master 0 0"]);
        assert_eq!(state.handle_line("POSITION caches fedsend1 0 9"), Ok(None));
        assert_eq!(state.handle_line(r#"RDATA caches fedsend1 9 ["get_destination_retry_timings",["d"],1]"#), Ok(None));
        assert_eq!(state.position(Stream::Caches, "fedsend1"), 0);
        // Echoes of commands without a writer still come through.
        assert_eq!(state.handle_line("REPLICATE "), Ok(Some(Update::Replicate)));
        assert_eq!(
            state.handle_line("REMOTE_SERVER_UP remote.example"),
            Ok(Some(Update::RemoteServerUp { server: "remote.example".into() }))
        );
        assert_eq!(
            state.handle_line("FEDERATION_ACK fedsend1 4"),
            Ok(Some(Update::FederationAck { instance: "fedsend1".into(), token: 4 }))
        );
    }

    #[test]
    fn the_current_token_is_the_minimum_over_writers() {
        let mut state = state();
        assert_eq!(state.current_token(Stream::Events), None);
        lines(&mut state, &["POSITION events master 0 10", "POSITION events writer2 0 7"]);
        assert_eq!(state.current_token(Stream::Events), Some(7));
        state.set_writers(Stream::Events, vec!["master".into(), "writer2".into(), "writer3".into()]);
        state.seed_floor(Stream::Events, 5);
        assert_eq!(state.current_token(Stream::Events), Some(5), "writer3 sits at the floor");
        assert_eq!(
            state.handle_line("POSITION events writer3 6 6"),
            Ok(Some(Update::Gap { stream: Stream::Events, instance: "writer3".into(), from: 5, to: 6 }))
        );
        assert_eq!(state.current_token(Stream::Events), Some(6));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = state();
        lines(&mut state, &["POSITION events master 0 0"]);
        let samples = [
            "RDATA",
            "RDATA ",
            "RDATA    ",
            "POSITION",
            "RDATA events master batch",
            "RDATA events master 99999999999999999999 []",
            "RDATA events master 1 [\"ev\"]",
            "RDATA events master 1 null",
            "\u{0}\u{1}",
            "POSITION events master -5 -3",
            "RDATA events master -1 [\"state-all\",[\"!r\"]]",
            "REMOTE_SERVER_UP  ",
            "FEDERATION_ACK  ",
        ];
        for sample in samples {
            let _ = state.handle_line(sample);
        }
        // Every prefix of a valid line, too.
        let line = r#"RDATA events master 3 ["ev",["$é","!r","m.t",null,null,null,null,false,false]]"#;
        for end in (0..=line.len()).filter(|i| line.is_char_boundary(*i)) {
            let _ = state.handle_line(&line[..end]);
        }
    }
}
