//! The queue the database workers take work from: any free worker takes the oldest
//! ready job, and jobs that share a lane (one share's writes) run one at a time, in
//! the order they were queued.
//!
//! Pinning each lane to one worker (by hashing its key) would keep the order too, but
//! lanes would collide: 16 busy shares hashed onto 16 workers leave about 6 of them
//! idle while others queue two or three shares' transactions one after another.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Jobs waiting for a worker, and the lanes some worker is busy with.
pub(super) struct Lanes<J> {
    state: Mutex<State<J>>,
    /// Signalled when a job becomes ready or the queue closes.
    ready: Condvar,
}

struct State<J> {
    /// Jobs any worker may start now, oldest first, with their lane.
    ready: VecDeque<(Option<String>, J)>,
    /// Lanes with a job ready or running: the jobs queued behind it.
    behind: HashMap<String, VecDeque<J>>,
    closed: bool,
}

/// A job's lane, to hand to [`Lanes::done`] once the job has run.
pub(super) type Lane = Option<String>;

impl<J> Lanes<J> {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                ready: VecDeque::new(),
                behind: HashMap::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<J>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`, behind the earlier jobs of `lane` if it has one; gives it back
    /// once the queue is closed.
    pub(super) fn push(&self, lane: Option<&str>, job: J) -> Result<(), J> {
        let mut state = self.state();
        if state.closed {
            return Err(job);
        }
        match lane {
            Some(lane) => match state.behind.get_mut(lane) {
                Some(waiting) => waiting.push_back(job),
                None => {
                    state.behind.insert(lane.to_owned(), VecDeque::new());
                    state.ready.push_back((Some(lane.to_owned()), job));
                    self.ready.notify_one();
                }
            },
            None => {
                state.ready.push_back((None, job));
                self.ready.notify_one();
            }
        }
        Ok(())
    }

    /// The oldest ready job, waiting for one; `None` once the queue is closed and
    /// nothing is ready (a lane's later jobs become ready when its running job is
    /// [`done`](Self::done), and its worker comes back for them).
    pub(super) fn take(&self) -> Option<(J, Lane)> {
        let mut state = self.state();
        loop {
            if let Some((lane, job)) = state.ready.pop_front() {
                return Some((job, lane));
            }
            if state.closed {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Up to `max` more jobs from the front of the ready queue, as long as each `fits`;
    /// does not wait. Each must be [`done`](Self::done) like one from [`take`](Self::take).
    pub(super) fn take_more(&self, max: usize, fits: impl Fn(&J) -> bool) -> Vec<(J, Lane)> {
        let mut state = self.state();
        let mut taken = Vec::new();
        while taken.len() < max && state.ready.front().is_some_and(|(_, job)| fits(job)) {
            if let Some((lane, job)) = state.ready.pop_front() {
                taken.push((job, lane));
            }
        }
        taken
    }

    /// Marks a taken job as run: the next job of its lane becomes ready.
    pub(super) fn done(&self, lane: Lane) {
        let Some(lane) = lane else { return };
        let mut state = self.state();
        let next = state.behind.get_mut(&lane).and_then(VecDeque::pop_front);
        match next {
            Some(job) => {
                state.ready.push_back((Some(lane), job));
                self.ready.notify_one();
            }
            None => {
                state.behind.remove(&lane);
            }
        }
    }

    /// Takes no more jobs; those queued still run.
    pub(super) fn close(&self) {
        self.state().closed = true;
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_runs_one_job_at_a_time_in_queue_order() {
        let lanes = Lanes::new();
        for n in 0..3 {
            lanes.push(Some("a"), n).unwrap();
        }
        let (first, lane) = lanes.take().unwrap();
        assert_eq!(first, 0);
        lanes.push(None, 10).unwrap();
        // The lane's second job waits for the first to be done; other work does not.
        assert_eq!(lanes.take().unwrap().0, 10);
        lanes.done(lane);
        let (second, lane) = lanes.take().unwrap();
        assert_eq!(second, 1);
        lanes.done(lane);
        assert_eq!(lanes.take().unwrap().0, 2);
    }

    #[test]
    fn more_jobs_are_taken_from_the_front_while_they_fit_and_never_two_of_a_lane() {
        let lanes = Lanes::new();
        lanes.push(Some("a"), 1).unwrap();
        lanes.push(Some("b"), 2).unwrap();
        lanes.push(Some("a"), 3).unwrap();
        lanes.push(Some("c"), 4).unwrap();
        lanes.push(None, 5).unwrap();
        let first = lanes.take().unwrap();
        assert_eq!(first.0, 1);
        // "a"'s second job waits for the first; the odd job stops the run.
        let more: Vec<i32> = lanes
            .take_more(10, |job| job % 2 == 0)
            .into_iter()
            .map(|(job, _)| job)
            .collect();
        assert_eq!(more, vec![2, 4]);
        assert_eq!(lanes.take_more(10, |_| true).len(), 1, "the unordered job");
    }

    #[test]
    fn different_lanes_are_ready_at_once() {
        let lanes = Lanes::new();
        lanes.push(Some("a"), 1).unwrap();
        lanes.push(Some("b"), 2).unwrap();
        assert_eq!(lanes.take().unwrap().0, 1);
        assert_eq!(lanes.take().unwrap().0, 2);
    }

    #[test]
    fn after_close_queued_jobs_still_run_and_new_ones_are_refused() {
        let lanes = Lanes::new();
        lanes.push(Some("a"), 1).unwrap();
        lanes.push(Some("a"), 2).unwrap();
        lanes.close();
        assert_eq!(lanes.push(None, 3), Err(3));
        let (first, lane) = lanes.take().unwrap();
        assert_eq!(first, 1);
        lanes.done(lane);
        assert_eq!(lanes.take().unwrap().0, 2);
        assert!(lanes.take().is_none());
    }

    #[test]
    fn a_waiting_worker_wakes_for_new_work() {
        let lanes = std::sync::Arc::new(Lanes::new());
        let worker = {
            let lanes = std::sync::Arc::clone(&lanes);
            std::thread::spawn(move || lanes.take().map(|(job, _)| job))
        };
        lanes.push(Some("a"), 7).unwrap();
        assert_eq!(worker.join().unwrap(), Some(7));
    }
}
