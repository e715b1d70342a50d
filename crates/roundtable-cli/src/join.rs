//! `roundtable join SESSION --as PEER`: a person takes a human peer's seat from a
//! terminal. The transcript so far is shown, then each envelope as it lands and each
//! duty as the protocol gives it; answers are read a line at a time and checked
//! against the form the duty asks for (see `roundtable_core::human`). The peer itself
//! runs here, as every peer runs (`run_peer`), with the person as its model; taking
//! the seat and keeping it is shared with the web view (`seat`,
//! `roundtable_core::sitting`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use roundtable_core::human::{Field, Form, Question, check_text};
use roundtable_core::sitting::{SeatEvent, Sitting};
use roundtable_core::team::TeamPlan;
use roundtable_core::{Kind, PeerId, Recipient, SessionId};

use crate::{Failure, nats, render, seat};

#[derive(clap::Args)]
pub(crate) struct JoinArgs {
    /// The session to join (see `roundtable sessions`).
    session: String,
    /// The human peer whose seat to take (a `[[peers]]` entry with kind = "human").
    #[arg(long = "as", value_name = "PEER")]
    seat: String,
    #[command(flatten)]
    remote: nats::NatsArgs,
}

/// A question being answered: the fields answered so far.
struct Asking {
    q: Question,
    values: Vec<serde_json::Value>,
}

impl Asking {
    fn fields(&self) -> &[Field] {
        match &self.q.form {
            Form::Text => &[],
            Form::Fields(f) => f,
        }
    }

