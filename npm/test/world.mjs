// A fake homeserver and remote servers for the driven-API tests: events in memory, answers
// scripted per destination, every call recorded.

export const ORIGIN = 'a.test';

export class World {
  events = [];
  sent = []; // { destination, txnId, body, authorization, attempt }
  fetches = [];
  #scripts = new Map(); // destination → array of answers (functions or values); last repeats

  homeserver = {
    fetchEvents: ({ after, limit }) => {
      this.fetches.push({ after, limit });
      return this.events.filter((e) => e.stream_ordering > after).slice(0, limit);
    },
    loadCatchUp: ({ rows }) =>
      rows.map(({ room_id, stream_ordering }) => {
        const event = this.events.find((e) => e.room_id === room_id && e.stream_ordering === stream_ordering);
        return { room_id, stream_ordering, event_id: event.event_id, pdu: event.pdu, extremities: [] };
      }),
  };

  transport = {
    sendTransaction: (destination, txnId, body, authorization, extra) => {
      this.sent.push({ destination, txnId, body, authorization, attempt: extra.attempt, signal: extra.signal });
      const script = this.#scripts.get(destination) ?? [{ status: 200, body: { pdus: {} } }];
      const answer = script.length > 1 ? script.shift() : script[0];
      return typeof answer === 'function' ? answer({ destination, txnId, body, signal: extra.signal }) : answer;
    },
  };

  /** Answers for `destination`, in order; the last one repeats. */
  script(destination, ...answers) {
    this.#scripts.set(destination, answers);
  }

  /** A local message in `room` (shared with `hosts`); returns its stream ordering. */
  addEvent(room = '!room:a.test', hosts = [ORIGIN, 'b.test'], body = 'hi') {
    const stream_ordering = this.events.length + 1;
    const event_id = `$e${stream_ordering}`;
    this.events.push({
      event_id,
      room_id: room,
      stream_ordering,
      sender: `@alice:${ORIGIN}`,
      hosts,
      pdu: { event_id, room_id: room, sender: `@alice:${ORIGIN}`, type: 'm.room.message', content: { body } },
    });
    return stream_ordering;
  }

  sentTo(destination) {
    return this.sent.filter((s) => s.destination === destination);
  }
}
