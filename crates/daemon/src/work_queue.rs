//! Work for background threads, each item once: an item whose key is queued, or still being
//! worked on, is not queued again.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Condvar, Mutex};

pub(crate) struct WorkQueue<K, T> {
    state: Mutex<Pending<K, T>>,
    wake: Condvar,
    /// Items waiting at most; beyond it new ones are dropped.
    max_queued: usize,
}

struct Pending<K, T> {
    items: VecDeque<(K, T)>,
    /// The keys queued or being worked on.
    keys: HashSet<K>,
}

impl<K: Eq + Hash + Clone, T> WorkQueue<K, T> {
    pub(crate) fn new(max_queued: usize) -> Self {
        WorkQueue { state: Mutex::new(Pending { items: VecDeque::new(), keys: HashSet::new() }), wake: Condvar::new(), max_queued }
    }

    /// Queues `item` unless its key is queued or worked on already, or the queue is full.
    pub(crate) fn push(&self, key: K, item: T) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.items.len() < self.max_queued && state.keys.insert(key.clone()) {
            state.items.push_back((key, item));
            self.wake.notify_one();
        }
    }

    /// The next item, waiting for one; call [`WorkQueue::done`] with its key when done.
    pub(crate) fn pop(&self) -> (K, T) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(next) = state.items.pop_front() {
                return next;
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The item of `key` is done: it may be queued again.
    pub(crate) fn done(&self, key: &K) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).keys.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_queued_once_until_done_and_a_full_queue_drops() {
        let queue = WorkQueue::new(2);
        queue.push(1, "a");
        queue.push(1, "again");
        queue.push(2, "b");
        queue.push(3, "over the limit");
        assert_eq!(queue.pop(), (1, "a"));
        queue.push(1, "while worked on");
        queue.done(&1);
        queue.push(1, "after");
        assert_eq!(queue.pop(), (2, "b"));
        assert_eq!(queue.pop(), (1, "after"));
    }
}
