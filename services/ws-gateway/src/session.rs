//! An accepted socket's place in the gateway: its fan-out subscriptions, what the leader knows
//! of it, its queue and its kick, and the connection metrics. All of it is released when the
//! [`Membership`] drops, so a handshake whose upgrade never completes leaves no trace.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::hub::{resume_key, Kick, Queued, SocketBytes, Subscriber};
use crate::presence::Registration;
use crate::protocol::{Admission, Protocol, Refusal};
use crate::queue;
use crate::resume::{self, Hold, Resume, Resuming, Wrap};
use crate::uplink::Pending;
use crate::Gateway;

/// Close code of a resuming socket whose history tail did not start in time (RFC 6455 1013,
/// try again later): it comes back with its position.
const CLOSE_TRY_AGAIN: u16 = 1013;

/// A socket's registrations, released on drop.
pub(crate) struct Membership {
    pub(crate) gw: Arc<Gateway>,
    id: u64,
    /// The hub's entries the socket reads (a resuming socket's: [`resume_key`]s).
    subjects: Vec<String>,
    /// How a resuming socket's messages are framed.
    resume: Option<Wrap>,
    registrations: Vec<Registration>,
    gaps: bool,
    label: &'static str,
    /// For protocols that subscribe while the socket runs (`/live`): how to reach the socket.
    dynamic: Option<Subscriber>,
    /// A new expiry asked for by [`crate::protocol::Action::Expire`], for the socket loop.
    pub(crate) expiry: Option<Option<u64>>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        for subject in &self.subjects {
            self.gw.hub.leave(subject, self.id);
        }
        for r in self.registrations.drain(..) {
            self.gw.presence.remove(r);
        }
        if self.gaps {
            self.gw.hub.unwatch_gaps(self.id);
        }
        self.gw
            .metrics
            .connections_open
            .get_or_create(&[("protocol", self.label)])
            .dec();
    }
}

impl Membership {
    /// Registers `what` with the leader after the handshake's checks (a subscriber, once its
    /// topic was found); released with the rest.
    pub(crate) async fn register(&mut self, what: Registration) {
        self.registrations.push(what.clone());
        self.gw.presence.add(what).await;
    }

    /// Joins `subject` while the socket runs (a socket admitted with `dynamic`) and registers
    /// `what`; resolves once the subscription is live and the leader knows. False when the
    /// socket cannot subscribe at runtime.
    pub(crate) async fn join(&mut self, subject: &str, what: Option<Registration>) -> bool {
        if self.resume.is_some() {
            return self.join_from(subject, what, Resume::Now).await;
        }
        let Some(sub) = &self.dynamic else {
            return false;
        };
        if !self.subjects.iter().any(|s| s == subject) {
            self.subjects.push(subject.to_owned());
            self.gw.hub.join(subject, self.id, sub.clone()).await;
            if let Some(what) = what {
                self.register(what).await;
            }
        }
        true
    }

    /// Joins `subject` through the history from `from` while the socket runs (a socket admitted
    /// with `dynamic` and `resume`) and registers `what`; what was kept after `from` is queued
    /// by a replay task before the subject's live messages. False when the socket cannot.
    pub(crate) async fn join_from(
        &mut self,
        subject: &str,
        what: Option<Registration>,
        from: Resume,
    ) -> bool {
        let (Some(sub), Some(wrap)) = (&self.dynamic, self.resume) else {
            return false;
        };
        let key = resume_key(subject, wrap);
        if self.subjects.contains(&key) {
            return true;
        }
        let hold = self.gw.join_held(subject, wrap, self.id, sub).await;
        self.subjects.push(key);
        let resuming = Resuming {
            from,
            wrap,
            holds: vec![(subject.to_owned(), hold)],
        };
        self.gw.replay(resuming, sub.clone());
        if let Some(what) = what {
            self.register(what).await;
        }
        true
    }

    /// Leaves `subject`, if the socket reads it, and releases `what`.
    pub(crate) fn leave(&mut self, subject: &str, what: Option<Registration>) {
        let key = match self.resume {
            Some(wrap) => resume_key(subject, wrap),
            None => subject.to_owned(),
        };
        if let Some(i) = self.subjects.iter().position(|s| *s == key) {
            self.subjects.swap_remove(i);
            self.gw.hub.leave(&key, self.id);
            if let Some(what) = what {
                if let Some(i) = self.registrations.iter().position(|r| *r == what) {
                    self.registrations.swap_remove(i);
                    self.gw.presence.remove(what);
                }
            }
        }
    }
}

