//! Peers' visible histories, shared.
//!
//! Every peer of a session folds the same log in the same order, and which envelopes
//! belong in a model's context at all (tasks, messages, proposals, votes, reveals,
//! verdicts) does not depend on the peer. So the peers of one process keep one
//! [`History`] of those envelopes, appended once, and each peer's [`Transcript`] is
//! that history seen through its visibility: a list of runs of consecutive history
//! items. While everything is a broadcast, a transcript is one run: a few bytes per
//! peer, whatever the length of the session.
//!
//! A transcript is a snapshot: a model call holds one (`Arc<Transcript>`) while its
//! peer folds new entries in. Items are never moved or changed once appended, so a
//! snapshot's items stay valid and the history grows without copying.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::envelope::{Body, ENVELOPE_VERSION, Envelope, EnvelopeId, Kind, PeerId, Recipient, SessionId};
use crate::model::{ChatMessage, envelope_tokens, message_of};

/// One history item: an envelope and the running token total through it.
#[derive(Debug)]
struct Item {
    env: Arc<Envelope>,
    /// Estimated tokens of every item up to and including this one.
    upto: u64,
    /// Where the run of broadcast items (to everyone) that ends with this one begins:
    /// one past this item when it is not a broadcast. A transcript catching up over
    /// broadcasts only sees them all without looking at each one.
    since: usize,
}

/// The in-context envelopes of one session, in log order, appended once and shared by
/// the transcripts of every peer that folds the log in this process.
#[derive(Default)]
pub struct History {
    items: boxcar::Vec<Item>,
    /// Serializes appends, so that item `i` is written by whichever peer gets there
    /// first and every other peer finds it in place.
    append: Mutex<()>,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History").field("items", &self.items.count()).finish()
    }
}

impl History {
    pub fn new() -> Arc<Self> {
        Arc::new(History::default())
    }

    /// Items appended so far.
    pub fn len(&self) -> usize {
        self.items.count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, i: usize) -> Option<&Item> {
        self.items.get(i)
    }

    fn upto(&self, i: usize) -> u64 {
        self.get(i).map_or(0, |it| it.upto)
    }

    /// Make `env` item `at`: append it when the history ends at `at`, or confirm that
    /// item `at` is already this envelope. `false` when neither holds (the caller's
    /// sequence of envelopes is not this history's).
    fn place(&self, at: usize, env: &Arc<Envelope>) -> bool {
        let same = |it: &Item| Arc::ptr_eq(&it.env, env) || (it.env.id == env.id && it.env.session == env.session);
        if let Some(it) = self.get(at) {
            return same(it);
        }
        let _one = self.append.lock().expect("history lock");
        if let Some(it) = self.get(at) {
            return same(it);
        }
        if self.items.count() != at {
            return false;
        }
        let before = if at == 0 { 0 } else { self.upto(at - 1) };
        let upto = before + u64::from(envelope_tokens(env));
        let since = match env.to {
            Recipient::All if at == 0 => 0,
            Recipient::All => self.get(at - 1).map_or(at, |it| it.since),
            _ => at + 1,
        };
        self.items.push(Item { env: env.clone(), upto, since });
        true
    }
}

/// A run of consecutive history items in a transcript: transcript positions
/// `start..start + len` are history items `at..at + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    start: usize,
    at: usize,
    len: usize,
}

/// A peer's visible history: envelopes shared with the log and with other peers'
/// transcripts, plus running token totals so that any window's token count is cheap.
/// Shared between a peer and its in-flight model call (`Arc`).
///
/// Chat roles are derived when the messages are read, relative to the calling peer:
/// its own envelopes are `assistant`, everyone else's `user` (with the sender's name),
/// and the task has no name.
#[derive(Clone)]
pub struct Transcript {
    history: Arc<History>,
    /// History items this transcript has accounted for (seen, visible or not).
    cursor: usize,
    runs: Vec<Run>,
    len: usize,
}

impl Default for Transcript {
    /// A transcript over a history of its own.
    fn default() -> Self {
        Transcript::over(History::new())
    }
}

