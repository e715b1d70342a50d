//! A program at the table, in Rust: a linter peer whose turns come from code, not a
//! model, in a conversation with a scripted author and reviewer. The linter reads its
//! inbox, checks the patch it was sent and reports to the author by name; the reviewer
//! finishes once the author says the lint is clean.
//!
//!     cargo run -p roundtable-core --example program_peer

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use roundtable_core::envelope::{Kind, PeerId, SessionId};
use roundtable_core::log::{MemLog, SessionLog, SharedMemLog};
use roundtable_core::model::ChatModel;
use roundtable_core::model::program::{Inbox, Program, ProgramAction, ProgramModel};
use roundtable_core::model::scripted::Scripted;
use roundtable_core::peer::PeerExtras;
use roundtable_core::runner::{open_session, run_peers_with};
use roundtable_core::team::{NoEnv, parse_team};

/// Flags lines longer than 40 characters in the patch it was sent.
struct Linter;

#[async_trait]
impl Program for Linter {
    async fn act(&self, inbox: &Inbox) -> Result<Vec<ProgramAction>, String> {
        if inbox.in_turn {
            return Ok(Vec::new()); // its own sends came back: the turn is over
        }
        let Some(patch) = inbox.messages.iter().rev().find(|m| m.from.as_deref() == Some("author")) else {
            return Ok(Vec::new());
        };
        let long: Vec<usize> =
            patch.text.lines().enumerate().filter(|(_, l)| l.len() > 40).map(|(i, _)| i + 1).collect();
        let text = if long.is_empty() {
            "lint: clean".to_string()
        } else {
            format!("lint: lines {long:?} are longer than 40 characters")
        };
        Ok(vec![ProgramAction::Send { to: "author".into(), text }])
    }
}

const TEAM: &str = r#"
[models.m]
provider = "scripted"
[models.m.per_peer]
author = [
  '!tool send {"to": "linter", "text": "fn add(a: i32, b: i32) -> i32 { a + b } // adds two numbers together"}',
  "",
  '!tool send {"to": "linter", "text": "// adds two numbers\nfn add(a: i32, b: i32) -> i32 { a + b }"}',
  "",
  '!tool send {"to": "reviewer", "text": "The lint is clean now."}',
  "",
]
reviewer = ['!tool finish {"answer": "Merged: fn add, lint clean."}']
[models.linter]
provider = "scripted"
replies = ["(a program answers for this peer)"]

[[peers]]
id = "author"
model = "m"
[[peers]]
id = "linter"
model = "linter"
[[peers]]
id = "reviewer"
model = "m"

[protocol]
kind = "conversation"
start = ["author"]
finish = "reviewer"
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let plan = parse_team("program_peer.toml", TEAM, &NoEnv).expect("the team is valid");
    let scripted = |p: &str| -> Arc<dyn ChatModel> {
        let replies = match &plan.models["m"].provider {
            roundtable_core::team::ProviderSpec::Scripted { per_peer, .. } => per_peer[p].clone(),
            _ => unreachable!(),
        };
        Arc::new(Scripted::new("scripted", Vec::new(), HashMap::from([(PeerId::from(p), replies)])))
    };
    let mut models: HashMap<PeerId, Arc<dyn ChatModel>> = HashMap::new();
    models.insert("author".into(), scripted("author"));
    models.insert("reviewer".into(), scripted("reviewer"));
    models.insert("linter".into(), Arc::new(ProgramModel::new("linter-program", Linter)));

    let log: Arc<dyn SessionLog> = Arc::new(SharedMemLog(Arc::new(MemLog::new(SessionId::from("program-peer")))));
    open_session(log.as_ref(), &plan, "Add a function that adds two numbers; keep lines short.").await.unwrap();
    let summary = run_peers_with(log.clone(), &plan, models, None, None, PeerExtras::default()).await.unwrap();
    for e in log.read_all().await.unwrap() {
        let env = &e.env;
        if env.kind == Kind::Message && !env.body.text.is_empty() {
            println!("{:>3}  {} → {:?}: {}", e.seq, env.from, env.to, env.body.text.replace('\n', " / "));
        }
    }
    println!("\nstopped: {}", summary.stop_reason.unwrap_or_default());
    println!("answer:  {}", summary.final_answer.unwrap_or_default());
}
