//! A socket's send queue: bounded, many senders (one per subject the socket reads), one
//! receiver (the socket's task), and no memory until a message is queued.
//!
//! tokio's `mpsc::channel` allocates its first block of 32 slots when it is created: with a
//! queued message of 64 bytes that is about 2 KiB for every socket, idle ones included, which
//! was a fifth of what an idle socket cost. Here the items live in a `VecDeque` that grows on
//! the first message and is given back when a burst has drained.
//!
//! The receiver's waker lives under the same lock as the items: a send that finds it takes it
//! and wakes the receiver after unlocking, and a receiver that finds the queue empty leaves its
//! waker before it unlocks, so a message is never missed, and a send costs one lock (a
//! `tokio::sync::Notify` beside the lock would take a second one whenever the receiver waits).
//! When the last sender is gone, `recv` returns `None` once the queue is empty; when the
//! receiver is gone, sends fail and what was queued is dropped at once (releasing its byte
//! accounting).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

/// A queue that held more than this many slots is given back when it drains.
const KEEP_SLOTS: usize = 64;

/// Why a message could not be queued; the message comes back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrySendError<T> {
    /// The queue holds its capacity.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    receiver: bool,
    /// The receiver, waiting for an item (or for the last sender to go).
    waiting: Option<Waker>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side; cloned for each subject a socket reads.
pub(crate) struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving side, the socket's task.
pub(crate) struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// A queue of at most `capacity` items (at least one).
pub(crate) fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver: true,
            waiting: None,
        }),
        capacity: capacity.max(1),
    });
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver { shared },
    )
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver is gone.
    pub(crate) fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.shared.lock();
        if !state.receiver {
            return Err(TrySendError::Closed(item));
        }
        if state.items.len() >= self.shared.capacity {
            return Err(TrySendError::Full(item));
        }
        state.items.push_back(item);
        let waiting = state.waiting.take();
        drop(state);
        if let Some(waker) = waiting {
            waker.wake();
        }
        Ok(())
    }
}

impl<T> Sender<T> {
    /// How many items are queued.
    pub(crate) fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// How many items the queue holds at most.
    pub(crate) fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Whether the receiver is gone (the socket ended).
    pub(crate) fn is_closed(&self) -> bool {
        !self.shared.lock().receiver
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("Sender")
            .field("queued", &state.items.len())
            .field("capacity", &self.shared.capacity)
            .finish()
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.senders -= 1;
        // The receiver may be waiting: it learns there is nothing more to come.
        let waiting = if state.senders == 0 {
            state.waiting.take()
        } else {
            None
        };
        drop(state);
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` when the queue is empty and every sender is gone.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| {
            let mut state = self.shared.lock();
            if let Some(item) = take(&mut state) {
                return Poll::Ready(Some(item));
            }
            if state.senders == 0 {
                return Poll::Ready(None);
            }
            match &mut state.waiting {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waiting => *waiting = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }

    /// The next item if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        take(&mut self.shared.lock())
    }
}

/// Pops the first item, giving a large queue's memory back once it is empty.
fn take<T>(state: &mut State<T>) -> Option<T> {
    let item = state.items.pop_front();
    if state.items.is_empty() && state.items.capacity() > KEEP_SLOTS {
        state.items = VecDeque::new();
    }
    item
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.receiver = false;
        state.waiting = None;
        // Dropped here, not when the last sender goes: queued messages hold budget bytes.
        let items = std::mem::take(&mut state.items);
        drop(state);
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn items_come_in_order_up_to_the_capacity() {
        let (tx, mut rx) = channel(3);
        for i in 0..3 {
            assert_eq!(tx.try_send(i), Ok(()));
        }
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(tx.try_send(4), Ok(()));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(4));
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_send_and_for_the_last_sender() {
        let (tx, mut rx) = channel(8);
        let other = tx.clone();
        let sent = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.try_send("a").expect("queued");
        });
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got, Ok(Some("a")));
        sent.await.expect("sender task");
        // One sender left: still open.
        assert!(tokio::time::timeout(Duration::from_millis(50), rx.recv())
            .await
            .is_err());
        drop(other);
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(end, Ok(None));
    }

    /// Records whether it was woken.
    struct Woken(std::sync::atomic::AtomicBool);

    impl futures::task::ArcWake for Woken {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Woken {
        fn take(&self) -> bool {
            self.0.swap(false, std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[test]
    fn a_waiting_receiver_is_woken_by_a_send_and_by_the_last_sender_going() {
        use std::future::Future;
        use std::task::Context;

        let (tx, mut rx) = channel(8);
        let other = tx.clone();
        let woken = Arc::new(Woken(false.into()));
        let waker = futures::task::waker(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        {
            let mut recv = std::pin::pin!(rx.recv());
            assert!(recv.as_mut().poll(&mut cx).is_pending());
            tx.try_send(1).expect("queued");
            assert!(woken.take(), "woken by the send");
            assert_eq!(recv.as_mut().poll(&mut cx), Poll::Ready(Some(1)));
        }
        let mut recv = std::pin::pin!(rx.recv());
        assert!(recv.as_mut().poll(&mut cx).is_pending());
        drop(tx);
        assert!(!woken.take(), "one sender is left");
        drop(other);
        assert!(woken.take(), "woken by the last sender going");
        assert_eq!(recv.as_mut().poll(&mut cx), Poll::Ready(None));
    }

    #[tokio::test]
    async fn without_a_receiver_sends_fail_and_queued_items_are_dropped() {
        let (tx, rx) = channel(8);
        let item = Arc::new(());
        tx.try_send(Arc::clone(&item)).expect("queued");
        assert_eq!(Arc::strong_count(&item), 2);
        drop(rx);
        assert_eq!(Arc::strong_count(&item), 1, "dropped with the receiver");
        assert!(matches!(tx.try_send(item), Err(TrySendError::Closed(_))));
    }

    #[test]
    fn an_idle_queue_holds_no_slots_and_a_drained_burst_gives_them_back() {
        let (tx, mut rx) = channel(1024);
        assert_eq!(rx.shared.lock().items.capacity(), 0);
        for i in 0..500 {
            tx.try_send(i).expect("queued");
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }
}