impl fmt::Debug for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transcript").field("len", &self.len).field("runs", &self.runs.len()).finish()
    }
}

impl Transcript {
    /// An empty transcript over a history that other transcripts may share. Every
    /// transcript over one history must be fed the same in-context envelopes in the
    /// same order (the peers of one session do: they fold one log); one that is not
    /// goes on over a private copy of what it holds.
    pub fn over(history: Arc<History>) -> Self {
        Transcript { history, cursor: 0, runs: Vec::new(), len: 0 }
    }

    /// The next in-context envelope of the log: add it, or only account for it when
    /// this transcript's peer cannot see it.
    pub fn fold(&mut self, env: &Arc<Envelope>, visible: bool) {
        if !self.history.place(self.cursor, env) {
            self.diverge();
            let placed = self.history.place(self.cursor, env);
            debug_assert!(placed, "a private history takes the next envelope");
        }
        self.account(1, visible);
    }

    /// The next `n` history items are accounted for; they are added when `visible`.
    fn account(&mut self, n: usize, visible: bool) {
        let at = self.cursor;
        self.cursor += n;
        if !visible || n == 0 {
            return;
        }
        match self.runs.last_mut() {
            Some(r) if r.at + r.len == at => r.len += n,
            _ => self.runs.push(Run { start: self.len, at, len: n }),
        }
        self.len += n;
    }

    /// Account for every history item appended after this transcript's last, adding
    /// those `visible` says its peer sees: how a peer that does not fold every entry
    /// itself catches up with a history others append to. Broadcasts are visible to
    /// everyone, so a stretch of them is added at once, without a look at each.
    pub fn catch_up(&mut self, visible: impl Fn(&Envelope) -> bool) {
        let end = self.history.len();
        if self.cursor >= end {
            return;
        }
        let broadcasts = self.history.get(end - 1).is_some_and(|it| it.since <= self.cursor);
        if broadcasts {
            self.account(end - self.cursor, true);
            return;
        }
        while self.cursor < end {
            let Some(it) = self.history.get(self.cursor) else { break };
            let seen = visible(&it.env);
            self.account(1, seen);
        }
    }

    /// Items in the history this transcript is over.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// History items accounted for so far.
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Add an envelope that this transcript's peer sees.
    pub fn push_envelope(&mut self, env: Arc<Envelope>) {
        self.fold(&env, true);
    }

    /// Add a message that is not on the log (a view assembled for one call). Its role
    /// is derived on reading like any other: `assistant` when `name` is the caller.
    pub fn push(&mut self, m: ChatMessage) {
        self.push_envelope(Arc::new(off_log_envelope(m)));
    }

