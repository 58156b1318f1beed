//! One request of librdkafka's admin API sent without waiting, its answer landing on a
//! [`ReplyQueue`] of our own that its owner looks at when it chooses: the source's log-end ask
//! (ListOffsets) and the native fetch's leader ask (DescribeTopics). Drop an ask before the
//! client it was sent on: librdkafka's queues must be destroyed before their client.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;

use super::reply_queue::{ReplyQueue, text};

/// An ask in flight.
pub(crate) struct AdminAsk {
    queue: ReplyQueue,
    since: Instant,
}

impl AdminAsk {
    /// Sends an admin request of kind `op` on `client` (a consumer's `client().native_ptr()`):
    /// `request` is given the client, the request's options and the queue to answer on, and
    /// calls librdkafka's function for it (which copies what it is given). librdkafka answers
    /// with an error after `timeout`. `to` names the broker to ask (`None`: librdkafka's
    /// choice, the controller for most requests).
    pub(crate) fn send(
        client: *mut rd::rd_kafka_t,
        op: rd::rd_kafka_admin_op_t,
        timeout: Duration,
        to: Option<i32>,
        request: impl FnOnce(*mut rd::rd_kafka_t, *const rd::rd_kafka_AdminOptions_t, *mut rd::rd_kafka_queue_t),
    ) -> Result<Self, String> {
        let client = NonNull::new(client).ok_or("no client handle")?;
        let queue = ReplyQueue::new(client).ok_or("no queue for the answer")?;
        // SAFETY: a live client and queue; the options are ours, destroyed here once the
        // request has copied them
        unsafe {
            let options = rd::rd_kafka_AdminOptions_new(client.as_ptr(), op);
            if options.is_null() {
                return Err("no admin options for the request".into());
            }
            let mut errstr = [0 as std::ffi::c_char; 256];
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            let mut set = rd::rd_kafka_AdminOptions_set_request_timeout(options, ms, errstr.as_mut_ptr(), errstr.len());
            if let Some(broker) = to
                && set == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                set = rd::rd_kafka_AdminOptions_set_broker(options, broker, errstr.as_mut_ptr(), errstr.len());
            }
            if set != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                rd::rd_kafka_AdminOptions_destroy(options);
                return Err(text(errstr.as_ptr()));
            }
            request(client.as_ptr(), options, queue.as_ptr());
            rd::rd_kafka_AdminOptions_destroy(options);
        }
        Ok(AdminAsk { queue, since: Instant::now() })
    }

    /// The answer, if it has come (without waiting): `read` of the answer's event when it is of
    /// type `expected` (an `RD_KAFKA_EVENT_*_RESULT`) and carries no error (the event lives while
    /// `read` runs, and is destroyed after it); the error otherwise; an error too once the ask has
    /// had no answer for `give_up_after` (an answer landing later is dropped with the queue).
    pub(crate) fn answer<T>(
        &self,
        expected: i32,
        give_up_after: Duration,
        read: impl FnOnce(*mut rd::rd_kafka_event_t) -> T,
    ) -> Option<Result<T, String>> {
        let Some(answer) = self.queue.poll(Duration::ZERO) else {
            return (self.since.elapsed() >= give_up_after).then(|| Err(format!("no answer in {give_up_after:?}")));
        };
        Some(answer.check(expected).map(|()| read(answer.as_ptr())))
    }

    /// How long since the ask was sent.
    pub(crate) fn waited(&self) -> Duration {
        self.since.elapsed()
    }
}
