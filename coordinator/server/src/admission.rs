//! Turns at the trusts: how many queries the coordinator sends out at once, and whose query goes
//! next when one finishes. Researchers take turns, one query each in the order they started
//! waiting, so a researcher with many queries waiting pushes another's back by at most one
//! query per researcher waiting, never by all of their own. A query that finds the queue full,
//! or waits longer than the coordinator allows, is told the federation is busy.
//!
//! Without this, every query went straight to every node, and a node running as many queries
//! as it allows refused the rest: under load most researchers got "only 1 of 3 trusts
//! answered" instead of an answer or a clear "busy", and one researcher's flood of queries took
//! every node's slots from everyone else.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::CoordinatorError;
use crate::limits::Limits;

/// The coordinator's queue of queries waiting for a turn.
pub(crate) struct Admission {
    queue: Arc<Mutex<Queue>>,
    max_running: usize,
    max_queued: usize,
    max_wait: Duration,
}

#[derive(Default)]
struct Queue {
    /// Queries holding a turn.
    running: usize,
    /// Queries waiting for one.
    queued: usize,
    next_id: u64,
    /// Researchers with a query waiting, in the order their next one goes.
    turns: VecDeque<String>,
    /// Each waiting researcher's queries, oldest first.
    lines: HashMap<String, VecDeque<(u64, oneshot::Sender<()>)>>,
}

impl Queue {
    /// Hands a finished query's turn to the next researcher's oldest query, or gives it up.
    fn pass_on(&mut self) {
        while let Some(researcher) = self.turns.pop_front() {
            let Some(line) = self.lines.get_mut(&researcher) else {
                continue;
            };
            let Some((_, waiter)) = line.pop_front() else {
                self.lines.remove(&researcher);
                continue;
            };
            self.queued = self.queued.saturating_sub(1);
            if line.is_empty() {
                self.lines.remove(&researcher);
            } else {
                self.turns.push_back(researcher);
            }
            // A waiter removes itself (under this lock) before its receiver goes, so this
            // only fails if it is already gone; then the turn goes to the next one.
            if waiter.send(()).is_ok() {
                return;
            }
        }
        self.running = self.running.saturating_sub(1);
    }

    /// Takes a waiting query out of its line; whether it was still there.
    fn withdraw(&mut self, researcher: &str, id: u64) -> bool {
        let Some(line) = self.lines.get_mut(researcher) else {
            return false;
        };
        let Some(at) = line.iter().position(|(i, _)| *i == id) else {
            return false;
        };
        line.remove(at);
        self.queued = self.queued.saturating_sub(1);
        if line.is_empty() {
            self.lines.remove(researcher);
            self.turns.retain(|r| r != researcher);
        }
        true
    }
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Poisoned or not, the counts must stay usable, or every researcher stays busy forever.
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

/// A query's turn at the trusts; handed on to the next waiting query when dropped.
pub(crate) struct Turn {
    queue: Arc<Mutex<Queue>>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        lock(&self.queue).pass_on();
    }
}

/// A query waiting for its turn; leaves the queue if it stops waiting (timed out, or its
/// researcher hung up), and hands on a turn it was given but did not take.
struct Waiting<'a> {
    queue: &'a Arc<Mutex<Queue>>,
    researcher: &'a str,
    id: u64,
    turn: oneshot::Receiver<()>,
    taken: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        let mut queue = lock(self.queue);
        if !queue.withdraw(self.researcher, self.id) && self.turn.try_recv().is_ok() {
            // Given a turn just as it stopped waiting.
            queue.pass_on();
        }
    }
}

impl Admission {
    /// A queue with the `[limits]` of `limits`.
    pub(crate) fn new(limits: &Limits) -> Self {
        Admission {
            queue: Arc::new(Mutex::new(Queue::default())),
            max_running: limits.max_running_queries,
            max_queued: limits.max_queued_queries,
            max_wait: Duration::from_millis(limits.max_queue_wait_ms),
        }
    }

    fn crowded(&self) -> CoordinatorError {
        CoordinatorError::Crowded {
            running: self.max_running,
            queued: self.max_queued,
        }
    }

