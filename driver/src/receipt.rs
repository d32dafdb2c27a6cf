//! Acknowledgements of submissions: a [`Receipt`] completes when what the submission queued is
//! durable (to-device rows, device-list pokes), or at once for everything else.

use alloc::string::String;
use core::fmt;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use futures::channel::oneshot;

/// Why a submission was not (or is no longer) acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// The machine refused the input (malformed, or not allowed); nothing changed.
    Refused(String),
    /// Writing what the submission queued failed. The core retries the write, but the client
    /// should hear that its submission is not yet safe and may resubmit (to-device messages
    /// are deduplicated by message id, device-list updates by stream id).
    NotStored(String),
    /// The driver stopped before the submission's rows were durable.
    Stopped,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused(why) => f.write_str(why),
            Self::NotStored(why) => write!(f, "storing the submission failed: {why}"),
            Self::Stopped => f.write_str("the sender stopped before the submission was durable"),
        }
    }
}

/// Completes with `Ok` once the submission may be acknowledged.
#[derive(Debug)]
#[must_use = "a receipt says when the submission is durable"]
pub struct Receipt(State);

#[derive(Debug)]
enum State {
    Done(Option<Result<(), Rejected>>),
    Waiting(oneshot::Receiver<Result<(), Rejected>>),
}

impl Receipt {
    pub(crate) fn done(result: Result<(), Rejected>) -> Self {
        Self(State::Done(Some(result)))
    }

    pub(crate) fn waiting() -> (oneshot::Sender<Result<(), Rejected>>, Self) {
        let (sender, receiver) = oneshot::channel();
        (sender, Self(State::Waiting(receiver)))
    }

    /// Whether the answer is already known (nothing to wait for).
    pub fn is_settled(&self) -> bool {
        matches!(self.0, State::Done(_))
    }
}

impl Future for Receipt {
    type Output = Result<(), Rejected>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            State::Done(result) => Poll::Ready(result.take().unwrap_or(Err(Rejected::Stopped))),
            // A dropped sender means the driver went away without answering.
            State::Waiting(receiver) => {
                Pin::new(receiver).poll(cx).map(|answer| answer.unwrap_or(Err(Rejected::Stopped)))
            }
        }
    }
}
