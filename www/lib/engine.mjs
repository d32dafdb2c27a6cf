// The engine object that `runScenario` drives: a thin wrapper around the wasm core's
// `FederationSender`, so that the simulator talks to the core across the JavaScript boundary
// as JSON, exactly as a JavaScript homeserver would. Used by the Node runner
// (bin/fedsend-scenario.mjs) and its tests; the caller passes the `FederationSender` class of
// whichever wasm-bindgen build it loaded (nodejs or web). (The visualiser instead links the
// core into the world inside wasm, lib/live.mjs, for speed.)

/**
 * @param {typeof import('../pkg/fedsend_wasm.js').FederationSender} FederationSender
 * @returns {import('../pkg/fedsend_wasm.js').Engine & { free(): void }}
 */
export function senderEngine(FederationSender) {
  let sender;
  const started = () => {
    if (sender === undefined) throw new Error('engine used before start');
    return sender;
  };
  return {
    start(configJson, recoveredJson) {
      // A restart loses all memory: the old machine goes first, whatever the new one does.
      sender?.free();
      sender = undefined;
      sender = new FederationSender(configJson, recoveredJson);
    },
    handleInput(nowMs, inputJson) {
      started().handleInput(nowMs, inputJson);
    },
    pollOutput() {
      return started().pollOutput();
    },
    pollTimeout() {
      return started().pollTimeout();
    },
    /** Releases the wasm memory of the current machine. */
    free() {
      sender?.free();
      sender = undefined;
    },
  };
}
