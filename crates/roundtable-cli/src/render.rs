//! Transcripts for people: envelopes as readable text, streamed tokens, a progress line.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use roundtable_core::log::Entry;
use roundtable_core::peer::PeerEvent;
use roundtable_core::readable::count;
use roundtable_core::session::SessionSummary;
use roundtable_core::termination::Tally;
use roundtable_core::tool::ToolResultBody;
use roundtable_core::{Kind, PeerId, Recipient};

/// ANSI styling, on only for terminals (and off with NO_COLOR).
#[derive(Clone, Copy)]
pub(crate) struct Style {
    on: bool,
}

impl Style {
    pub(crate) fn for_stdout() -> Self {
        Style { on: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() }
    }
    fn wrap(self, code: &str, s: &str) -> String {
        if self.on { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_string() }
    }
    pub(crate) fn bold(self, s: &str) -> String {
        self.wrap("1", s)
    }
    pub(crate) fn dim(self, s: &str) -> String {
        self.wrap("2", s)
    }
    fn red(self, s: &str) -> String {
        self.wrap("31", s)
    }
    fn yellow(self, s: &str) -> String {
        self.wrap("33", s)
    }
    fn cyan(self, s: &str) -> String {
        self.wrap("36", s)
    }
}

fn to_text(to: &Recipient) -> String {
    match to {
        Recipient::All => "all".into(),
        Recipient::Peer(p) => p.to_string(),
        Recipient::Group(g) => format!("group {g}"),
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
}

/// The header line of a contribution: `[round 2] pm → all (message) · r2/answer`.
fn header(e: &Entry, st: Style) -> String {
    let env = &e.env;
    let kind = if env.kind == Kind::Message { String::new() } else { format!(" ({})", env.kind) };
    format!(
        "{} {} → {}{}{}",
        st.dim(&format!("#{:<3} [round {}]", e.seq, env.round + 1)),
        st.bold(env.from.as_str()),
        to_text(&env.to),
        st.dim(&kind),
        step_text(e, st)
    )
}

/// ` · r1/propose`: the envelope's step as people count rounds (see
/// [`roundtable_core::readable::step`]).
fn step_text(e: &Entry, st: Style) -> String {
    st.dim(&format!(" · {}", roundtable_core::readable::step(&e.env.step)))
}

fn usage_line(e: &Entry, st: Style) -> Option<String> {
    Some(usage_text(e.env.usage.as_ref()?, st))
}

fn usage_text(u: &roundtable_core::Usage, st: Style) -> String {
    let cost =
        if u.cost_usd > 0.0 { format!(" · {}", roundtable_core::readable::usd(u.cost_usd)) } else { String::new() };
    st.dim(&format!("  ({} · {}+{} tokens · {} ms{cost})", u.model, u.prompt_tokens, u.completion_tokens, u.latency_ms))
}

/// One envelope as text, for `roundtable log` and the live transcript.
pub(crate) fn format_entry(e: &Entry, st: Style) -> String {
    let env = &e.env;
    match env.kind {
        Kind::Task => format!("{} {}\n{}", st.dim(&format!("#{:<3}", e.seq)), st.cyan("Task"), indent(&env.body.text)),
        Kind::Stop => {
            let reason =
                env.body.json.as_ref().and_then(|j| j.get("reason")?.as_str().map(str::to_owned)).unwrap_or_default();
            format!(
                "{} {} {reason} {}",
                st.dim(&format!("#{:<3}", e.seq)),
                st.cyan("Stopped:"),
                st.dim(&format!("(recorded by {})", env.from))
            )
        }
        Kind::Failure => {
            format!("{} {} {}: {}", st.dim(&format!("#{:<3}", e.seq)), st.red("failure"), env.from, env.body.text)
        }
        Kind::Absent | Kind::Join => {
            format!("{} {} {}", st.dim(&format!("#{:<3}", e.seq)), st.yellow(env.kind.as_str()), env.body.text)
        }
        Kind::ToolList => {
            format!(
                "{} {} {} {}",
                st.dim(&format!("#{:<3}", e.seq)),
                st.cyan("tools"),
                env.body.text,
                st.dim(&format!("(recorded by {})", env.from))
            )
        }
        Kind::ToolCall => {
            let tool = env.body.json.as_ref().and_then(|j| j.get("tool")?.as_str().map(str::to_owned));
            let head = format!(
                "{} {} calls {} {}",
                st.dim(&format!("#{:<3} [round {}]", e.seq, env.round + 1)),
                st.bold(env.from.as_str()),
                tool.as_deref().unwrap_or("?"),
                st.dim("(tool_call)")
            ) + &step_text(e, st);
            let mut s = format!("{head}\n{}", indent(&env.body.text));
            if let Some(u) = usage_line(e, st) {
                s.push('\n');
                s.push_str(&u);
            }
            s
        }
        Kind::ToolResult => {
            let body = env.body.json.clone().and_then(|j| serde_json::from_value::<ToolResultBody>(j).ok());
            let (tool, status) = body.map_or_else(|| ("?".to_owned(), String::new()), |b| (b.tool.clone(), b.status()));
            let head = format!(
                "{} {} → {} {}",
                st.dim(&format!("#{:<3} [round {}]", e.seq, env.round + 1)),
                tool,
                st.bold(env.from.as_str()),
                st.dim(&format!("(tool_result: {status})"))
            ) + &step_text(e, st);
            format!("{head}\n{}", indent(&env.body.text))
        }
        _ => {
            let mut s = format!("{}\n{}", header(e, st), indent(&env.body.text));
            if let Some(u) = usage_line(e, st) {
                s.push('\n');
                s.push_str(&u);
            }
            s
        }
    }
}

/// A model call on screen: `(peer, step)`.
type CallKey = (PeerId, std::sync::Arc<str>);

/// A model call in flight, as the live transcript shows it.
struct InFlight {
    round: u32,
    /// Model calls this duty made so far (a peer working through tool calls makes several).
    calls: u32,
    /// Some text of the current attempt is on screen.
    streamed: bool,
    /// Something else was printed after this call's text began, so the text on screen
    /// is not one block under its header.
    interrupted: bool,
    /// The model answered and its answer is on screen: its envelope adds nothing.
    answered: bool,
}

/// Where the live transcript writes, and how.
pub(crate) struct LiveOutput {
    pub(crate) out: Box<dyn Write + Send>,
    pub(crate) style: Style,
    /// Stream tokens as they come (stdout is a terminal); otherwise print whole envelopes.
    pub(crate) stream: bool,
    /// Keep a progress line on standard error.
    pub(crate) progress: bool,
}

impl LiveOutput {
    pub(crate) fn stdout() -> Self {
        LiveOutput {
            out: Box::new(std::io::stdout()),
            style: Style::for_stdout(),
            stream: std::io::stdout().is_terminal(),
            progress: std::io::stderr().is_terminal(),
        }
    }
}

/// The live transcript of `roundtable run`: a header as soon as a model call starts,
/// tokens as they stream (in a terminal), every retry, then the envelope; whole messages
/// otherwise; a progress line on standard error in a terminal.
///
/// Peer events (calls starting, tokens, retries) and log entries come on separate
/// channels with no order between them, and several peers may stream at once. So every
/// call in flight is tracked on its own, keyed by `(peer, step)`: an event is never
/// dropped because another call is on screen, and text that continues after something
/// else was printed says whose it is (`  pm ┆ …`).
pub(crate) struct Live {
    out: Box<dyn Write + Send>,
    st: Style,
    stream: bool,
    progress: bool,
    calls: std::collections::HashMap<CallKey, InFlight>,
    /// The call whose text the current screen line continues (the line is open).
    cursor: Option<CallKey>,
    /// The continuation prefix of the open line.
    prefix: String,
    /// The call whose header or text was the last thing printed.
    last: Option<CallKey>,
    /// (peer, step) of every envelope already printed: late events for it are ignored.
    shown: std::collections::HashSet<CallKey>,
    tally: Tally,
    round: u32,
    started: Instant,
    progress_shown: bool,
}

impl Live {
    pub(crate) fn new(o: LiveOutput) -> Self {
        Live {
            out: o.out,
            st: o.style,
            stream: o.stream,
            progress: o.progress,
            calls: Default::default(),
            cursor: None,
            prefix: String::new(),
            last: None,
            shown: Default::default(),
            tally: Tally::default(),
            round: 0,
            started: Instant::now(),
            progress_shown: false,
        }
    }

    fn clear_progress(&mut self) {
        if self.progress_shown {
            eprint!("\r\x1b[2K");
            self.progress_shown = false;
        }
    }

    fn show_progress(&mut self) {
        if !self.progress || self.cursor.is_some() {
            return;
        }
        let cost = if self.tally.cost_usd > 0.0 {
            format!(" · {}", roundtable_core::readable::usd(self.tally.cost_usd))
        } else {
            String::new()
        };
        eprint!(
            "\r\x1b[2K\x1b[2mround {} · {} · {} · {}{cost} · {:.1} s\x1b[0m",
            self.round + 1,
            count(self.tally.messages, "message", "messages"),
            count(self.tally.calls, "call", "calls"),
            count(self.tally.tokens(), "token", "tokens"),
            self.started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
        self.progress_shown = true;
    }

    /// End the open line of streamed text, if any, before printing anything else.
    fn end_line(&mut self) {
        self.clear_progress();
        if let Some(key) = self.cursor.take() {
            let _ = writeln!(self.out);
            self.last = Some(key);
        }
    }

    /// Print a line that belongs to no call's text.
    fn line(&mut self, text: &str) {
        self.end_line();
        let _ = writeln!(self.out, "{text}");
        self.last = None;
        for c in self.calls.values_mut() {
            c.interrupted |= c.streamed;
        }
    }

    fn header(&mut self, key: &CallKey, note: &str) {
        let Some(call) = self.calls.get(key) else { return };
        let text = format!(
            "{} {} {}",
            self.st.dim(&format!("     [round {}]", call.round + 1)),
            self.st.bold(key.0.as_str()),
            self.st.dim(&format!("…{note}"))
        );
        self.line(&text);
        self.last = Some(key.clone());
    }

    pub(crate) fn event(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::Thinking { peer, step, round } => {
                let key = (peer, step);
                if !self.stream || self.shown.contains(&key) {
                    return;
                }
                let call = self.calls.entry(key.clone()).or_insert(InFlight {
                    round,
                    calls: 0,
                    streamed: false,
                    interrupted: false,
                    answered: false,
                });
                call.calls += 1;
                call.answered = false;
                call.streamed = false;
                call.interrupted = false;
                let note = if call.calls > 1 { format!(" model call {}", call.calls) } else { String::new() };
                self.header(&key, &note);
            }
            PeerEvent::Token { peer, step, text } => {
                let key = (peer, step);
                if !self.stream || self.shown.contains(&key) {
                    return;
                }
                if !self.calls.contains_key(&key) {
                    // Its start was not seen (it cannot come after its tokens, but a
                    // header costs nothing).
                    let round = self.round;
                    self.event(PeerEvent::Thinking { peer: key.0.clone(), step: key.1.clone(), round });
                }
                if self.cursor.as_ref() != Some(&key) {
                    self.end_line();
                    self.prefix = if self.last.as_ref() == Some(&key) {
                        "  ".to_string()
                    } else {
                        self.st.dim(&format!("  {} ┆ ", key.0))
                    };
                    let _ = write!(self.out, "{}", self.prefix);
                    for (k, c) in self.calls.iter_mut() {
                        c.interrupted |= c.streamed && *k != key;
                    }
                }
                let _ = write!(self.out, "{}", text.replace('\n', &format!("\n{}", self.prefix)));
                if let Some(c) = self.calls.get_mut(&key) {
                    c.streamed = true;
                }
                self.cursor = Some(key.clone());
                self.last = Some(key);
            }
            PeerEvent::AttemptFailed { peer, step, attempt, of, error, wait_ms, retry_after } => {
                let key = (peer, step);
                if self.shown.contains(&key) {
                    return;
                }
                let discarded = self.calls.get(&key).is_some_and(|c| c.streamed);
                let mut text = format!("  ✗ {}: attempt {attempt} of {of} failed: {error}", key.0);
                if discarded {
                    text.push_str(" (its text above is discarded)");
                }
                let red = self.st.red(&text);
                self.line(&red);
                let secs = wait_ms as f64 / 1000.0;
                let wait = if retry_after {
                    format!("  {}: waiting {secs:.1} s for Retry-After", key.0)
                } else {
                    format!("  {}: waiting {secs:.1} s before attempt {}", key.0, attempt + 1)
                };
                let dim = self.st.dim(&wait);
                self.line(&dim);
                if let Some(c) = self.calls.get_mut(&key) {
                    c.streamed = false;
                    c.interrupted = false;
                }
            }
            PeerEvent::Answered { peer, step, text, usage } => {
                let key = (peer, step);
                if !self.stream || self.shown.contains(&key) {
                    return;
                }
                let Some(call) = self.calls.get(&key) else { return };
                let in_place =
                    !call.interrupted && (self.cursor.as_ref() == Some(&key) || self.last.as_ref() == Some(&key));
                let (round, streamed) = (call.round, call.streamed);
                self.end_line();
                if !in_place {
                    // Its text is mixed with others': show the answer again, whole.
                    let head = format!(
                        "{} {} {}",
                        self.st.dim(&format!("     [round {}]", round + 1)),
                        self.st.bold(key.0.as_str()),
                        self.st.dim("answered")
                    );
                    let _ = writeln!(self.out, "{head}");
                }
                if (!in_place || !streamed) && !text.trim().is_empty() {
                    let _ = writeln!(self.out, "{}", indent(&text));
                }
                let _ = writeln!(self.out, "{}", usage_text(&usage, self.st));
                self.last = None;
                for c in self.calls.values_mut() {
                    c.interrupted |= c.streamed;
                }
                if let Some(c) = self.calls.get_mut(&key) {
                    c.answered = true;
                    c.streamed = false;
                    c.interrupted = false;
                }
            }
            PeerEvent::Retrying { peer, step, attempt, of } => {
                let key = (peer, step);
                if self.shown.contains(&key) {
                    return;
                }
                if self.stream {
                    if let Some(c) = self.calls.get_mut(&key) {
                        c.streamed = false;
                        c.interrupted = false;
                    }
                    self.header(&key, &format!(" attempt {attempt} of {of}"));
                } else {
                    let dim = self.st.dim(&format!("  {}: attempt {attempt} of {of}", key.0));
                    self.line(&dim);
                }
            }
        }
        let _ = self.out.flush();
    }

    pub(crate) fn entry(&mut self, e: &Entry) {
        self.tally.observe(e.seq, &e.env, None);
        self.round = self.round.max(e.env.round);
        let key = (e.env.from.clone(), e.env.step.clone());
        self.shown.insert(key.clone());
        let open = self.cursor.as_ref() == Some(&key);
        let last = self.last.as_ref() == Some(&key);
        let call = self.calls.remove(&key);
        if call.as_ref().is_some_and(|c| c.answered) && e.env.kind != Kind::Failure {
            // The model's answer is on screen already; another call's open line of text
            // stays open.
            self.show_progress();
            return;
        }
        self.end_line();
        match call {
            // Its header is on screen and its text under it, in one block: finish it.
            Some(c) if e.env.kind != Kind::Failure && !c.interrupted && (open || last) => {
                if !c.streamed {
                    let _ = writeln!(self.out, "{}", indent(&e.env.body.text));
                }
                if let Some(u) = usage_line(e, self.st) {
                    let _ = writeln!(self.out, "{u}");
                }
            }
            Some(c) if e.env.kind == Kind::Failure && c.streamed => {
                let note = self.st.dim("  (the text above is discarded: the call failed)");
                let _ = writeln!(self.out, "{note}\n{}", format_entry(e, self.st));
            }
            // Nothing on screen yet, or its text is mixed with others': print it whole.
            _ => {
                let _ = writeln!(self.out, "{}", format_entry(e, self.st));
            }
        }
        self.last = None;
        for c in self.calls.values_mut() {
            c.interrupted |= c.streamed;
        }
        let _ = self.out.flush();
        self.show_progress();
    }

    pub(crate) fn finish(&mut self) {
        self.end_line();
        let _ = self.out.flush();
        self.clear_progress();
    }
}

/// The closing lines after a session, on stdout. A failed write (a full disk, a closed
/// reader) is an error for the caller to report, never a panic.
pub(crate) fn print_summary(s: &SessionSummary) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    write_summary(&mut out, s)?;
    out.flush()
}