/// What the socket task runs.
pub(crate) struct Session {
    pub(crate) protocol: Box<dyn Protocol>,
    pub(crate) rx: queue::Receiver<Queued>,
    pub(crate) kick: Kick,
    pub(crate) expires_at: Option<u64>,
    pub(crate) opening: Option<Pending>,
}

/// An accepted handshake, before its upgrade completes.
pub(crate) struct Accepted {
    pub(crate) membership: Membership,
    pub(crate) session: Session,
}

impl Gateway {
    /// Registers an authorised socket: joins its subjects and waits until their subscriptions
    /// are live, then registers it with the leader (a direct channel: until it is LISTENed),
    /// then runs the protocol's check after joining ([`Admission::after_join`]); its refusal
    /// releases the socket.
    pub(crate) async fn accept(
        self: &Arc<Self>,
        mut admission: Admission,
    ) -> Result<Accepted, Refusal> {
        let after_join = admission.after_join.take();
        let mut accepted = self.join(admission).await;
        if let Some(check) = after_join {
            if let Some(registration) = check.await? {
                accepted.membership.register(registration).await;
            }
        }
        Ok(accepted)
    }

    /// Joins socket `id` to the history's tail of `subject` with a new hold; a socket whose
    /// tail does not start in time is closed (1013) rather than miss what comes meanwhile.
    async fn join_held(
        self: &Arc<Self>,
        subject: &str,
        wrap: Wrap,
        id: u64,
        sub: &Subscriber,
    ) -> Arc<Hold> {
        let hold = Hold::new(self.config.send_queue);
        let held = Subscriber {
            hold: Some(Arc::clone(&hold)),
            ..sub.clone()
        };
        if !self.hub.join_resume(subject, wrap, id, held).await {
            sub.kick
                .close(CLOSE_TRY_AGAIN, "history not ready: try again");
        }
        hold
    }

    /// Runs `resuming`'s replay for `sub` as a task of its own.
    fn replay(self: &Arc<Self>, resuming: Resuming, sub: Subscriber) {
        let gw = Arc::clone(self);
        self.shutdown
            .spawn(async move { resume::replay(gw, resuming, sub).await });
    }

    async fn join(self: &Arc<Self>, mut admission: Admission) -> Accepted {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = queue::channel(admission.send_queue.unwrap_or(self.config.send_queue));
        let kick = Kick::new(&self.shutdown.token);
        let label = admission.label;
        self.metrics
            .connections_open
            .get_or_create(&[("protocol", label)])
            .inc();
        self.metrics
            .connections_total
            .get_or_create(&[("protocol", label)])
            .inc();
        let resume = admission.resume.take();
        let mut membership = Membership {
            gw: Arc::clone(self),
            id,
            subjects: Vec::new(),
            resume: resume.as_ref().map(|(_, wrap)| *wrap),
            registrations: admission.registrations.clone(),
            gaps: admission.gaps,
            label,
            dynamic: None,
            expiry: None,
        };
        let subscriber = Subscriber {
            tx,
            kick: kick.clone(),
            bytes: SocketBytes::new(&self.hub.budget),
            hold: None,
        };
        if membership.gaps {
            self.hub.watch_gaps(id, subscriber.clone());
        }
        match resume {
            None => {
                for subject in admission.subjects {
                    self.hub.join(&subject, id, subscriber.clone()).await;
                    membership.subjects.push(subject);
                }
            }
            Some((from, wrap)) => {
                let mut holds = Vec::new();
                for subject in admission.subjects {
                    let hold = self.join_held(&subject, wrap, id, &subscriber).await;
                    membership.subjects.push(resume_key(&subject, wrap));
                    holds.push((subject, hold));
                }
                // A `/live` socket joins its topics later, each with its own replay.
                if !holds.is_empty() {
                    self.replay(Resuming { from, wrap, holds }, subscriber.clone());
                }
            }
        }
        if admission.dynamic {
            membership.dynamic = Some(subscriber);
        } else {
            drop(subscriber);
        }
        for r in admission.registrations {
            // A publisher's topic is already granted: only the others need the leader now.
            if !matches!(r, Registration::Published(_)) {
                self.presence.add(r).await;
            }
        }
        Accepted {
            membership,
            session: Session {
                protocol: admission.protocol,
                rx,
                kick,
                expires_at: admission.expires_at,
                opening: admission.opening,
            },
        }
    }
}
