//! D12: per-destination figures follow what the destination is doing.

use std::collections::BTreeMap;

use fedsend_core::{
    Config, DestinationPhase, FederationSender, Input, Output, PduInfo, Recovered, RequestId, Timestamp,
    TransactionResult,
};
mod common;

use common::{name, pdu};

fn event(stream: u64) -> PduInfo {
    pdu(&format!("${stream}"), "!r:test", stream, &["host2"])
}

/// Feeds `input`, acknowledges writes, and returns the request ids of fetches and sends.
fn step(sender: &mut FederationSender, now: Timestamp, input: Input) -> (Vec<RequestId>, Vec<RequestId>) {
    let (mut fetches, mut sends) = (Vec::new(), Vec::new());
    let mut inputs = vec![input];
    while let Some(input) = inputs.pop() {
        sender.handle_input(now, input).unwrap();
        while let Some(output) = sender.poll_output() {
            match output {
                Output::Persist { request, .. } => inputs.push(Input::Persisted { request }),
                Output::FetchEvents { request, .. } => fetches.push(request),
                Output::SendTransaction(txn) => sends.push(txn.request),
                _ => {}
            }
        }
    }
    (fetches, sends)
}

#[test]
fn figures_track_queue_depth_age_flight_and_backoff() {
    let mut config = Config::new(name("test"));
    config.http_retries_max = 0;
    let mut sender = FederationSender::new(config, Recovered::default()).unwrap();
    let t0 = Timestamp(10_000_000);
    let (fetches, _) = step(&mut sender, t0, Input::Timeout);
    let (_, sends) = step(&mut sender, t0, Input::EventsFetched { request: fetches[0], events: vec![event(1)] });
    assert_eq!(sends.len(), 1);
    // While the first transaction is in flight, two more events queue up.
    let (fetches, _) = step(&mut sender, t0, Input::NewEvents { up_to: 3 });
    step(&mut sender, t0, Input::EventsFetched { request: fetches[0], events: vec![event(2), event(3)] });
    let t1 = t0.plus_ms(5_000);
    let stats = sender.stats_for(&name("host2")).unwrap();
    assert_eq!(stats.state, DestinationPhase::Sending);
    assert!(stats.in_flight);
    assert_eq!(stats.queued_pdus, 3);
    sender.handle_input(t1, Input::Timeout).unwrap();
    assert_eq!(sender.stats_for(&name("host2")).unwrap().oldest_pending_age_ms, Some(5_000));
    // The attempt fails: the destination backs off for 10 minutes.
    step(&mut sender, t1, Input::TransactionDone { request: sends[0], result: TransactionResult::Unreachable });
    let stats = sender.stats_for(&name("host2")).unwrap();
    assert_eq!(stats.state, DestinationPhase::BackingOff);
    assert_eq!(stats.backoff_until_ts, Some(t1.plus_ms(600_000).as_ms()));
    assert_eq!(stats.failure_ts, Some(t1.as_ms()));
    assert!(!stats.in_flight);
    // When the backoff ends the frozen transaction goes again and succeeds.
    let t2 = t1.plus_ms(600_000);
    let (_, sends) = step(&mut sender, t2, Input::Timeout);
    let (_, more) = step(
        &mut sender,
        t2,
        Input::TransactionDone { request: sends[0], result: TransactionResult::Ok { pdu_errors: BTreeMap::new() } },
    );
    step(
        &mut sender,
        t2,
        Input::TransactionDone { request: more[0], result: TransactionResult::Ok { pdu_errors: BTreeMap::new() } },
    );
    let stats = sender.stats_for(&name("host2")).unwrap();
    assert_eq!(stats.state, DestinationPhase::Idle);
    assert_eq!(stats.queued_pdus, 0);
    assert_eq!(stats.last_success_ts, Some(t2.as_ms()));
    assert_eq!(stats.last_successful_stream_ordering, Some(3));
    assert_eq!(stats.backoff_until_ts, None);
}
