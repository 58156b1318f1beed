//! A librdkafka queue of our own, where the answer to one asynchronous request lands (the
//! source's offset commit and log-end ask, the native fetch's leader ask): its owner looks at it
//! when it chooses, waiting as long as it chooses, and destroys it once answered or given up on
//! (an answer landing later finds the queue disabled and is dropped). Every such queue must go
//! before its client: its owner is declared before the consumer in the source's loop. An answer
//! taken is an [`Answer`], destroyed when dropped.

use std::ffi::CStr;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;

pub(crate) struct ReplyQueue(NonNull<rd::rd_kafka_queue_t>);

// SAFETY: librdkafka's queues are thread-safe; the handle is used by the consumer thread (and
// the rebalance callbacks on it) and destroyed before the consumer (see the module's doc).
unsafe impl Send for ReplyQueue {}

impl ReplyQueue {
    /// A new queue on `client`; `None` if librdkafka made none.
    pub(crate) fn new(client: NonNull<rd::rd_kafka_t>) -> Option<Self> {
        // SAFETY: a live client; the queue is destroyed by the drop
        NonNull::new(unsafe { rd::rd_kafka_queue_new(client.as_ptr()) }).map(ReplyQueue)
    }

    /// The handle, for the request to answer on (librdkafka keeps its own reference to the
    /// queue until it has answered).
    pub(crate) fn as_ptr(&self) -> *mut rd::rd_kafka_queue_t {
        self.0.as_ptr()
    }

    /// The answer, if it comes within `wait` (zero: only one already there).
    pub(crate) fn poll(&self, wait: Duration) -> Option<Answer> {
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: a live queue; the event taken is ours, destroyed by `Answer`'s drop
        NonNull::new(unsafe { rd::rd_kafka_queue_poll(self.0.as_ptr(), ms) }).map(Answer)
    }
}

/// An answer's event, destroyed when dropped.
pub(crate) struct Answer(NonNull<rd::rd_kafka_event_t>);

impl Answer {
    /// The event, for librdkafka's accessors (what they hand out lives as long as the answer).
    pub(crate) fn as_ptr(&self) -> *mut rd::rd_kafka_event_t {
        self.0.as_ptr()
    }

    /// Whether the answer is of type `expected` (an `RD_KAFKA_EVENT_*`) and carries no error
    /// (the request's); the error otherwise.
    pub(crate) fn check(&self, expected: i32) -> Result<(), String> {
        // SAFETY: a live event of ours; its error string lives as long as it and is copied
        unsafe {
            let kind = rd::rd_kafka_event_type(self.as_ptr());
            if kind != expected {
                Err(format!("an unexpected answer (event type {kind})"))
            } else if rd::rd_kafka_event_error(self.as_ptr()) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                Err(text(rd::rd_kafka_event_error_string(self.as_ptr())))
            } else {
                Ok(())
            }
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        // SAFETY: our event, destroyed once
        unsafe { rd::rd_kafka_event_destroy(self.0.as_ptr()) };
    }
}

/// A NUL-terminated string of librdkafka's, copied (empty for a null pointer).
///
/// # Safety
/// `p` is null or a NUL-terminated string that lives through the call.
pub(crate) unsafe fn text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: see the function's
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Drop for ReplyQueue {
    fn drop(&mut self) {
        // SAFETY: our handle, destroyed once, while the client lives
        unsafe { rd::rd_kafka_queue_destroy(self.0.as_ptr()) };
    }
}