    /// Go on over a private history holding this transcript's visible items (another
    /// transcript over the shared one was fed something else).
    fn diverge(&mut self) {
        let own = History::new();
        let mut mine = Transcript::over(own);
        for i in 0..self.len {
            if let Some(e) = self.get(i) {
                mine.fold(&e.clone(), true);
            }
        }
        *self = mine;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The run holding transcript position `i`.
    fn run_of(&self, i: usize) -> Option<&Run> {
        if i >= self.len {
            return None;
        }
        let k = self.runs.partition_point(|r| r.start + r.len <= i);
        self.runs.get(k)
    }

    /// The history item at transcript position `i`.
    fn item(&self, i: usize) -> Option<&Item> {
        let r = self.run_of(i)?;
        self.history.get(r.at + (i - r.start))
    }

    /// The `i`th envelope.
    pub fn get(&self, i: usize) -> Option<&Arc<Envelope>> {
        self.item(i).map(|it| &it.env)
    }

    /// The envelopes at positions `range`, in order.
    pub fn iter(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &Arc<Envelope>> + '_ {
        let end = range.end.min(self.len);
        let first = self.runs.partition_point(|r| r.start + r.len <= range.start);
        // Run by run: no search per message.
        self.runs[first.min(self.runs.len())..].iter().take_while(move |r| r.start < end).flat_map(move |r| {
            let from = r.at + range.start.saturating_sub(r.start);
            let to = r.at + (end.min(r.start + r.len) - r.start);
            (from..to).filter_map(move |h| self.history.get(h).map(|it| &it.env))
        })
    }

    /// The `i`th message as `viewer` sees it.
    pub fn message(&self, i: usize, viewer: &PeerId) -> Option<ChatMessage> {
        self.get(i).map(|e| message_of(e, viewer))
    }

    /// The first position in `from..len` whose envelope fails `pred`, for a `pred` that
    /// holds for a prefix of the positions and then no more (a binary search).
    pub fn partition_point(&self, from: usize, pred: impl Fn(&Envelope) -> bool) -> usize {
        let (mut lo, mut hi) = (from.min(self.len), self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.get(mid).is_some_and(|e| pred(e)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Estimated tokens of the messages at positions `range`: O(runs it spans).
    pub fn tokens(&self, range: std::ops::Range<usize>) -> u64 {
        let end = range.end.min(self.len);
        let mut i = range.start;
        let mut total = 0;
        while i < end {
            let Some(r) = self.run_of(i).copied() else { break };
            let stop = end.min(r.start + r.len);
            let (a, b) = (r.at + (i - r.start), r.at + (stop - r.start));
            let before = if a == 0 { 0 } else { self.history.upto(a - 1) };
            total += self.history.upto(b - 1) - before;
            i = stop;
        }
        total
    }
}

/// A message that is not on any log, as an envelope (for a view assembled for one call):
/// no id to derive, no clock to read.
fn off_log_envelope(m: ChatMessage) -> Envelope {
    let (from, kind) = match &m.name {
        Some(n) => (n.clone(), Kind::Message),
        None => (PeerId::from(crate::session::USER), Kind::Task),
    };
    Envelope {
        v: ENVELOPE_VERSION,
        id: EnvelopeId::from(""),
        session: SessionId::from(""),
        from,
        to: Recipient::All,
        kind,
        step: Arc::from(""),
        body: Body::text(m.content),
        parents: Vec::new(),
        round: 0,
        lamport: 0,
        usage: None,
        time_ms: 0,
        trace: None,
        sig: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Role, estimate_tokens};

    fn env(n: usize, text: &str) -> Arc<Envelope> {
        Arc::new(Envelope::new(
            &SessionId::from("s"),
            &PeerId::from(format!("p{}", n % 3)),
            format!("turn/{n}"),
            Kind::Message,
            Recipient::All,
            Body::text(text),
        ))
    }

    fn texts(t: &Transcript) -> Vec<String> {
        t.iter(0..t.len()).map(|e| e.body.text.to_string()).collect()
    }

    #[test]
    fn tool_calls_count_their_arguments_and_failed_results_say_so() {
        use crate::tool::{Outcome, ToolCallBody, ToolResultBody};
        let me = PeerId::from("qa");
        let mk = |step: &str, kind, text: &str, json: serde_json::Value| {
            let body = Body::text(text).with_json(json);
            Arc::new(Envelope::new(&SessionId::from("s"), &me, step, kind, Recipient::All, body))
        };
        let args = format!("{{\"path\": \"{}\"}}", "x".repeat(400));
        let call = ToolCallBody {
            tool: "read_file".into(),
            call_id: "c1".into(),
            arguments: args.clone(),
            said: String::new(),
        };
        let result = ToolResultBody {
            tool: "read_file".into(),
            call_id: "c1".into(),
            outcome: Outcome::Error,
            output: "no such file".into(),
            exit_status: None,
            signal: None,
            duration_ms: 1,
            truncated: false,
        };
        let mut t = Transcript::default();
        t.push_envelope(mk("t/1/call/0", Kind::ToolCall, "calls read_file", serde_json::to_value(call).unwrap()));
        t.push_envelope(mk("t/1/result/0", Kind::ToolResult, "no such file", serde_json::to_value(result).unwrap()));
        let (c, r) = (t.message(0, &me).unwrap(), t.message(1, &me).unwrap());
        assert_eq!((c.role, c.tool_calls.len(), c.tool_calls[0].arguments.as_str()), (Role::Assistant, 1, &*args));
        assert!(t.tokens(0..1) > 100, "the arguments count: {}", t.tokens(0..1));
        assert_eq!(t.tokens(0..1), u64::from(c.tokens));
        assert_eq!((r.role, r.tool_call_id.as_deref(), r.tool_error), (Role::Tool, Some("c1"), true));
    }

    #[test]
    fn transcripts_over_one_history_share_its_items_and_honour_visibility() {
        let h = History::new();
        let (mut a, mut b) = (Transcript::over(h.clone()), Transcript::over(h.clone()));
        let log: Vec<_> = (0..10).map(|i| env(i, &format!("m{i} {}", "w ".repeat(i)))).collect();
        for (i, e) in log.iter().enumerate() {
            a.fold(e, true);
            // b cannot see messages 3 and 4, nor 8.
            b.fold(&Arc::new((**e).clone()), !matches!(i, 3 | 4 | 8));
        }
        assert_eq!(h.len(), 10, "each envelope is appended once");
        assert!(Arc::ptr_eq(a.get(5).unwrap(), b.get(3).unwrap()), "b's items are the shared ones");
        assert_eq!(a.len(), 10);
        assert_eq!(
            texts(&b),
            [
                "m0 ",
                "m1 w ",
                "m2 w w ",
                "m5 w w w w w ",
                "m6 w w w w w w ",
                "m7 w w w w w w w ",
                "m9 w w w w w w w w w "
            ]
        );
        assert_eq!(b.runs.len(), 3);
        // Token counts of any window equal the sum over the messages in it.
        for t in [&a, &b] {
            for s in 0..t.len() {
                for e in s..=t.len() {
                    let want: u64 = t.iter(s..e).map(|x| u64::from(estimate_tokens(&x.body.text) + 4)).sum();
                    assert_eq!(t.tokens(s..e), want, "window {s}..{e}");
                }
            }
        }
        for t in [&a, &b] {
            for s in 0..=t.len() {
                for e in s..=t.len() + 1 {
                    let by_get: Vec<_> = (s..e.min(t.len())).map(|i| t.get(i).unwrap().id.clone()).collect();
                    let by_iter: Vec<_> = t.iter(s..e).map(|x| x.id.clone()).collect();
                    assert_eq!(by_iter, by_get, "iter {s}..{e}");
                }
            }
        }
        assert_eq!(b.message(3, &PeerId::from("p2")).unwrap().role, Role::Assistant);
        assert_eq!(b.message(4, &PeerId::from("p2")).unwrap().role, Role::User);
        assert!(b.get(7).is_none());
    }

    #[test]
    fn a_snapshot_keeps_its_length_while_the_peer_folds_on() {
        let h = History::new();
        let mut t = Arc::new(Transcript::over(h.clone()));
        Arc::make_mut(&mut t).push_envelope(env(0, "zero"));
        let held = t.clone();
        Arc::make_mut(&mut t).push_envelope(env(1, "one"));
        assert_eq!((held.len(), t.len()), (1, 2));
        assert_eq!(texts(&held), ["zero"]);
        assert_eq!(held.tokens(0..5), t.tokens(0..1));
    }

    #[test]
    fn a_transcript_fed_something_else_goes_on_alone() {
        let h = History::new();
        let (mut a, mut b) = (Transcript::over(h.clone()), Transcript::over(h.clone()));
        a.push_envelope(env(0, "same"));
        b.push_envelope(env(0, "same"));
        a.push_envelope(env(1, "for a"));
        b.push_envelope(env(2, "for b"));
        b.push_envelope(env(3, "b again"));
        assert_eq!(texts(&a), ["same", "for a"]);
        assert_eq!(texts(&b), ["same", "for b", "b again"]);
        assert_eq!(h.len(), 2, "the shared history is untouched by b's divergence");
        let want: u64 = ["same", "for b", "b again"].iter().map(|t| u64::from(estimate_tokens(t) + 4)).sum();
        assert_eq!(b.tokens(0..3), want);
    }
}