    /// Waits for a turn for one of `researcher`'s queries, or says the federation is busy.
    pub(crate) async fn turn(&self, researcher: &str) -> Result<Turn, CoordinatorError> {
        let (id, turn) = {
            let mut queue = lock(&self.queue);
            // Nobody jumps the queue: a free turn goes straight only when no one is waiting.
            if queue.running < self.max_running && queue.queued == 0 {
                queue.running += 1;
                return Ok(Turn {
                    queue: Arc::clone(&self.queue),
                });
            }
            if queue.queued >= self.max_queued {
                return Err(self.crowded());
            }
            let id = queue.next_id;
            queue.next_id = queue.next_id.wrapping_add(1);
            let (tx, rx) = oneshot::channel();
            let line = queue.lines.entry(researcher.to_string()).or_default();
            let first = line.is_empty();
            line.push_back((id, tx));
            if first {
                queue.turns.push_back(researcher.to_string());
            }
            queue.queued += 1;
            (id, rx)
        };
        let mut waiting = Waiting {
            queue: &self.queue,
            researcher,
            id,
            turn,
            taken: false,
        };
        match tokio::time::timeout(self.max_wait, &mut waiting.turn).await {
            Ok(Ok(())) => {
                waiting.taken = true;
                Ok(Turn {
                    queue: Arc::clone(&self.queue),
                })
            }
            // Timed out (or the queue went away): `waiting` leaves the queue as it drops.
            _ => Err(self.crowded()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(running: usize, queued: usize, wait_ms: u64) -> Admission {
        Admission::new(&Limits {
            max_running_queries: running,
            max_queued_queries: queued,
            max_queue_wait_ms: wait_ms,
            ..Limits::default()
        })
    }

    #[tokio::test]
    async fn researchers_take_turns_so_a_flood_pushes_another_back_by_one_query_at_most() {
        let admission = Arc::new(admission(1, 100, 10_000));
        let held = admission.turn("flooder").await.expect("a free turn");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let spawn = |who: &'static str, tasks: &mut Vec<tokio::task::JoinHandle<()>>| {
            let (admission, order) = (Arc::clone(&admission), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _turn = admission.turn(who).await.expect("a turn");
                order.lock().expect("order").push(who);
            }));
        };
        for _ in 0..5 {
            spawn("flooder", &mut tasks);
            tokio::task::yield_now().await;
        }
        spawn("other", &mut tasks);
        // Let every task join the queue before the held turn is handed on.
        while lock(&admission.queue).queued < 6 {
            tokio::task::yield_now().await;
        }
        drop(held);
        for task in tasks {
            task.await.expect("task");
        }
        let order = order.lock().expect("order").clone();
        let other = order.iter().position(|w| *w == "other").expect("other ran");
        assert!(other <= 1, "{order:?}");
        let queue = lock(&admission.queue);
        assert_eq!((queue.running, queue.queued), (0, 0));
    }

    #[tokio::test]
    async fn a_full_queue_or_a_long_wait_is_busy_and_gives_its_place_back() {
        let admission = admission(1, 1, 50);
        let held = admission.turn("a").await.expect("a free turn");
        // One may wait; it times out, and leaves the queue.
        let err = admission.turn("b").await.err().expect("waited too long");
        assert!(matches!(err, CoordinatorError::Crowded { .. }), "{err}");
        assert_eq!(lock(&admission.queue).queued, 0);
        // A second waiter, beside a first, finds the queue full at once.
        let first = admission.turn("b");
        let second = async {
            tokio::task::yield_now().await;
            admission.turn("c").await
        };
        let (first, second) = tokio::join!(first, second);
        assert!(first.is_err() && second.is_err());
        assert!(
            second
                .err()
                .is_some_and(|e| e.to_string().contains("try again"))
        );
        drop(held);
        let queue = lock(&admission.queue);
        assert_eq!((queue.running, queue.queued), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_hangs_up_leaves_the_queue() {
        let admission = admission(1, 4, 10_000);
        let held = admission.turn("a").await.expect("a free turn");
        let gone = tokio::time::timeout(Duration::from_millis(20), admission.turn("b")).await;
        assert!(gone.is_err(), "still waiting when it hung up");
        assert_eq!(lock(&admission.queue).queued, 0);
        drop(held);
        let _again = admission.turn("c").await.expect("the turn is free again");
        assert_eq!(lock(&admission.queue).running, 1);
    }
}