    /// The next field to ask (skipping fixed ones), if any.
    fn next_prompt(&mut self) -> Option<String> {
        loop {
            let f = self.fields().get(self.values.len())?.clone();
            match f.prompt() {
                Some(p) => return Some(p),
                None => {
                    let v = f.check("").unwrap_or(serde_json::Value::Null);
                    self.values.push(v);
                }
            }
        }
    }
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub(crate) async fn join(dir: &Path, args: JoinArgs) -> Result<ExitCode, Failure> {
    let session = SessionId::from(args.session.as_str());
    let me = PeerId::from(args.seat.as_str());
    let seat::Taken { sitting, events, relay } = seat::take(dir, &args.remote, &session, &me).await?;
    let plan = sitting.plan().clone();
    sit(&me, &session, sitting, events, plan, relay).await
}

async fn sit(
    me: &PeerId,
    session: &SessionId,
    sitting: Sitting,
    mut events: tokio::sync::mpsc::UnboundedReceiver<SeatEvent>,
    plan: Arc<TeamPlan>,
    relay: bool,
) -> Result<ExitCode, Failure> {
    let style = render::Style::for_stdout();
    let group = plan.peer(me).and_then(|p| p.group.clone());
    let within = plan.peer(me).and_then(|p| p.answer_within_ms);
    say(&style.bold(&format!("You hold seat {me} in session {session} ({}).", plan.name)));
    say(&format!(
        "Answers are one line each. {}Commands: /say TEXT (to everyone, at any time), /to PEER TEXT (to one peer), /context (what you see now), /quit (leave; rejoin later with the same command).",
        within.map_or(String::new(), |ms| format!("Each duty waits {} s for you. ", ms as f64 / 1000.0))
    ));
    if relay {
        say(&style.dim("(local session: your answers are appended by the process that runs it)"));
    }

    // Lines from the terminal, read on a thread of their own (stdin blocks).
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut buf = String::new();
        loop {
            buf.clear();
            match stdin.read_line(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = lines_tx.send(None);
                    return;
                }
                Ok(_) => {
                    if lines_tx.send(Some(buf.trim_end_matches(['\n', '\r']).to_string())).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut asking: Option<Asking> = None;
    let mut stopped = false;
    let mut failed = None;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                None => break,
                Some(SeatEvent::Entry(e)) => {
                    if e.env.visible_to(me, group.as_deref()) || e.env.kind == Kind::Stop {
                        say(&render::format_entry(&e, style));
                    }
                }
                Some(SeatEvent::Over) => {
                    stopped = true;
                    break;
                }
                Some(SeatEvent::Failed(e)) => {
                    failed = Some(e);
                    break;
                }
                Some(SeatEvent::NotPosted(why)) => say(&why),
                Some(SeatEvent::Skipped) => {
                    if asking.take().is_some() {
                        say(&style.bold("You did not answer in time; that duty was skipped. You are still seated."));
                    }
                }
                Some(SeatEvent::Question(q)) => {
                    let round = if q.round > 0 { format!(" (round {})", q.round) } else { String::new() };
                    say(&style.bold(&format!("\n── Your duty: {}{round}", q.step)));
                    if let Some(i) = &q.instruction {
                        say(i);
                    }
                    say(&style.dim(&format!("(you see {} messages under the context policy; /context shows them)", q.context.len())));
                    let mut a = Asking { q, values: Vec::new() };
                    match a.next_prompt() {
                        Some(p) => say(&p),
                        None if a.fields().is_empty() => say("» your answer:"),
                        None => {
                            // Every field fixed: nothing to ask.
                            let text = Form::answer_of(a.fields(), &a.values);
                            a.q.answer(text);
                            continue;
                        }
                    }
                    asking = Some(a);
                }
            },
            line = lines.recv() => {
                let Some(Some(line)) = line else {
                    say("Leaving the seat (end of input).");
                    break;
                };
                let t = line.trim();
                if let Some(cmd) = t.strip_prefix('/') {
                    let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
                    match name {
                        "say" | "to" => {
                            let (to, text) = if name == "say" {
                                (Recipient::All, rest)
                            } else {
                                let (peer, text) = rest.trim_start().split_once(' ').unwrap_or((rest.trim(), ""));
                                (Recipient::Peer(PeerId::from(peer)), text)
                            };
                            if let Err(why) = sitting.say(to, text) {
                                say(&format!("refused: {why}"));
                            }
                        }
                        "quit" | "leave" => {
                            say("Leaving the seat.");
                            break;
                        }
                        "context" => match &asking {
                            Some(a) => {
                                for (who, text) in &a.q.context {
                                    say(&format!("{}: {text}", who.as_ref().map_or("task", |w| w.as_str())));
                                }
                            }
                            None => say("Nothing is asked of you now."),
                        },
                        _ => say(&format!("unknown command /{name}; valid: /say TEXT, /to PEER TEXT, /context, /quit")),
                    }
                    continue;
                }
                let Some(mut a) = asking.take() else {
                    say("Nothing is asked of you now (your duties appear here as they come).");
                    continue;
                };
                if a.fields().is_empty() {
                    match check_text(t) {
                        Ok(text) => a.q.answer(text),
                        Err(why) => {
                            say(&format!("refused: {why}"));
                            say("» your answer:");
                            asking = Some(a);
                        }
                    }
                    continue;
                }
                let field = a.fields()[a.values.len()].clone();
                match field.check(t) {
                    Ok(v) => {
                        a.values.push(v);
                        match a.next_prompt() {
                            Some(p) => {
                                say(&p);
                                asking = Some(a);
                            }
                            None => {
                                let text = Form::answer_of(a.fields(), &a.values);
                                say(&style.dim(&format!("(answered: {text})")));
                                a.q.answer(text);
                            }
                        }
                    }
                    Err(why) => {
                        say(&format!("refused: {why}"));
                        if let Some(p) = field.prompt() {
                            say(&p);
                        }
                        asking = Some(a);
                    }
                }
            }
        }
    }
    // Leaving: the peer stops before its question goes, so that leaving records nothing.
    sitting.leave().await;
    drop(asking);
    if let Some(e) = failed {
        return Err(Failure::Runtime(e));
    }
    if stopped {
        say(&style.bold("The session is over."));
    } else {
        say(&format!("You left seat {me}; come back with `roundtable join {session} --as {me}`."));
    }
    Ok(ExitCode::SUCCESS)
}

/// Aborts a background task when dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
