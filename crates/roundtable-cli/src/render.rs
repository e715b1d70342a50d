//! Transcripts for people: envelopes as readable text, streamed tokens, a progress line.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use roundtable_core::log::Entry;
use roundtable_core::peer::PeerEvent;
use roundtable_core::session::SessionSummary;
use roundtable_core::termination::Tally;
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

/// The header line of a contribution: `[round 2] pm → all (message)`.
fn header(e: &Entry, st: Style) -> String {
    let env = &e.env;
    let kind = if env.kind == Kind::Message { String::new() } else { format!(" ({})", env.kind) };
    format!(
        "{} {} → {}{}",
        st.dim(&format!("#{:<3} [round {}]", e.seq, env.round + 1)),
        st.bold(env.from.as_str()),
        to_text(&env.to),
        st.dim(&kind)
    )
}

fn usage_line(e: &Entry, st: Style) -> Option<String> {
    let u = e.env.usage.as_ref()?;
    let cost = if u.cost_usd > 0.0 { format!(" · ${:.4}", u.cost_usd) } else { String::new() };
    Some(st.dim(&format!(
        "  ({} · {}+{} tokens · {} ms{cost})",
        u.model, u.prompt_tokens, u.completion_tokens, u.latency_ms
    )))
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

/// The live transcript of `roundtable run`: tokens stream in a terminal, whole messages
/// otherwise; a progress line on standard error in a terminal.
pub(crate) struct Live {
    st: Style,
    tty: bool,
    progress: bool,
    streaming: Option<(PeerId, std::sync::Arc<str>)>,
    /// Whether any text of the current stream was printed.
    streamed: bool,
    /// (peer, step) of every envelope already printed.
    shown: std::collections::HashSet<(PeerId, std::sync::Arc<str>)>,
    tally: Tally,
    round: u32,
    started: Instant,
    progress_shown: bool,
}

impl Live {
    pub(crate) fn new() -> Self {
        Live {
            st: Style::for_stdout(),
            tty: std::io::stdout().is_terminal(),
            progress: std::io::stderr().is_terminal(),
            streaming: None,
            streamed: false,
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
        if !self.progress || self.streaming.is_some() {
            return;
        }
        let cost = if self.tally.cost_usd > 0.0 { format!(" · ${:.4}", self.tally.cost_usd) } else { String::new() };
        eprint!(
            "\r\x1b[2K\x1b[2mround {} · {} messages · {} calls · {} tokens{cost} · {:.1} s\x1b[0m",
            self.round + 1,
            self.tally.messages,
            self.tally.calls,
            self.tally.tokens(),
            self.started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
        self.progress_shown = true;
    }

    pub(crate) fn event(&mut self, ev: PeerEvent) {
        if !self.tty {
            return;
        }
        let mut out = std::io::stdout().lock();
        match ev {
            PeerEvent::Thinking { peer, step, round } => {
                // Events travel apart from the log: one may arrive after its envelope.
                if self.streaming.is_none() && !self.shown.contains(&(peer.clone(), step.clone())) {
                    self.clear_progress();
                    let _ = writeln!(
                        out,
                        "{} {} {}",
                        self.st.dim(&format!("     [round {}]", round + 1)),
                        self.st.bold(peer.as_str()),
                        self.st.dim("…")
                    );
                    self.streaming = Some((peer, step));
                    self.streamed = false;
                }
            }
            PeerEvent::Token { peer, step, text } => {
                if self.streaming.as_ref().is_some_and(|(p, s)| *p == peer && *s == step) {
                    if !self.streamed {
                        let _ = write!(out, "  ");
                        self.streamed = true;
                    }
                    let _ = write!(out, "{}", text.replace('\n', "\n  "));
                }
            }
        }
        let _ = out.flush();
    }

    pub(crate) fn entry(&mut self, e: &Entry) {
        self.tally.observe(e.seq, &e.env, None);
        self.round = self.round.max(e.env.round);
        self.clear_progress();
        let mut out = std::io::stdout().lock();
        self.shown.insert((e.env.from.clone(), e.env.step.clone()));
        let streamed = self.streaming.as_ref().is_some_and(|(p, s)| *p == e.env.from && *s == e.env.step);
        if streamed {
            // Its header is on screen; finish the text if none of it streamed.
            self.streaming = None;
            if e.env.kind == Kind::Failure {
                if self.streamed {
                    let _ = writeln!(out);
                }
                let _ = writeln!(out, "{}", format_entry(e, self.st));
            } else {
                if self.streamed {
                    let _ = writeln!(out);
                } else {
                    let _ = writeln!(out, "{}", indent(&e.env.body.text));
                }
                if let Some(u) = usage_line(e, self.st) {
                    let _ = writeln!(out, "{u}");
                }
            }
        } else {
            if self.streaming.is_some() {
                // Another peer is mid-stream: end its line, and let its envelope print
                // whole when it lands.
                if self.streamed {
                    let _ = writeln!(out);
                }
                self.streaming = None;
            }
            let _ = writeln!(out, "{}", format_entry(e, self.st));
        }
        let _ = out.flush();
        drop(out);
        self.show_progress();
    }

    pub(crate) fn finish(&mut self) {
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
        "  {} · {} messages · {} rounds · {} model calls · {} tokens{} · {:.1} s",
        s.stop_reason.as_deref().unwrap_or("not stopped"),
        s.messages,
        s.rounds,
        s.calls,
        s.tokens,
        if s.cost_usd > 0.0 { format!(" · ${:.4}", s.cost_usd) } else { String::new() },
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
