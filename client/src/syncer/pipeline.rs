//! The batches a syncer has sent on its connection and not had answered yet, oldest first.
//!
//! Each batch after the first names the one sent before it (`Batch.after`), so the server
//! applies them in the order sent and refuses, with nothing applied, every batch after
//! one that failed. Answers are taken oldest first: an answer settles its batch in the
//! outbox in the order the batches were formed.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::ClientError;
use crate::outbox::OutboxBatch;
use crate::types::{Ack, Batch};
use crate::writer::WriterClient;

type Answer = Pin<Box<dyn Future<Output = Result<Ack, ClientError>>>>;

/// One batch on its way.
struct Call {
    batch: OutboxBatch,
    answer: Answer,
    /// When waiting for the answer stops counting as the server being slow.
    deadline: Instant,
}

/// What became of the oldest call.
pub(super) enum Answered {
    Ack(Ack),
    Failed(ClientError),
    /// No answer within the call timeout.
    TimedOut,
}

#[derive(Default)]
pub(super) struct Pipeline {
    calls: VecDeque<Call>,
}

impl Pipeline {
    pub(super) fn len(&self) -> usize {
        self.calls.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The ids of the batches on their way, oldest first.
    pub(super) fn batch_ids(&self) -> Vec<String> {
        self.calls
            .iter()
            .map(|call| call.batch.batch_id.clone())
            .collect()
    }

    /// Sends `batch` now, after those on their way; its answer is awaited within `timeout`.
    pub(super) fn send(&mut self, writer: &WriterClient, batch: OutboxBatch, timeout: Duration) {
        let mut wire = Batch::new(batch.batch_id.clone(), batch.ops.clone());
        // No `expectedCursor`: the outbox relies on per-op-id dedupe, not on fencing.
        wire.after = self.calls.back().map(|call| call.batch.batch_id.clone());
        let answer: Answer = match writer.send_append(&wire) {
            Ok(answer) => Box::pin(answer),
            Err(error) => Box::pin(std::future::ready(Err(error))),
        };
        self.calls.push_back(Call {
            batch,
            answer,
            deadline: Instant::now() + timeout,
        });
    }

    /// Waits for the oldest batch's answer and takes it off the pipeline. Pending forever
    /// when the pipeline is empty (the caller only asks when it is not).
    pub(super) async fn oldest_answer(&mut self) -> (OutboxBatch, Answered) {
        let Some(call) = self.calls.front_mut() else {
            return std::future::pending().await;
        };
        let answered = match tokio::time::timeout_at(call.deadline, &mut call.answer).await {
            Ok(Ok(ack)) => Answered::Ack(ack),
            Ok(Err(error)) => Answered::Failed(error),
            Err(_) => Answered::TimedOut,
        };
        let call = self.calls.pop_front().expect("the call answered is there");
        (call.batch, answered)
    }

    /// Forgets every batch on its way. After a failure the server refuses those sent
    /// after it (or, if the connection is going, applies them in order or not at all):
    /// the outbox sends them again, in order, and dedupe settles any that did apply.
    pub(super) fn clear(&mut self) {
        self.calls.clear();
    }
}
