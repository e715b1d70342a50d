//! `roundtable join SESSION --as PEER`: a person takes a human peer's seat from a
//! terminal. The transcript so far is shown, then each envelope as it lands and each
//! duty as the protocol gives it; answers are read a line at a time and checked
//! against the form the duty asks for (see `roundtable_core::human`). The peer itself
//! runs here, as every peer runs (`run_peer`), with the person as its model; taking
//! the seat and keeping it is shared with the web view (`seat`,
//! `roundtable_core::sitting`).
//!
//! An approval request addressed to the seat (a tool with `approve_by` naming it) is a
//! question like a duty's, put as what it is: who asks, which tool, the arguments, then
//! approve or deny and a reason, which a denial cannot do without (or `/approve
//! [REASON]`, `/deny REASON` in one line). The answer is the approval envelope the peer
//! writes, as a model approver's is. A request the caller stopped waiting for (the
//! seat's `answer_within_secs` passed, and the call was denied on the record) is taken
//! back from the person.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use roundtable_core::human::{Field, Form, Question, check_approval, check_text};
use roundtable_core::log::SessionLog;
use roundtable_core::sitting::{SeatEvent, Sitting};
use roundtable_core::team::TeamPlan;
use roundtable_core::tool::{ApprovalAnswer, ApprovalRequest};
use roundtable_core::{Envelope, Kind, PeerId, Recipient, SessionId};

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
    /// The request, when the question answers an approval request: approve or deny
    /// first, then the reason.
    approval: Option<ApprovalRequest>,
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

/// The approval request an envelope is, when it is one addressed to `me`.
fn approval_request(env: &Envelope, me: &PeerId) -> Option<ApprovalRequest> {
    let to_me = matches!(&env.to, Recipient::Peer(p) if p == me);
    if env.kind != Kind::Approval || !to_me || env.step.ends_with("/answer") {
        return None;
    }
    serde_json::from_value(env.body.json.clone()?).ok()
}

/// The request a question answers, when it answers one: the step of an approval's
/// answer is the request's step and `/answer`. The request is read from the log when
/// this terminal's tail has not shown it yet (the peer's own tail may be ahead of it).
async fn request_of(
    q: &Question,
    me: &PeerId,
    seen: &HashMap<String, ApprovalRequest>,
    log: &dyn SessionLog,
) -> Result<Option<ApprovalRequest>, Failure> {
    let Some(step) = q.step.strip_suffix("/answer").filter(|s| s.contains("/approve/")) else {
        return Ok(None);
    };
    if let Some(r) = seen.get(step) {
        return Ok(Some(r.clone()));
    }
    let entries = log.read_all().await?;
    Ok(entries.iter().filter(|e| &*e.env.step == step).find_map(|e| approval_request(&e.env, me)))
}

/// Cut `text` to `n` characters, marking the cut.
fn cut(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(n).collect::<String>())
    }
}

/// Arguments shown per request, and characters per value: enough to judge a call by,
/// bounded however much the model wrote.
const SHOWN_ARGUMENTS: usize = 20;
const SHOWN_VALUE_CHARS: usize = 300;

/// A tool call's arguments for a person to read: one `name: value` line each (the value
/// as JSON, long ones cut), or the text as the model wrote it when it is no JSON object.
fn readable_arguments(raw: &str) -> Vec<String> {
    let parsed = serde_json::from_str::<serde_json::Value>(if raw.trim().is_empty() { "{}" } else { raw });
    let Ok(serde_json::Value::Object(args)) = parsed else {
        return vec![format!("(not a JSON object) {}", cut(raw, SHOWN_VALUE_CHARS * 2))];
    };
    if args.is_empty() {
        return vec!["(no arguments)".into()];
    }
    let mut lines: Vec<String> = args
        .iter()
        .take(SHOWN_ARGUMENTS)
        .map(|(k, v)| format!("{k}: {}", cut(&v.to_string(), SHOWN_VALUE_CHARS)))
        .collect();
    if args.len() > SHOWN_ARGUMENTS {
        lines.push(format!("… and {} more", args.len() - SHOWN_ARGUMENTS));
    }
    lines
}

const APPROVE_PROMPT: &str = "» approve? (yes or no; or /approve [REASON], /deny REASON):";

