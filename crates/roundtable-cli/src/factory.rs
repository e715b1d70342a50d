//! Turning a plan's model specs into layered `ChatModel`s.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use roundtable_core::PeerId;
use roundtable_core::model::layers::{LayerConfig, RetryObserver, RetryPolicy, standard_stack};
use roundtable_core::model::scripted::Scripted;
use roundtable_core::model::simulated::Simulated;
use roundtable_core::model::{ChatModel, ModelError, ModelErrorKind};
use roundtable_core::team::{ModelSpec, PlanEnv, ProviderSpec, TeamPlan};
use roundtable_models::{AnthropicChat, AnthropicConfig, OpenAiChat, OpenAiConfig, Secret};

/// Plan validation's view of the process: real environment variables, files relative to
/// the team file's directory.
pub(crate) struct ProcessEnv {
    pub(crate) base: std::path::PathBuf,
}

impl PlanEnv for ProcessEnv {
    fn var_is_set(&self, name: &str) -> bool {
        std::env::var_os(name).is_some_and(|v| !v.is_empty())
    }
    fn read(&self, path: &str) -> Result<String, String> {
        std::fs::read_to_string(under_team_dir(&self.base, path)?).map_err(|e| e.to_string())
    }
    fn program_exists(&self, program: &str) -> bool {
        use std::os::unix::fs::PermissionsExt;
        let executable =
            |p: &std::path::Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if program.contains('/') {
            return executable(&self.base.join(program));
        }
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| executable(&d.join(program))))
    }
    fn resolve(&self, path: &str) -> std::path::PathBuf {
        let p = self.base.join(path);
        std::path::absolute(&p).unwrap_or(p)
    }
}

/// The one rule for files a team file names (scripted `replies_file`): a relative path
/// to a file under the team file's directory, `base`. An absolute path, a `..`
/// component, or a symbolic link that leads out of the directory is refused, so a team
/// file received from someone else can read nothing else on the machine.
pub(crate) fn under_team_dir(base: &Path, path: &str) -> Result<PathBuf, String> {
    let rel = Path::new(path);
    let outside = || format!("{path:?} is outside the team file's directory; a team file may read only files under it");
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(outside());
    }
    let base = if base.as_os_str().is_empty() { Path::new(".") } else { base };
    let dir = base.canonicalize().map_err(|e| format!("{}: {e}", base.display()))?;
    let file = base.join(rel).canonicalize().map_err(|e| e.to_string())?;
    if !file.starts_with(&dir) {
        return Err(outside());
    }
    Ok(file)
}

fn key_from_env(var: &Option<String>) -> Result<Option<Secret>, ModelError> {
    match var {
        None => Ok(None),
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Some(Secret::new(v))),
            _ => Err(ModelError::new(
                ModelErrorKind::Config,
                format!("environment variable `{name}` is not set; export it with your API key"),
            )),
        },
    }
}

/// The provider for one model spec, without layers.
pub(crate) fn provider(key: &str, spec: &ModelSpec) -> Result<Arc<dyn ChatModel>, ModelError> {
    Ok(match &spec.provider {
        ProviderSpec::Openai { model, base_url, api_key_env, headers, query } => {
            let mut cfg = OpenAiConfig::new(base_url.clone(), model.clone());
            cfg.api_key = key_from_env(api_key_env)?;
            cfg.headers = headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            cfg.query = query.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            Arc::new(OpenAiChat::new(cfg)?)
        }
        ProviderSpec::Anthropic { model, base_url, api_key_env } => {
            let mut cfg = AnthropicConfig::new(model.clone(), key_from_env(api_key_env)?);
            cfg.base_url = base_url.clone();
            Arc::new(AnthropicChat::new(cfg)?)
        }
        ProviderSpec::Scripted { .. } => {
            Arc::new(Scripted::from_spec(format!("scripted:{key}"), &spec.provider).expect("a scripted spec"))
        }
        ProviderSpec::Program { command, cwd } => {
            Arc::new(roundtable_models::CommandProgram::new(format!("program:{key}"), command.clone(), cwd.clone()))
        }
        ProviderSpec::Simulated { p_correct, susceptibility, seed } => {
            Arc::new(Simulated::new(format!("simulated:{key}"), *p_correct, *susceptibility, *seed))
        }
    })
}

/// One layered model per model spec (so its concurrency limit is shared by the peers
/// that use it), handed to each peer.
pub(crate) fn models_for(
    plan: &TeamPlan,
    only: Option<&PeerId>,
) -> Result<HashMap<PeerId, Arc<dyn ChatModel>>, ModelError> {
    models_observed(plan, only, None)
}

/// [`models_for`], with an observer of the retry layer (for metrics).
pub(crate) fn models_observed(
    plan: &TeamPlan,
    only: Option<&PeerId>,
    retries: Option<RetryObserver>,
) -> Result<HashMap<PeerId, Arc<dyn ChatModel>>, ModelError> {
    let mut built: HashMap<&str, Arc<dyn ChatModel>> = HashMap::new();
    let mut out = HashMap::new();
    for p in &plan.peers {
        // A human peer's answers come from the person in its seat (`roundtable join`).
        if only.is_some_and(|o| o != &p.id) || p.is_human() {
            continue;
        }
        let spec = &plan.models[&p.model];
        let model = match built.get(p.model.as_str()) {
            Some(m) => m.clone(),
            None => {
                let raw = provider(&p.model, spec)?;
                let layered = standard_stack(
                    raw,
                    LayerConfig {
                        retry: RetryPolicy { max_retries: spec.max_retries, ..RetryPolicy::default() },
                        timeout: Duration::from_millis(spec.timeout_ms),
                        max_concurrency: spec.max_concurrency,
                    },
                    retries.clone(),
                );
                built.insert(&p.model, layered.clone());
                layered
            }
        };
        out.insert(p.id.clone(), model);
    }
    Ok(out)
}

/// This data directory's master secret for sealing commit-reveal votes: 32 random bytes
/// in `DIR/secret` (mode 0600), created on first use. Every local run and resume uses
/// it, so a juror cut off between its commit and its reveal can reveal after a resume.
/// It never leaves the machine and is never written to a log.
pub(crate) fn local_secret(dir: &std::path::Path) -> Result<Arc<[u8]>, crate::Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("secret");
    let err = |e: std::io::Error| crate::Failure::Runtime(format!("{}: {e}", path.display()));
    if let Ok(hex) = std::fs::read_to_string(&path) {
        if let Ok(bytes) = hex::decode(hex.trim())
            && bytes.len() == 32
        {
            return Ok(Arc::from(bytes));
        }
        return Err(crate::Failure::Input(format!(
            "{}: not a secret this program wrote (32 bytes in hex); move it away to start a new one",
            path.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let bytes: [u8; 32] = rand::random();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(err)?;
    f.write_all(hex::encode(bytes).as_bytes()).map_err(err)?;
    Ok(Arc::from(bytes.to_vec()))
}