fn write_summary(out: &mut dyn Write, s: &SessionSummary) -> std::io::Result<()> {
    let st = Style::for_stdout();
    writeln!(out)?;
    writeln!(out, "{} {}", st.bold("Session"), s.session)?;
    writeln!(
        out,
        "  {} · {} · {} · {} · {}{} · {:.1} s",
        s.stop_reason.as_deref().unwrap_or("not stopped"),
        count(s.messages, "message", "messages"),
        count(s.rounds, "round", "rounds"),
        count(s.calls, "model call", "model calls"),
        count(s.tokens, "token", "tokens"),
        if s.cost_usd > 0.0 { format!(" · {}", roundtable_core::readable::usd(s.cost_usd)) } else { String::new() },
        s.duration_ms as f64 / 1000.0
    )?;
    match (&s.final_answer, s.answer_accepted) {
        (Some(a), true) => {
            writeln!(out, "{}", st.bold("Final answer"))?;
            writeln!(out, "{}", indent(a))?;
        }
        (Some(a), false) => {
            writeln!(
                out,
                "{}",
                st.bold("Leading candidate, not accepted (the session stopped before the team accepted an answer)")
            )?;
            writeln!(out, "{}", indent(a))?;
        }
        (None, _) => {}
    }
    writeln!(
        out,
        "{}",
        st.dim(&format!("See it again with `roundtable log {0}`; save it with `roundtable export {0}`.", s.session))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use roundtable_core::{Body, Envelope, SessionId, Usage};

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Screen(Arc<Mutex<Vec<u8>>>);

    impl Write for Screen {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Screen {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn live(stream: bool) -> (Live, Screen) {
        let screen = Screen::default();
        let out = LiveOutput { out: Box::new(screen.clone()), style: Style { on: false }, stream, progress: false };
        (Live::new(out), screen)
    }

    fn entry(seq: u64, from: &str, step: &str, kind: Kind, text: &str) -> Entry {
        let env =
            Envelope::new(&SessionId::from("s"), &PeerId::from(from), step, kind, Recipient::All, Body::text(text))
                .with_round(0)
                .with_usage(Usage { model: "m".into(), prompt_tokens: 1, completion_tokens: 2, ..Default::default() });
        Entry { seq, env: Arc::new(env) }
    }

    fn thinking(peer: &str, step: &str) -> PeerEvent {
        PeerEvent::Thinking { peer: PeerId::from(peer), step: Arc::from(step), round: 0 }
    }

    fn token(peer: &str, step: &str, text: &str) -> PeerEvent {
        PeerEvent::Token { peer: PeerId::from(peer), step: Arc::from(step), text: text.into() }
    }

    fn answered(peer: &str, step: &str, text: &str) -> PeerEvent {
        PeerEvent::Answered {
            peer: PeerId::from(peer),
            step: Arc::from(step),
            text: Arc::from(text),
            usage: Usage { model: "m".into(), prompt_tokens: 1, completion_tokens: 2, ..Default::default() },
        }
    }

    /// The reported bug: the next speaker starts (its first event) before the previous
    /// speaker's envelope is read back, as it always does when the next duty follows
    /// from that envelope. Its header and tokens must show, in one block.
    #[test]
    fn a_call_that_starts_before_the_previous_envelope_arrives_still_streams() {
        let (mut live, screen) = live(true);
        live.event(thinking("pm", "r0/pm"));
        live.event(token("pm", "r0/pm", "first answer"));
        live.event(answered("pm", "r0/pm", "first answer"));
        live.event(thinking("dev", "r0/dev"));
        live.event(token("dev", "r0/dev", "second "));
        live.entry(&entry(2, "pm", "r0/pm", Kind::Message, "first answer"));
        live.event(token("dev", "r0/dev", "answer"));
        live.event(answered("dev", "r0/dev", "second answer"));
        live.entry(&entry(3, "dev", "r0/dev", Kind::Message, "second answer"));
        assert_eq!(
            screen.text(),
            "     [round 1] pm …\n  first answer\n  (m · 1+2 tokens · 0 ms)\n\
             \x20    [round 1] dev …\n  second answer\n  (m · 1+2 tokens · 0 ms)\n"
        );
    }

    /// Without the answered event (a call whose answer never came back as an event),
    /// the envelope still closes the call, printed whole if other output came between.
    #[test]
    fn an_envelope_closes_a_call_whose_answer_was_not_announced() {
        let (mut live, screen) = live(true);
        live.event(thinking("pm", "r0/pm"));
        live.event(token("pm", "r0/pm", "first answer"));
        live.event(thinking("dev", "r0/dev"));
        live.event(token("dev", "r0/dev", "second "));
        live.entry(&entry(2, "pm", "r0/pm", Kind::Message, "first answer"));
        live.event(token("dev", "r0/dev", "answer"));
        live.entry(&entry(3, "dev", "r0/dev", Kind::Message, "second answer"));
        let text = screen.text();
        assert!(text.contains("     [round 1] dev …\n  second \n"), "{text}");
        // Its text resumes after pm's envelope, saying whose it is.
        assert!(text.contains("  (m · 1+2 tokens · 0 ms)\n  dev ┆ answer\n"), "{text}");
        // Mixed with another call's output, each envelope is also printed whole.
        assert!(text.contains("pm → all · r1/pm\n  first answer"), "{text}");
        assert!(text.contains("dev → all · r1/dev\n  second answer"), "{text}");
    }

    /// Two peers streaming at once: each piece of text says whose it is, and each answer
    /// is shown whole when it is done.
    #[test]
    fn concurrent_streams_are_labelled_and_each_answer_shown_whole() {
        let (mut live, screen) = live(true);
        live.event(thinking("a", "s/a"));
        live.event(thinking("b", "s/b"));
        live.event(token("a", "s/a", "alpha "));
        live.event(token("b", "s/b", "beta "));
        live.event(token("a", "s/a", "one"));
        live.event(answered("a", "s/a", "alpha one"));
        live.event(token("b", "s/b", "two"));
        live.event(answered("b", "s/b", "beta two"));
        live.entry(&entry(2, "a", "s/a", Kind::Message, "alpha one"));
        live.entry(&entry(3, "b", "s/b", Kind::Message, "beta two"));
        assert_eq!(
            screen.text(),
            "     [round 1] a …\n     [round 1] b …\n  a ┆ alpha \n  b ┆ beta \n  a ┆ one\n\
             \x20    [round 1] a answered\n  alpha one\n  (m · 1+2 tokens · 0 ms)\n\
             \x20 b ┆ two\n\
             \x20    [round 1] b answered\n  beta two\n  (m · 1+2 tokens · 0 ms)\n"
        );
    }

    #[test]
    fn a_lone_stream_is_one_block_under_its_header() {
        let (mut live, screen) = live(true);
        live.event(thinking("pm", "s1"));
        live.event(token("pm", "s1", "hello\nworld"));
        live.event(answered("pm", "s1", "hello\nworld"));
        live.entry(&entry(2, "pm", "s1", Kind::Message, "hello\nworld"));
        assert_eq!(screen.text(), "     [round 1] pm …\n  hello\n  world\n  (m · 1+2 tokens · 0 ms)\n");
    }

    #[test]
    fn a_failed_attempt_is_marked_and_the_next_gets_its_own_header() {
        let (mut live, screen) = live(true);
        live.event(thinking("pm", "s1"));
        live.event(token("pm", "s1", "half an ans"));
        live.event(PeerEvent::AttemptFailed {
            peer: PeerId::from("pm"),
            step: Arc::from("s1"),
            attempt: 1,
            of: 3,
            error: "timed out: no complete answer within 30000 ms".into(),
            wait_ms: 2000,
            retry_after: true,
        });
        live.event(PeerEvent::Retrying { peer: PeerId::from("pm"), step: Arc::from("s1"), attempt: 2, of: 3 });
        live.event(token("pm", "s1", "whole answer"));
        live.entry(&entry(2, "pm", "s1", Kind::Message, "whole answer"));
        let text = screen.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "  half an ans", "{text}");
        assert_eq!(
            lines[2],
            "  ✗ pm: attempt 1 of 3 failed: timed out: no complete answer within 30000 ms (its text above is discarded)"
        );
        assert_eq!(lines[3], "  pm: waiting 2.0 s for Retry-After");
        assert_eq!(lines[4], "     [round 1] pm … attempt 2 of 3");
        assert_eq!(lines[5], "  whole answer", "{text}");
        assert!(!text.contains("half an answhole"), "{text}");
    }

    #[test]
    fn without_a_terminal_envelopes_print_whole_and_retries_still_show() {
        let (mut live, screen) = live(false);
        live.event(thinking("pm", "s1"));
        live.event(token("pm", "s1", "partial"));
        live.event(PeerEvent::AttemptFailed {
            peer: PeerId::from("pm"),
            step: Arc::from("s1"),
            attempt: 1,
            of: 2,
            error: "boom".into(),
            wait_ms: 500,
            retry_after: false,
        });
        live.event(PeerEvent::Retrying { peer: PeerId::from("pm"), step: Arc::from("s1"), attempt: 2, of: 2 });
        live.entry(&entry(2, "pm", "s1", Kind::Message, "done"));
        let text = screen.text();
        assert!(!text.contains("partial"), "{text}");
        assert!(text.contains("  ✗ pm: attempt 1 of 2 failed: boom\n  pm: waiting 0.5 s before attempt 2\n"), "{text}");
        assert!(text.contains("  pm: attempt 2 of 2\n"), "{text}");
        assert!(text.contains("pm → all · s1\n  done"), "{text}");
    }

    #[test]
    fn events_after_their_envelope_are_ignored() {
        let (mut live, screen) = live(true);
        live.entry(&entry(2, "pm", "s1", Kind::Message, "done"));
        live.event(thinking("pm", "s1"));
        live.event(token("pm", "s1", "done"));
        live.finish();
        assert_eq!(screen.text().matches("done").count(), 1, "{}", screen.text());
    }

    #[test]
    fn the_summary_says_1_round_and_rounds_money() {
        let s = SessionSummary {
            session: SessionId::from("s"),
            team: "t".into(),
            protocol: "round_robin".into(),
            topic: "x".into(),
            stopped: true,
            stop_reason: Some("completed".into()),
            final_answer: None,
            answer_accepted: false,
            envelopes: 3,
            messages: 1,
            rounds: 1,
            calls: 1,
            prompt_tokens: 1,
            completion_tokens: 0,
            tokens: 1,
            cost_usd: 0.012345678,
            failures: 0,
            failed: false,
            duration_ms: 5,
            per_peer: Default::default(),
        };
        let mut out = Vec::new();
        write_summary(&mut out, &s).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("1 message · 1 round · 1 model call · 1 token · $0.0123 ·"), "{text}");
    }
}