fn reason_prompt(approve: bool, caller: &PeerId) -> String {
    if approve {
        "» reason (may be empty):".into()
    } else {
        format!("» reason ({caller} is told why; a denial needs one):")
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
        "Answers are one line each. {}Commands: /say TEXT (to everyone, at any time), /to PEER TEXT (to one peer), /approve [REASON] and /deny REASON (a tool call waiting for your approval), /context (what you see now), /quit (leave; rejoin later with the same command).",
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
    // Approval requests addressed to this seat, by step, as the tail shows them.
    let mut requests: HashMap<String, ApprovalRequest> = HashMap::new();
    let log = sitting.log().clone();
    let mut stopped = false;
    let mut failed = None;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                None => break,
                Some(SeatEvent::Entry(e)) => {
                    // The result of a call this seat was asked to approve is shown too (it
                    // is addressed to the caller): what the person's answer led to.
                    let asked_me = e.env.kind == Kind::ToolResult
                        && requests.values().any(|r| {
                            r.caller == e.env.from
                                && r.call_step.rsplit_once("/call/").map(|(d, k)| format!("{d}/result/{k}")).as_deref()
                                    == Some(&*e.env.step)
                        });
                    if e.env.visible_to(me, group.as_deref()) || e.env.kind == Kind::Stop || asked_me {
                        say(&render::format_entry(&e, style));
                    }
                    if let Some(r) = approval_request(&e.env, me) {
                        requests.insert(e.env.step.to_string(), r);
                    }
                    // The request being asked was answered by someone else: the caller,
                    // whose wait for this seat ran out. The question is taken back (the
                    // peer records that it was not answered; the denial stands).
                    let overtaken = e.env.kind == Kind::Approval
                        && e.env.from != *me
                        && asking.as_ref().is_some_and(|a| a.approval.is_some() && a.q.step == e.env.step);
                    if overtaken {
                        let why = e.env.body.json.clone()
                            .and_then(|j| serde_json::from_value::<ApprovalAnswer>(j).ok())
                            .map_or_else(|| e.env.body.text.to_string(), |a| a.reason);
                        asking = None;
                        say(&style.bold(&format!("Too late to answer that approval: the call was denied ({why}).")));
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
                    if let Some(req) = request_of(&q, me, &requests, log.as_ref()).await? {
                        say(&style.bold(&format!(
                            "\n── {} asks you to approve a call of `{}` ({})",
                            req.caller,
                            req.tool,
                            roundtable_core::readable::step(&req.call_step)
                        )));
                        for line in readable_arguments(&req.arguments) {
                            say(&format!("   {line}"));
                        }
                        say(&style.dim(&format!(
                            "(approved, the tool runs now; denied, it does not, and {}'s model is told your reason)",
                            req.caller
                        )));
                        say(APPROVE_PROMPT);
                        asking = Some(Asking { q, values: Vec::new(), approval: Some(req) });
                        continue;
                    }
                    let round = if q.round > 0 { format!(" (round {})", q.round) } else { String::new() };
                    say(&style.bold(&format!("\n── Your duty: {}{round}", roundtable_core::readable::step(&q.step))));
                    if let Some(i) = &q.instruction {
                        say(i);
                    }
                    say(&style.dim(&format!("(you see {} messages under the context policy; /context shows them)", q.context.len())));
                    let mut a = Asking { q, values: Vec::new(), approval: None };
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
                        "approve" | "deny" => {
                            let approve = name == "approve";
                            match asking.take() {
                                Some(a) if a.approval.is_some() => match check_approval(approve, rest) {
                                    Ok(text) => {
                                        say(&style.dim(&format!("({})", if approve { "approved" } else { "denied" })));
                                        a.q.answer(text);
                                    }
                                    Err(why) => {
                                        let hint = if approve { "" } else { "; type /deny REASON" };
                                        say(&format!("refused: {why}{hint}"));
                                        asking = Some(a);
                                    }
                                },
                                other => {
                                    asking = other;
                                    say("refused: no tool call waits for your approval now (requests appear here as they come)");
                                }
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
                        _ => say(&format!(
                            "unknown command /{name}; valid: /say TEXT, /to PEER TEXT, /approve [REASON], /deny REASON, /context, /quit"
                        )),
                    }
                    continue;
                }
                let Some(mut a) = asking.take() else {
                    say("Nothing is asked of you now (your duties appear here as they come).");
                    continue;
                };
                if let Some(req) = &a.approval {
                    // Approve or deny first, then the reason (required to deny).
                    match a.values.first().and_then(serde_json::Value::as_bool) {
                        None => match (Field::YesNo { name: "approve".into() }).check(t) {
                            Ok(v) => {
                                let approve = v.as_bool() == Some(true);
                                a.values.push(v);
                                say(&reason_prompt(approve, &req.caller));
                            }
                            Err(why) => {
                                say(&format!("refused: {why}"));
                                say(APPROVE_PROMPT);
                            }
                        },
                        Some(approve) => match check_approval(approve, t) {
                            Ok(text) => {
                                say(&style.dim(&format!("({})", if approve { "approved" } else { "denied" })));
                                a.q.answer(text);
                                continue;
                            }
                            Err(why) => {
                                say(&format!("refused: {why}"));
                                say(&reason_prompt(approve, &req.caller));
                            }
                        },
                    }
                    asking = Some(a);
                    continue;
                }
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
